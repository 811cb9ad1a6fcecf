"""Reference systems run through the same harness as the model: each turns a sample's
input.wav (the user channel) into output.wav (time-aligned, same length) and monologue.json
(the words it played, with the synthesiser's times), causally: what it plays at time t
depends only on the input before t. Like the model, a baseline is scored on the ASR of its
output.wav (the harness writes output.json); monologue.json shows how well that ASR hears
eSpeak speech whose words are known.

- `VadCascade(endpoint_s)` ("vad_0.5s", "vad_0.8s"): the classic cascade. The Silero VAD,
  run causally on 32 ms windows (`tml_jax.eval.vad.StreamingVad`), follows the user; after
  `endpoint_s` of silence following at least `min_turn_s` of user speech the system plays
  a fixed utterance, and stops (20 ms fade) when the user speaks over it for `barge_in_s`.
  A real cascade adds ASR, LLM and TTS time on top, so its latencies here are lower bounds
  for that design.
- `Silent` ("silent"): never speaks.
- `AlwaysTalking` ("always_talking"): plays a long utterance on a loop from t = 0.

The fixed utterances are synthesised once per system with eSpeak NG in one of the corpus's
model voices.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tml_jax.audio import io as audio_io
from tml_jax.eval import vad as vad_lib

SR = audio_io.SAMPLE_RATE
REPLY_TEXT = "Okay, let me think about that for a second."
MONOLOGUE_TEXT = ("I will just keep on talking about the weather and the news, whatever you "
                  "say, because nobody taught me when to stop.")
VOICE = "en-us+f3"  # speech.MODEL_VOICES[0]
FADE = 320  # 20 ms


def write_output(out_dir: str, wav_N: np.ndarray, words: list[tuple[str, float, float]]):
  """output.wav (16 kHz int16) and monologue.json (the words played, in the benchmark's
  transcript shape)."""
  os.makedirs(out_dir, exist_ok=True)
  audio_io.save_wav(os.path.join(out_dir, "output.wav"), wav_N, SR)
  chunks = [{"text": w, "timestamp": [round(a, 3), round(b, 3)]} for w, a, b in words]
  with open(os.path.join(out_dir, "monologue.json"), "w") as f:
    json.dump({"text": " ".join(w for w, _, _ in words), "chunks": chunks}, f, indent=1)


def _synth(text: str):
  from tml_jax.data import speech
  return speech.synth(text, VOICE, rate_wpm=175, pitch=50)


def _place(out_N: np.ndarray, utt, start: int, stop: int | None = None
           ) -> list[tuple[str, float, float]]:
  """Mix utt into out_N from sample `start`, cut with a fade at `stop`; the words played
  (a word cut within its first 20 ms was not said)."""
  b = min(len(out_N), start + len(utt.wav), stop if stop is not None else len(out_N))
  if b <= start:
    return []
  seg = utt.wav[:b - start].copy()
  if b - start < len(utt.wav):
    fade = min(FADE, b - start)
    seg[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
  out_N[start:b] += seg
  t0, t_end = start / SR, b / SR
  return [(w, round(t0 + a, 4), round(min(t0 + e, t_end), 4)) for w, a, e in utt.words
          if t0 + a < t_end - 0.02]


class Silent:
  name = "silent"

  def respond(self, wav_N: np.ndarray, out_dir: str) -> None:
    write_output(out_dir, np.zeros(len(wav_N), np.float32), [])


class AlwaysTalking:
  name = "always_talking"

  def __init__(self, gap_s: float = 0.15):
    self.gap = int(gap_s * SR)
    self._utt = None

  def respond(self, wav_N: np.ndarray, out_dir: str) -> None:
    self._utt = self._utt or _synth(MONOLOGUE_TEXT)
    out_N, words, t = np.zeros(len(wav_N), np.float32), [], 0
    while t < len(out_N):
      words += _place(out_N, self._utt, t)
      t += len(self._utt.wav) + self.gap
    write_output(out_dir, out_N, words)


class VadCascade:
  """Endpoint after `endpoint_s` of silence, reply with a fixed utterance, yield on barge-in."""

  def __init__(self, endpoint_s: float, *, min_turn_s: float = 0.2, barge_in_s: float = 0.2):
    if endpoint_s <= 0:
      raise ValueError(f"endpoint_s={endpoint_s}: the silence before replying must be > 0 s")
    self.endpoint_s, self.min_turn_s, self.barge_in_s = endpoint_s, min_turn_s, barge_in_s
    self.name = f"vad_{endpoint_s:g}s"
    self._utt = None

  def respond(self, wav_N: np.ndarray, out_dir: str) -> None:
    out_N, words = self.run(wav_N)
    write_output(out_dir, out_N, words)

  def run(self, wav_N: np.ndarray) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    self._utt = self._utt or _synth(REPLY_TEXT)
    vad = vad_lib.StreamingVad()
    frame, fs = vad.frame, vad.frame_s
    out_N, words = np.zeros(len(wav_N), np.float32), []
    turn_s, last_speech = 0.0, None     # user speech in the current turn, end of its last frame
    playing, play_start = False, 0      # reply state (sample index where it started)
    user_on_s = 0.0                     # how long the user has been talking without a break
    for f in range(len(wav_N) // frame):
      is_speech = vad.push(wav_N[f * frame:(f + 1) * frame])
      now = (f + 1) * fs  # the decision is made once this frame has been heard
      user_on_s = user_on_s + fs if vad.in_speech else 0.0
      if is_speech and vad.in_speech:
        turn_s += fs
        last_speech = now
      if playing:
        ended = int(round(now * SR)) >= play_start + len(self._utt.wav)
        barged = user_on_s >= self.barge_in_s - 1e-9
        if barged or ended:
          cut = min(int(round(now * SR)), play_start + len(self._utt.wav))
          words += _place(out_N, self._utt, play_start, cut)
          playing = False
          turn_s = user_on_s if barged else 0.0  # the barge-in is the start of a new turn
      elif (last_speech is not None and turn_s >= self.min_turn_s - 1e-9
            and now - last_speech >= self.endpoint_s - 1e-9):
        playing, play_start = True, int(round(now * SR))
        turn_s, last_speech = 0.0, None
    if playing:
      words += _place(out_N, self._utt, play_start)
    return out_N, words


def make(name: str):
  """A baseline by its harness name: silent, always_talking, vad_<seconds>s."""
  if name == "silent":
    return Silent()
  if name == "always_talking":
    return AlwaysTalking()
  if name.startswith("vad_") and name.endswith("s"):
    try:
      return VadCascade(float(name[4:-1]))
    except ValueError:
      pass
  raise ValueError(f"unknown baseline {name!r}; expected silent, always_talking or "
                   f"vad_<endpoint seconds>s such as vad_0.5s")
