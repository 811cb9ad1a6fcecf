"""dMel: discretised log-mel frames, the audio tokens of the interaction model (docs/design.md §3).

The published recipe (Bai et al., "dMel: Speech Tokenization made Simple", arXiv 2407.15835):
16 kHz mono; centred STFT (reflect padding of n_fft//2 on both sides, frame t centred on sample
t*HOP, so N samples give 1 + N//HOP frames); periodic Hann window of WIN samples zero-padded on
both sides to N_FFT; magnitude floored at 1e-10; 80 Slaney mel filters (as `librosa.filters.mel`
defaults) from FMIN to FMAX; log10; clip to [LOG_MIN, LOG_MAX]; 16 uniform bins, nearest bin.

Only the WIN non-zero taps of the window touch the signal, so frame t reads exactly samples
[t*HOP - WIN/2, t*HOP + WIN/2) and we FFT those (zero-padded to N_FFT). That equals the
N_FFT-window recipe up to a linear phase, which the magnitude does not see.

Causality at chunk granularity: chunk c holds frames [K*c, K*c + K) (K = frames_per_chunk,
8 for 200 ms). Its last frame reads samples up to (K*c + K - 1)*HOP + WIN/2 - 1 = end of chunk c
minus one sample (WIN/2 == HOP). So a chunk's frames never read the future, and never read the
right-hand reflect padding either: encoding any prefix that ends on a chunk boundary gives
exactly the frames of those chunks (tests/test_audio.py checks it; `DMelStream` relies on it).
The only frame of `encode(wav)` that does read the right padding is the very last one (centred
on sample N when N is a multiple of HOP), and the chunked views drop it.

Range in practice: with magnitudes (not power) and area-normalised filters, audio inside
[-1, 1] peaks near log10 = 1 (a full-scale tone 0.94, eSpeak speech 0.4), so bins 14-15 need a
gain above ~5; digital silence is -7 (bin 0) everywhere.

Shape legend: B batch, N samples, T frames, F = N_FFT//2 + 1 frequency bins, M mel channels,
C chunks, K frames per chunk.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft

# The recipe's numbers live in constants (one definition for the repository); they are
# imported by name so that dmel.HOP etc. keep working for callers.
from tml_jax.audio.constants import (FMAX, FMIN, FRAMES_PER_CHUNK, HOP, LOG_MAX, LOG_MIN,
                                     MAG_FLOOR, N_FFT, N_MELS, NUM_BINS, SAMPLE_RATE, WIN)
from tml_jax.audio.io import check_wav

BIN_STEP = (LOG_MAX - LOG_MIN) / (NUM_BINS - 1)  # 0.6

# Bin centres -7.0, -6.4, ..., 2.0 and the 15 decision edges halfway between them. The edges are
# float32 like `log_mel`'s output, so "exactly halfway" is a well defined float: a value equal
# to an edge goes to the upper (louder) bin.
BIN_CENTRES = np.linspace(LOG_MIN, LOG_MAX, NUM_BINS).astype(np.float32)
BIN_EDGES = (LOG_MIN + BIN_STEP * (np.arange(NUM_BINS - 1) + 0.5)).astype(np.float32)
# Frames per FFT block: bounds memory at ~70 MB of complex128 whatever the audio length.
_BLOCK_FRAMES = 8192


def hz_to_mel(hz):
  """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, log above."""
  hz = np.asarray(hz, np.float64)
  lin_step = 200.0 / 3  # Hz per mel below 1 kHz
  log_step = np.log(6.4) / 27.0  # natural-log units per mel above 1 kHz
  return np.where(hz < 1000.0, hz / lin_step,
                  1000.0 / lin_step + np.log(np.maximum(hz, 1e-12) / 1000.0) / log_step)


def mel_to_hz(mel):
  mel = np.asarray(mel, np.float64)
  lin_step, log_step, mel_1k = 200.0 / 3, np.log(6.4) / 27.0, 1000.0 / (200.0 / 3)
  return np.where(mel < mel_1k, mel * lin_step, 1000.0 * np.exp(log_step * (mel - mel_1k)))


@functools.cache
def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
  """Triangular Slaney filters with area normalisation, float64 [F, M] (librosa's, transposed).

  Filter m rises from edge m to edge m+1 and falls to edge m+2 (edges evenly spaced in mel),
  then is scaled by 2 / (bandwidth in Hz) so every filter has the same area.
  """
  freqs_F = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
  edges_Hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
  lo, mid, hi = edges_Hz[:-2], edges_Hz[1:-1], edges_Hz[2:]
  rise_FxM = (freqs_F[:, None] - lo) / (mid - lo)
  fall_FxM = (hi - freqs_F[:, None]) / (hi - mid)
  fb_FxM = np.maximum(0.0, np.minimum(rise_FxM, fall_FxM)) * (2.0 / (hi - lo))
  fb_FxM.setflags(write=False)  # cached and shared: nobody may scale it in place
  return fb_FxM


@functools.cache
def window() -> np.ndarray:
  """The non-zero part of the recipe's window: periodic Hann of WIN taps (float64 [WIN])."""
  w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN) / WIN)
  w.setflags(write=False)
  return w


def num_frames(num_samples: int) -> int:
  """Frames of a centred STFT: 1 + N // HOP (frame t is centred on sample t*HOP)."""
  return 1 + num_samples // HOP


def _frames(padded_BxN: np.ndarray, start: int, stop: int) -> np.ndarray:
  """Windowed frames [B, stop-start, WIN] of an already reflect-padded signal."""
  piece_BxN = padded_BxN[:, start * HOP:(stop - 1) * HOP + N_FFT]
  first = N_FFT // 2 - WIN // 2  # window taps [first, first + WIN) of the N_FFT frame are non-zero
  view_BxTxW = np.lib.stride_tricks.sliding_window_view(piece_BxN, WIN, axis=1)
  return view_BxTxW[:, first::HOP][:, :stop - start] * window()


def _pad(wav_BxN: np.ndarray) -> np.ndarray:
  # numpy's reflect keeps reflecting when the pad exceeds the signal, so inputs shorter than
  # the pad (down to one sample) still give 1 + N//HOP frames (librosa would raise instead).
  return np.pad(np.asarray(wav_BxN, np.float64), ((0, 0), (N_FFT // 2, N_FFT // 2)),
                mode="reflect")


def stft(wav_BxN: np.ndarray) -> np.ndarray:
  """Complex STFT [B, T, F] of 16 kHz float audio, the recipe's framing (no magnitude floor).

  The phase is that of the WIN-tap frame zero-padded on the right; `vocoder.istft` inverts it.
  """
  padded_BxN = _pad(wav_BxN)
  return scipy.fft.rfft(_frames(padded_BxN, 0, num_frames(wav_BxN.shape[1])), n=N_FFT, axis=-1)


def _log_mel_16k(wav_BxN: np.ndarray) -> np.ndarray:
  b, n = np.shape(wav_BxN)
  t = num_frames(n)
  out_BxTxM = np.empty((b, t, N_MELS), np.float32)
  fb_FxM = mel_filterbank()
  padded_BxN = _pad(wav_BxN)
  # Blocks of frames bound memory; each block reads exactly the samples the one-shot STFT would.
  for start in range(0, t, _BLOCK_FRAMES):
    stop = min(t, start + _BLOCK_FRAMES)
    spec_BxTxF = scipy.fft.rfft(_frames(padded_BxN, start, stop), n=N_FFT, axis=-1)
    mel_BxTxM = np.maximum(np.abs(spec_BxTxF), MAG_FLOOR) @ fb_FxM
    out_BxTxM[:, start:stop] = np.clip(np.log10(mel_BxTxM), LOG_MIN, LOG_MAX)
  return out_BxTxM


def log_mel(wav, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Clipped log10 mel magnitudes, float32 [T, M], T = 1 + N//HOP (flow-matching targets)."""
  return _log_mel_16k(check_wav(wav, sample_rate)[None])[0]


def log_mel_batch(wav_BxN, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """`log_mel` of B equal-length clips at once, float32 [B, T, M] (one FFT call per block)."""
  wav_BxN = np.asarray(wav_BxN)
  if wav_BxN.ndim != 2:
    raise ValueError(f"log_mel_batch takes [batch, samples], got shape {wav_BxN.shape}; "
                     f"pad clips to a common length or call log_mel per clip.")
  return _log_mel_16k(np.stack([check_wav(w, sample_rate, name=f"wav[{i}]")
                                for i, w in enumerate(wav_BxN)]))


def quantize(log_mel_xM) -> np.ndarray:
  """Nearest bin index (int32, 0..15) of clipped log-mel values; ties go to the upper bin."""
  log_mel_xM = np.asarray(log_mel_xM, np.float32)
  return np.searchsorted(BIN_EDGES, log_mel_xM, side="right").astype(np.int32)


def decode(bins_xM) -> np.ndarray:
  """Bin indices -> bin centre values in log10 units, float32, same shape."""
  bins_xM = np.asarray(bins_xM)
  if bins_xM.size and (bins_xM.min() < 0 or bins_xM.max() >= NUM_BINS):
    raise ValueError(f"dMel bins must lie in [0, {NUM_BINS}), got range "
                     f"[{bins_xM.min()}, {bins_xM.max()}]; pass the output of encode().")
  return BIN_CENTRES[bins_xM]


def encode(wav, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """dMel tokens int32 [T, M] with T = 1 + N//HOP (at 16 kHz)."""
  return quantize(log_mel(wav, sample_rate))


def encode_batch(wav_BxN, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  return quantize(log_mel_batch(wav_BxN, sample_rate))


def _chunked(values_TxM: np.ndarray, num_samples: int, frames_per_chunk: int) -> np.ndarray:
  if frames_per_chunk < 1:
    raise ValueError(f"frames_per_chunk={frames_per_chunk}; it must be >= 1 (8 for 200 ms).")
  c = num_samples // (HOP * frames_per_chunk)  # whole chunks only; a partial tail is dropped
  return values_TxM[:c * frames_per_chunk].reshape(c, frames_per_chunk, N_MELS)


def log_mel_chunks(wav, sample_rate: int = SAMPLE_RATE,
                   frames_per_chunk: int = FRAMES_PER_CHUNK) -> np.ndarray:
  """`log_mel` grouped by micro-turn: float32 [C, K, M], C = N // (HOP*K), frame t in chunk t//K.

  Causal at chunk granularity (see the module docstring): chunk c depends only on samples of
  chunks 0..c. A trailing partial chunk, and the final frame that reads the padding, are dropped.
  """
  wav_N = check_wav(wav, sample_rate)
  return _chunked(_log_mel_16k(wav_N[None])[0], wav_N.size, frames_per_chunk)


def encode_chunks(wav, sample_rate: int = SAMPLE_RATE,
                  frames_per_chunk: int = FRAMES_PER_CHUNK) -> np.ndarray:
  """dMel tokens grouped by micro-turn: int32 [C, K, M] (see `log_mel_chunks`)."""
  return quantize(log_mel_chunks(wav, sample_rate, frames_per_chunk))


class DMelStream:
  """Chunk-by-chunk dMel for the live loop: `push` of chunk c equals `log_mel_chunks(...)[c]`.

  Keeps the last WIN/2 samples: the first frame of a chunk is centred on the chunk's first
  sample and reaches back half a window. Before the first chunk there is no history, so the
  first chunk is reflect-padded on the left exactly as the offline STFT pads the recording.
  """

  def __init__(self, frames_per_chunk: int = FRAMES_PER_CHUNK):
    self.frames_per_chunk = frames_per_chunk
    self.chunk_samples = HOP * frames_per_chunk
    self._history_N: np.ndarray | None = None

  def push(self, chunk_wav) -> np.ndarray:
    """16 kHz float audio of one chunk [HOP*K] -> clipped log-mel float32 [K, M]."""
    chunk_N = check_wav(chunk_wav, SAMPLE_RATE, name="chunk_wav").astype(np.float64)
    if chunk_N.size != self.chunk_samples:
      raise ValueError(f"chunk_wav has {chunk_N.size} samples; DMelStream takes exactly "
                       f"{self.chunk_samples} (one chunk of {self.frames_per_chunk} frames).")
    history = self._history_N
    if history is None:
      history = np.pad(chunk_N, (WIN // 2, 0), mode="reflect")[:WIN // 2]
    buf_N = np.concatenate([history, chunk_N])
    self._history_N = chunk_N[-(WIN // 2):]
    frames_KxW = np.lib.stride_tricks.sliding_window_view(buf_N, WIN)[::HOP] * window()
    mag_KxF = np.maximum(np.abs(scipy.fft.rfft(frames_KxW, n=N_FFT, axis=-1)), MAG_FLOOR)
    return np.clip(np.log10(mag_KxF @ mel_filterbank()), LOG_MIN, LOG_MAX).astype(np.float32)

  def push_tokens(self, chunk_wav) -> np.ndarray:
    return quantize(self.push(chunk_wav))
