"""Log-mel -> waveform without a learned vocoder: filterbank inversion + (fast) Griffin-Lim.

Good enough to listen to what the flow head says and to close the loop SELF_AUDIO -> dMel in
serving and tests; a neural vocoder would replace it for quality. Same STFT as dMel (hop 400,
800-tap periodic Hann, n_fft 1024), so T frames become T*HOP samples: 8 frames = one 200 ms chunk.

Shape legend: T frames, F = N_FFT//2 + 1 frequency bins, M mel channels, N samples.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft

from tml_jax.audio import dmel
from tml_jax.audio.constants import HOP, MAG_FLOOR, N_FFT, N_MELS, SAMPLE_RATE, WIN
from tml_jax.audio.io import check_wav

# Multiplicative NNLS updates after the pseudo-inverse start: the pseudo-inverse alone leaves
# negative lobes that clipping turns into spectral holes; ~30 updates close most of the gap
# (benchmarks/vocoder.py) and cost less than one Griffin-Lim iteration.
_NNLS_STEPS = 30


@functools.cache
def _filterbank_inverse():
  """(support_F, pinv [M, S], gram [S, S]) over the S bins that some mel filter covers."""
  fb_FxM = dmel.mel_filterbank()
  support_F = fb_FxM.sum(axis=1) > 0
  fb_SxM = fb_FxM[support_F]
  return support_F, np.linalg.pinv(fb_SxM), fb_SxM @ fb_SxM.T


def mel_to_magnitude(log_mel_TxM, *, nnls_steps: int = _NNLS_STEPS) -> np.ndarray:
  """Non-negative linear magnitudes [T, F] whose mel projection approximates 10**log_mel.

  80 equations for 513 unknowns per frame: start from the minimum-norm (pseudo-inverse)
  solution clipped at the floor, then run Lee-Seung multiplicative updates, which keep every
  entry >= 0 and decrease ||mag @ fb - mel||^2. Bins outside [FMIN, FMAX] get no filter
  weight and stay 0.
  """
  support_F, pinv_MxS, gram_SxS = _filterbank_inverse()
  mel_TxM = 10.0 ** np.asarray(log_mel_TxM, np.float64)
  fb_SxM = dmel.mel_filterbank()[support_F]
  mag_TxS = np.maximum(mel_TxM @ pinv_MxS, MAG_FLOOR)
  target_TxS = mel_TxM @ fb_SxM.T
  for _ in range(nnls_steps):
    # The floor keeps entries out of float64's subnormal range, where every multiply costs
    # ~100x (the updates shrink unneeded bins geometrically) and the update could stall at 0.
    mag_TxS = np.maximum(mag_TxS * target_TxS / (mag_TxS @ gram_SxS), MAG_FLOOR)
  mag_TxF = np.zeros((mag_TxS.shape[0], support_F.size))
  mag_TxF[:, support_F] = mag_TxS
  return mag_TxF


def istft(spec_TxF: np.ndarray, num_samples: int) -> np.ndarray:
  """Least-squares inverse of `dmel.stft`: overlap-add of windowed frames / sum of window^2."""
  t = spec_TxF.shape[0]
  half = WIN // 2
  if half != HOP:
    raise NotImplementedError("overlap-add below assumes WIN == 2*HOP (the dMel recipe)")
  w_W = dmel.window()
  frames_TxW = scipy.fft.irfft(spec_TxF, n=N_FFT, axis=-1)[:, :WIN] * w_W
  # With WIN == 2*HOP, row r of the buffer (original samples [(r-1)*HOP, r*HOP)) gets the first
  # half of frame r and the second half of frame r-1. The window^2 sum is built the same way,
  # so the last partial hop, covered by one frame only, is normalised correctly too.
  buf_RxH, wsum_RxH = np.zeros((t + 1, half)), np.zeros((t + 1, half))
  buf_RxH[:-1] += frames_TxW[:, :half]
  buf_RxH[1:] += frames_TxW[:, half:]
  wsum_RxH[:-1] += w_W[:half] ** 2
  wsum_RxH[1:] += w_W[half:] ** 2
  wav_N = (buf_RxH / np.maximum(wsum_RxH, 1e-8)).reshape(-1)[half:half + num_samples]
  if wav_N.size < num_samples:
    raise ValueError(f"{t} frames cover at most {wav_N.size} samples, not {num_samples}.")
  return wav_N


def griffin_lim(mag_TxF: np.ndarray, num_samples: int, *, n_iter: int = 32, seed: int = 0,
                momentum: float = 0.99) -> np.ndarray:
  """Phase retrieval for a centred STFT with T = 1 + num_samples//HOP frames.

  Fast Griffin-Lim (Perraudin, Balazs & Sondergaard 2013): alternate projections on the
  consistent spectrograms and on the target magnitude, extrapolated with `momentum`; 0.99 is
  their recommended value and converges several times faster than plain GL (momentum=0).
  n_iter=0 returns random phase, the baseline the tests compare against.
  """
  if mag_TxF.shape[0] != dmel.num_frames(num_samples):
    raise ValueError(f"{mag_TxF.shape[0]} frames do not match {num_samples} samples "
                     f"(a centred STFT has 1 + N//{HOP} = {dmel.num_frames(num_samples)}).")
  rng = np.random.default_rng(seed)
  phase_TxF = np.exp(2j * np.pi * rng.random(mag_TxF.shape))
  prev_TxF = np.zeros_like(phase_TxF)
  for _ in range(n_iter):
    rebuilt_TxF = dmel.stft(istft(mag_TxF * phase_TxF, num_samples)[None])[0]
    accel_TxF = rebuilt_TxF + momentum * (rebuilt_TxF - prev_TxF)
    prev_TxF = rebuilt_TxF
    phase_TxF = accel_TxF / np.maximum(np.abs(accel_TxF), 1e-30)
  return istft(mag_TxF * phase_TxF, num_samples)


def vocode(log_mel_TxM, *, n_iter: int = 32, seed: int = 0) -> np.ndarray:
  """Clipped log10 mel [T, 80] (dMel's `log_mel` or `decode` output) -> float32 wav [T*HOP].

  T*HOP samples need T+1 centred frames; the missing last one (centred on the final sample,
  read from reflect padding offline) is taken equal to frame T-1.
  """
  log_mel_TxM = np.asarray(log_mel_TxM, np.float64)
  if log_mel_TxM.ndim != 2 or log_mel_TxM.shape[1] != N_MELS or not log_mel_TxM.shape[0]:
    raise ValueError(f"vocode takes log-mel frames [T, {N_MELS}] with T >= 1, got shape "
                     f"{log_mel_TxM.shape}; decode dMel tokens with dmel.decode first.")
  if not np.isfinite(log_mel_TxM).all():
    raise ValueError("vocode got NaN/Inf log-mel values; check the model output.")
  mag_TxF = mel_to_magnitude(log_mel_TxM)
  mag_TxF = np.concatenate([mag_TxF, mag_TxF[-1:]], axis=0)
  num_samples = log_mel_TxM.shape[0] * HOP
  return griffin_lim(mag_TxF, num_samples, n_iter=n_iter, seed=seed).astype(np.float32)


def spectral_distance(wav_a, wav_b, sample_rate: int = SAMPLE_RATE) -> dict[str, float]:
  """How far apart two waveforms sound, phase ignored. Both are cut to the shorter length.

  log_mel_l1: mean |log_mel(a) - log_mel(b)| in log10 units (dMel's bin step is 0.6).
  spectral_convergence: || |S_a| - |S_b| ||_F / || |S_a| ||_F on the linear STFT magnitude.
  """
  a_N, b_N = check_wav(wav_a, sample_rate, name="wav_a"), check_wav(wav_b, sample_rate,
                                                                    name="wav_b")
  n = min(a_N.size, b_N.size)
  a_N, b_N = a_N[:n], b_N[:n]
  log_l1 = float(np.mean(np.abs(dmel.log_mel(a_N) - dmel.log_mel(b_N))))
  mag_a, mag_b = np.abs(dmel.stft(a_N[None])[0]), np.abs(dmel.stft(b_N[None])[0])
  sc = float(np.linalg.norm(mag_a - mag_b) / max(np.linalg.norm(mag_a), 1e-30))
  return {"log_mel_l1": log_l1, "spectral_convergence": sc}
