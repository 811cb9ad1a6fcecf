"""Audio input checks, resampling and WAV files.

Every audio entry point (dMel, the vocoder's distance, the data pipeline, the server) calls
`check_wav` so that bad audio fails in one place with one kind of message (docs/design.md §3:
16 kHz mono; anything else is resampled or rejected).

Shape legend: N samples, C channels.
"""

from __future__ import annotations

import fractions
import os

import numpy as np
import scipy.io.wavfile
import scipy.signal

from tml_jax.audio.constants import SAMPLE_RATE

# Largest up/down factor we resample with. 44.1 kHz -> 16 kHz is 160/441, the worst common rate;
# anything needing bigger factors is almost surely a wrong number, not a real device rate.
_MAX_RESAMPLE_FACTOR = 1000
# Full-scale of integer PCM: dividing by it maps the type's range onto [-1, 1).
_INT_SCALE = {np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}


def to_float(wav) -> np.ndarray:
  """PCM of any common dtype -> float32 in [-1, 1) (floats are passed through, not rescaled)."""
  wav = np.asarray(wav)
  if wav.dtype in _INT_SCALE:
    return (wav / _INT_SCALE[wav.dtype]).astype(np.float32)
  if wav.dtype == np.uint8:  # 8-bit WAV is unsigned with its zero at 128
    return ((wav.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
  if np.issubdtype(wav.dtype, np.floating):
    return wav.astype(np.float32)
  raise ValueError(
      f"audio has dtype {wav.dtype}; expected float (in [-1, 1]) or int16/int32/uint8 PCM. "
      f"Convert it first, e.g. wav.astype(np.float32) / full_scale.")


def resample_ratio(sample_rate) -> tuple[int, int]:
  """(up, down) with 16000 = sample_rate * up / down, or a ValueError saying what to do."""
  rate = float(sample_rate)
  if not np.isfinite(rate) or rate <= 0 or rate != round(rate):
    raise ValueError(
        f"sample_rate={sample_rate!r} is not a positive whole number of Hz; pass the rate the "
        f"audio was recorded at (e.g. 16000, 44100, 48000).")
  ratio = fractions.Fraction(SAMPLE_RATE, int(rate))
  if max(ratio.numerator, ratio.denominator) > _MAX_RESAMPLE_FACTOR:
    raise ValueError(
        f"sample_rate={sample_rate} Hz cannot be resampled to {SAMPLE_RATE} Hz with small "
        f"polyphase factors ({ratio.numerator}/{ratio.denominator}); resample the audio to "
        f"{SAMPLE_RATE} Hz yourself (e.g. with sox or scipy.signal.resample) before passing it.")
  return ratio.numerator, ratio.denominator


FLOAT_FULL_SCALE = 2.0  # float audio beyond this is not [-1, 1] audio that clipped a little


def check_float_scale(raw, wav_N: np.ndarray, name: str) -> None:
  """Float samples are used as is, so float PCM at the int16 scale (+-32768) must fail where
  audio enters a system (the engine's input). Feature code (dMel) accepts any level: a loud
  float signal there just saturates the top bin."""
  if not np.issubdtype(np.asarray(raw).dtype, np.floating) or wav_N.size == 0:
    return
  peak = float(np.abs(wav_N).max())
  if peak > FLOAT_FULL_SCALE:
    hint = (f"{name} / 32768" if peak <= 32768 * FLOAT_FULL_SCALE else f"{name} / {peak:.4g}")
    raise ValueError(
        f"{name} is float audio with peak |x| = {peak:.6g}, but float audio must lie in "
        f"[-1, 1]; this looks like PCM at the integer scale stored as floats. Rescale it, "
        f"e.g. {hint}, or pass the int16 array itself.")


def check_wav(wav, sample_rate, *, name: str = "wav") -> np.ndarray:
  """Validates audio and returns it as float32 mono at 16 kHz, shape [N].

  Accepts [N], [N, 1] or [1, N]; float (used as is) or int16/int32/uint8 PCM (scaled to [-1, 1)).
  A rate other than 16 kHz is resampled with a polyphase filter (`scipy.signal.resample_poly`,
  which is not causal: resample a whole recording, not 200 ms pieces of a stream).
  """
  wav = np.asarray(wav)
  if wav.ndim == 2 and 1 in wav.shape:
    wav = wav.reshape(-1)
  elif wav.ndim == 2:
    raise ValueError(
        f"{name} has shape {wav.shape}: {min(wav.shape)} channels, but dMel takes mono audio. "
        f"Mix down first, e.g. {name}.mean(axis={int(np.argmin(wav.shape))}).")
  elif wav.ndim != 1:
    raise ValueError(f"{name} has shape {wav.shape}; expected mono samples of shape [N].")
  if wav.size == 0:
    raise ValueError(f"{name} is empty (0 samples); pass at least one sample of audio.")
  wav_N = to_float(wav)
  bad_N = ~np.isfinite(wav_N)
  if bad_N.any():
    raise ValueError(
        f"{name} has {int(bad_N.sum())} NaN/Inf samples out of {wav_N.size} (first at index "
        f"{int(np.argmax(bad_N))}); fix the source or replace them, e.g. np.nan_to_num({name}).")
  up, down = resample_ratio(sample_rate)
  if (up, down) != (1, 1):
    wav_N = scipy.signal.resample_poly(wav_N.astype(np.float64), up, down).astype(np.float32)
  return wav_N


def load_wav(path) -> tuple[np.ndarray, int]:
  """Reads a WAV file -> (float32 samples [N] or [N, C], sample rate). No resampling here."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no audio file at {path!r}.")
  if os.path.getsize(path) == 0:
    raise ValueError(f"{path!r} is an empty file (0 bytes), not a WAV file; re-create it.")
  try:
    sample_rate, wav = scipy.io.wavfile.read(path)
  except (ValueError, EOFError, OSError) as e:
    raise ValueError(
        f"cannot read {path!r} as a WAV file ({e}); only RIFF/WAVE PCM or float is supported, "
        f"convert other formats first (e.g. `sox in.mp3 -r 16000 -c 1 out.wav`).") from e
  if wav.shape[0] == 0:
    raise ValueError(f"{path!r} holds no samples (a WAV header with 0 frames).")
  return to_float(wav), int(sample_rate)


def to_pcm16(wav: np.ndarray) -> np.ndarray:
  """Float audio -> int16 PCM, rounded, clipped to the format's range."""
  return np.clip(np.round(wav.astype(np.float64) * 2.0**15), -2**15, 2**15 - 1).astype(np.int16)


def save_wav(path, wav, sample_rate: int = SAMPLE_RATE) -> None:
  """Writes 16-bit PCM. Samples outside [-1, 1) are clipped (the format cannot hold them)."""
  wav = to_float(wav)
  if wav.size == 0 or wav.ndim not in (1, 2):
    raise ValueError(f"cannot save audio of shape {wav.shape}; expected [N] or [N, C], N > 0.")
  if not np.isfinite(wav).all():
    raise ValueError(f"audio to save has {int((~np.isfinite(wav)).sum())} NaN/Inf samples.")
  scipy.io.wavfile.write(os.fspath(path), int(sample_rate), to_pcm16(wav))
