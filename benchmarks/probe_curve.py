r"""The speak-decision probe against training steps, for several runs side by side.

  python benchmarks/probe_curve.py --run=20min:runs/tiny --run=50min:runs/tiny_long \
      --out=probe_vs_steps.png

Reads each run's metrics.jsonl (the validation records the trainer writes every
`train.eval_every` steps) and plots the teacher-forced P(speak next chunk) while the model
is silent, in a mid-utterance pause (should stay low) and 0-1 s after the user's turn ended
(should be high), with their gap: the separation a serving threshold needs. Prints the same
as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os


def probe_rows(workdir: str) -> list[dict]:
  """The validation records with the probe's silent-now columns, by step (last one wins)."""
  by_step = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "val_probe_pause_silent_now" in r and "val_probe_after_turn_end_silent_now" in r:
        by_step[r["step"]] = r
  return [by_step[s] for s in sorted(by_step)]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--run", action="append", required=True, help="LABEL:WORKDIR (repeatable)")
  ap.add_argument("--out", default="probe_vs_steps.png")
  args = ap.parse_args(argv)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax, gx) = plt.subplots(1, 2, figsize=(10, 3.6))
  print("| run | step | pause | after turn end | gap | threshold | onset recall |")
  print("|---|---|---|---|---|---|---|")
  for spec in args.run:
    label, _, workdir = spec.partition(":")
    rows = probe_rows(workdir)
    if not rows:
      raise SystemExit(f"{workdir}/metrics.jsonl holds no probe records; train with a speak "
                       "gate (model.speak_gate) and eval_every below num_steps")
    steps = [r["step"] for r in rows]
    pause = [r["val_probe_pause_silent_now"] for r in rows]
    turn = [r["val_probe_after_turn_end_silent_now"] for r in rows]
    line, = ax.plot(steps, turn, "-o", ms=3, label=f"{label}: after turn end")
    ax.plot(steps, pause, "--o", ms=3, color=line.get_color(), label=f"{label}: pause")
    gx.plot(steps, [t - p for t, p in zip(turn, pause)], "-o", ms=3, color=line.get_color(),
            label=label)
    for r, p, t in zip(rows, pause, turn):
      print(f"| {label} | {r['step']} | {p:.3f} | {t:.3f} | {t - p:+.3f} | "
            f"{r.get('val_probe_threshold', float('nan')):.3f} | "
            f"{r.get('val_probe_onset_recall', float('nan')):.3f} |")
  ax.set(xlabel="training step", ylabel="P(speak next) while silent",
         title="teacher-forced speak probe")
  gx.axhline(0, color="k", lw=0.5)
  gx.set(xlabel="training step", ylabel="after-turn-end minus pause",
         title="separation the threshold needs")
  ax.legend(fontsize=6)
  gx.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
