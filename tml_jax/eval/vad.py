"""A causal energy VAD with an adaptive noise floor, a zero-crossing check and hangover.

Used twice by the evaluation: to find when a system speaks in its output.wav (FD-bench v1.5
measures stop and response times with a VAD, and our `stop_s` does too), and inside the VAD
cascade baselines, which must decide frame by frame without looking ahead.

Per 20 ms frame we compute the mean-square energy in dB (re. full scale) and the zero-crossing
rate. A frame is raw speech when its energy is `margin_db` above the running noise floor and
above the absolute floor `abs_db`; a frame whose zero-crossing rate looks like noise
(fricatives do too) must clear the floor by another `zcr_extra_db`. The noise floor is the
quietest frame of the last `floor_window_s` (minimum statistics, Martin 2001): speech always
has quiet frames between words, so the floor does not climb into speech, and a steady noise
becomes the floor after one window. Before the first window has passed, frames "before t = 0"
count as `floor_init_db`, so speech from the very start is not taken for the noise. Speech
starts after `min_on_s` of consecutive raw speech (a click is not a turn) and the state stays
"speech" through gaps shorter than `hangover_s` (the gaps between words).

Shape legend: N samples at 16 kHz, F frames.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

SAMPLE_RATE = 16000


@dataclasses.dataclass(frozen=True)
class VadConfig:
  frame_s: float = 0.02
  margin_db: float = 9.0        # above the noise floor
  abs_db: float = -60.0         # never speech below this (mean-square dBFS)
  zcr_max: float = 0.35         # sign changes per sample above which a frame is noise-like
  zcr_extra_db: float = 5.0     # noise-like frames must be this much louder again
  floor_window_s: float = 2.0
  floor_prior_s: float = 0.3    # how long floor_init_db stays in the floor's window
  floor_init_db: float = -70.0  # a quiet room: speech from t=0 must not become the floor
  floor_min_db: float = -90.0   # digital silence would pull the floor to -inf
  min_on_s: float = 0.04
  hangover_s: float = 0.3

  @property
  def frame(self) -> int:
    return int(round(self.frame_s * SAMPLE_RATE))


def frame_features(wav_N: np.ndarray, frame: int) -> tuple[np.ndarray, np.ndarray]:
  """(energy_db [F], zcr [F]) of consecutive frames; a partial last frame is dropped.

  Each frame's features depend on that frame only, so computing them in one vectorised pass
  is still causal.
  """
  n = len(wav_N) // frame
  x_FxS = np.asarray(wav_N[:n * frame], np.float64).reshape(n, frame)
  energy_F = 10.0 * np.log10(np.mean(x_FxS**2, axis=1) + 1e-12)
  signs_FxS = np.signbit(x_FxS)
  zcr_F = np.mean(signs_FxS[:, 1:] != signs_FxS[:, :-1], axis=1) if frame > 1 else np.zeros(n)
  return energy_F, zcr_F


class StreamingVad:
  """Feed frames in time order with `push`; decisions use only the frames seen so far."""

  def __init__(self, cfg: VadConfig = VadConfig()):
    self.cfg = cfg
    self.floor_db = cfg.floor_init_db
    self.frames = 0
    self._window = max(1, int(round(cfg.floor_window_s / cfg.frame_s)))
    self._mins = collections.deque()  # (frame index, energy), energies increasing: window min
    self.run = 0          # consecutive raw speech frames
    self.gap = 0          # consecutive raw non-speech frames
    self.in_speech = False

  def raw(self, energy_db: float, zcr: float) -> bool:
    c = self.cfg
    need = max(self.floor_db + c.margin_db, c.abs_db)
    if zcr > c.zcr_max:
      need += c.zcr_extra_db
    return energy_db > need

  def push_features(self, energy_db: float, zcr: float) -> bool:
    """One frame's features -> raw decision (the state is updated; see `in_speech`)."""
    c = self.cfg
    is_speech = self.raw(energy_db, zcr)
    e, i = max(energy_db, c.floor_min_db), self.frames
    while self._mins and self._mins[-1][1] >= e:
      self._mins.pop()
    self._mins.append((i, e))
    while self._mins[0][0] <= i - self._window:
      self._mins.popleft()
    self.frames += 1
    self.floor_db = self._mins[0][1]
    if self.frames * c.frame_s < c.floor_prior_s - 1e-9:
      self.floor_db = min(self.floor_db, c.floor_init_db)
    if is_speech:
      self.run, self.gap = self.run + 1, 0
      if self.run * c.frame_s >= c.min_on_s - 1e-9:
        self.in_speech = True
    else:
      self.run, self.gap = 0, self.gap + 1
      if self.gap * c.frame_s >= c.hangover_s - 1e-9:
        self.in_speech = False
    return is_speech

  def push(self, frame_S: np.ndarray) -> bool:
    energy, zcr = frame_features(frame_S, len(frame_S))
    return self.push_features(float(energy[0]), float(zcr[0]))


def segments(wav_N: np.ndarray, cfg: VadConfig = VadConfig()) -> list[tuple[float, float]]:
  """Speech segments [(start_s, end_s)] of a whole recording, causally decided.

  A segment starts at the first frame of the run that confirmed the onset and ends at the end
  of its last raw speech frame (the hangover bridges gaps but is not counted as speech).
  """
  energy_F, zcr_F = frame_features(np.asarray(wav_N, np.float32), cfg.frame)
  vad = StreamingVad(cfg)
  out: list[list[float]] = []
  for f in range(len(energy_F)):
    was = vad.in_speech
    is_speech = vad.push_features(float(energy_F[f]), float(zcr_F[f]))
    t1 = (f + 1) * cfg.frame_s
    if vad.in_speech and not was:
      out.append([t1 - vad.run * cfg.frame_s, t1])
    elif vad.in_speech and is_speech:
      out[-1][1] = t1
  return [(round(a, 4), round(b, 4)) for a, b in out]


def active_at(segs: list[tuple[float, float]], t: float) -> tuple[float, float] | None:
  """The segment covering time t (start <= t < end), if any."""
  return next(((a, b) for a, b in segs if a <= t < b), None)
