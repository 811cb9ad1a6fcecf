"""Microphone-side augmentation: noise, gain and echo of the model's own voice (docs/design.md §6).

Only the user channel (what the model hears) is augmented; the model channel stays clean
because it is the target the flow head learns to produce. Every random choice is drawn from
the generator passed in, so a conversation's (seed, split, index) fixes its bytes.

Shape legend: N samples.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NOISE_KINDS = ("none", "white", "pink", "babble")


@dataclasses.dataclass(frozen=True)
class MicParams:
  """One draw of the augmentation; stored in the conversation's metadata for analysis."""
  noise: str = "none"
  snr_db: float = 99.0
  gain_db: float = 0.0
  echo_delay_s: float = 0.0   # 0: no echo
  echo_db: float = -99.0      # level of the model's voice in the mic, re. the model channel


def sample_params(rng: np.random.Generator) -> MicParams:
  noise = NOISE_KINDS[rng.choice(4, p=[0.2, 0.3, 0.3, 0.2])]
  echo = rng.random() < 0.5
  return MicParams(
      noise=noise, snr_db=round(float(rng.uniform(5.0, 35.0)), 2),
      gain_db=round(float(rng.uniform(-6.0, 3.0)), 2),
      # Speaker-to-mic paths of laptops and phones: tens of ms, well below the direct voice.
      echo_delay_s=round(float(rng.uniform(0.02, 0.2)), 3) if echo else 0.0,
      echo_db=round(float(rng.uniform(-30.0, -12.0)), 2) if echo else -99.0)


def white_noise(rng: np.random.Generator, n: int) -> np.ndarray:
  return rng.standard_normal(n).astype(np.float32)


def pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
  """1/f noise: white noise shaped by 1/sqrt(f) in the frequency domain."""
  spec = np.fft.rfft(rng.standard_normal(n))
  f = np.arange(spec.size, dtype=np.float64)
  spec /= np.sqrt(np.maximum(f, 1.0))
  x = np.fft.irfft(spec, n)
  return (x / max(x.std(), 1e-9)).astype(np.float32)


def babble(rng: np.random.Generator, n: int, speech_pool: list[np.ndarray]) -> np.ndarray:
  """Crowd noise: time-reversed, randomly shifted speech summed from several talkers.

  Reversal keeps the spectrum and rhythm of speech but removes intelligible words, so babble
  never carries words the model could mistake for the user's.
  """
  out = np.zeros(n, np.float32)
  for wav in speech_pool:
    rev = wav[::-1]
    reps = np.tile(rev, -(-n // max(len(rev), 1)) + 1)
    start = int(rng.integers(0, max(len(rev), 1)))
    out += reps[start:start + n]
  return out / max(out.std(), 1e-9)


def rms(x: np.ndarray, active_only: bool = True) -> float:
  """RMS; with active_only, over 20 ms frames above -40 dB re. the loudest (speech level)."""
  if not active_only:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)) + 1e-20))
  n = len(x) // 320 * 320
  e = np.square(x[:n].reshape(-1, 320), dtype=np.float64).mean(1)
  if e.size == 0 or e.max() <= 0:
    return 0.0
  return float(np.sqrt(e[e > e.max() * 1e-4].mean()))


def echo(model_N: np.ndarray, delay_s: float, level_db: float, sample_rate: int) -> np.ndarray:
  """The model's voice as the mic picks it up: delayed, attenuated, slightly low-passed."""
  d = int(round(delay_s * sample_rate))
  out = np.zeros_like(model_N)
  if d >= len(model_N):
    return out
  out[d:] = model_N[:len(model_N) - d]
  # A one-pole low-pass stands in for a small loudspeaker's response; cheap and stable.
  out[1:] = 0.6 * out[1:] + 0.4 * out[:-1]
  return out * np.float32(10 ** (level_db / 20))


def apply(params: MicParams, rng: np.random.Generator, user_N: np.ndarray,
          model_N: np.ndarray, sample_rate: int,
          speech_pool: list[np.ndarray] | None = None) -> np.ndarray:
  """Microphone signal: gain x (user + others) + echo of the model + noise at params.snr_db.

  user_N already holds every talker in the room (user and others); the SNR is measured
  against the speech level of user_N. Returns float32 [N], clipped to [-1, 1].
  """
  mic = user_N * np.float32(10 ** (params.gain_db / 20))
  level = rms(mic) or 0.1  # the talkers' speech level, before echo: the SNR's reference
  if params.echo_delay_s > 0:
    mic = mic + echo(model_N, params.echo_delay_s, params.echo_db, sample_rate)
  if params.noise != "none":
    n = len(mic)
    if params.noise == "white":
      noise = white_noise(rng, n)
    elif params.noise == "pink":
      noise = pink_noise(rng, n)
    elif params.noise == "babble":
      if not speech_pool:
        raise ValueError("noise='babble' needs speech_pool (a list of float32 speech arrays)")
      noise = babble(rng, n, speech_pool)
    else:
      raise ValueError(f"noise={params.noise!r}: expected one of {NOISE_KINDS}")
    mic = mic + noise * np.float32(level * 10 ** (-params.snr_db / 20))
  return np.clip(mic, -1.0, 1.0).astype(np.float32)
