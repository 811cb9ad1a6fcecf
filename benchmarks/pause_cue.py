"""Is there anything in the audio that tells a mid-utterance pause from the end of a turn?

  python benchmarks/pause_cue.py [--conversations=60] [--seconds=0.4]

For each user pause and each user turn end of `--conversations` training conversations
(forced pause_handling and turn_taking scenarios), take the log-mel frames of the last
`--seconds` before the silence and fit an L2-regularised logistic regression (numpy) on two
thirds of them; report its held-out balanced accuracy. A linear read-out of the raw frames
is a floor on what the speak gate could learn from the same audio.

Two constructions of the paused turns are measured side by side on the same draws:
  one synthesis   the corpus (tml_jax.data.scene.Scene.say_paused): the turn is synthesised
                  once and cut at the pause, so the words before it keep unfinished prosody;
  separate        each piece synthesised on its own (corpus 1.0.0), so every piece ends
                  like a sentence.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tml_jax.audio import dmel
from tml_jax.data import scenarios
from tml_jax.data.scene import Scene

FRAMES_PER_S = 40


def examples(n: int, seconds: float) -> tuple[np.ndarray, np.ndarray]:
  k = int(round(seconds * FRAMES_PER_S))
  X, Y = [], []
  for i in range(n):
    for scenario in ("pause_handling", "turn_taking"):
      c = scenarios.generate("train", i, 0, 24.0, scenario=scenario)
      mel = dmel.log_mel(c.user_wav)  # [T, 80]
      ends = [(e.start_s, 0) for e in c.events if e.kind == "pause"]
      ends += [(e.end_s, 1) for e in c.events if e.kind == "user_turn"]
      for t, y in ends:
        f = int(round(t * FRAMES_PER_S))
        if k <= f <= len(mel):
          X.append(mel[f - k:f].ravel())
          Y.append(y)
  return np.asarray(X, np.float64), np.asarray(Y)


def balanced_accuracy(X, Y, *, seed: int = 0, l2: float = 1e-2, steps: int = 3000) -> float:
  idx = np.random.default_rng(seed).permutation(len(Y))
  tr, te = idx[:len(Y) * 2 // 3], idx[len(Y) * 2 // 3:]
  mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-6
  Z = (X - mu) / sd
  w, b = np.zeros(Z.shape[1]), 0.0
  for _ in range(steps):
    p = 1 / (1 + np.exp(-(Z[tr] @ w + b)))
    w -= 0.05 * (Z[tr].T @ (p - Y[tr]) / len(tr) + l2 * w)
    b -= 0.05 * float((p - Y[tr]).mean())
  guess = (Z[te] @ w + b) > 0
  y = Y[te].astype(bool)
  return 0.5 * (float(guess[y].mean()) + float((~guess[~y]).mean()))


def separate_synthesis(self, speaker, pieces, pauses, start_s):
  """Scene.say_paused as corpus 1.0.0 built paused turns: every piece synthesised alone."""
  spans, t = [], start_s
  for i, piece in enumerate(pieces):
    end = self.place(speaker, self.synth(speaker, piece), t)
    if end is None:
      break
    if spans:
      self.event("pause", spans[-1][1], t, model_silent=True)
    spans.append((round(t, 4), round(end, 4)))
    t = end + (pauses[i] if i < len(pauses) else 0.0)
  return spans


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--conversations", type=int, default=60)
  ap.add_argument("--seconds", type=float, default=0.4)
  args = ap.parse_args()
  print("| construction | pauses | turn ends | held-out balanced accuracy | time |")
  print("|---|---|---|---|---|")
  one = Scene.say_paused
  for name, fn in (("one synthesis (corpus)", one), ("separate (corpus 1.0.0)",
                                                      separate_synthesis)):
    Scene.say_paused = fn
    try:
      t0 = time.perf_counter()
      X, Y = examples(args.conversations, args.seconds)
      acc = balanced_accuracy(X, Y)
    finally:
      Scene.say_paused = one
    print(f"| {name} | {int((Y == 0).sum())} | {int(Y.sum())} | {acc:.3f} | "
          f"{time.perf_counter() - t0:.0f} s |")


if __name__ == "__main__":
  main()
