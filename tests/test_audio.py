"""dMel, audio I/O and the Griffin-Lim vocoder, checked against computations written here from
the published recipe (arXiv 2407.15835), not against the code under test."""

import numpy as np
import pytest
import scipy.signal

from tml_jax.audio import dmel, io, vocoder

SR = 16000


# ---- an independent dMel, straight from the recipe's words --------------------------------


def _slaney_hz_to_mel(f):
  # Slaney: 3 mel per 200 Hz up to 1 kHz, then 27 mel per factor 6.4.
  return f * 3 / 200 if f < 1000 else 15 + 27 * np.log(f / 1000) / np.log(6.4)


def _slaney_mel_to_hz(m):
  return m * 200 / 3 if m < 15 else 1000 * 6.4 ** ((m - 15) / 27)


def _reference_filterbank_MxF(sr=SR, n_fft=1024, n_mels=80, fmin=80.0, fmax=7600.0):
  lo, hi = _slaney_hz_to_mel(fmin), _slaney_hz_to_mel(fmax)
  edges = [_slaney_mel_to_hz(lo + (hi - lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
  freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
  rows = []
  for m in range(n_mels):
    tri = np.interp(freqs, edges[m:m + 3], [0.0, 1.0, 0.0], left=0.0, right=0.0)
    rows.append(tri * 2 / (edges[m + 2] - edges[m]))  # equal-area ("slaney") normalisation
  return np.array(rows)


def _reference_log_mel(wav):
  """Frame by frame: reflect-pad 512, 1024-sample window = zero-padded periodic Hann(800)."""
  wav = np.asarray(wav, np.float64)
  window = np.zeros(1024)
  window[112:912] = scipy.signal.get_window("hann", 800, fftbins=True)
  padded = np.pad(wav, 512, mode="reflect")
  fb = _reference_filterbank_MxF()
  out = []
  for f in range(1 + len(wav) // 400):
    mag = np.maximum(np.abs(np.fft.rfft(padded[f * 400:f * 400 + 1024] * window)), 1e-10)
    out.append(np.clip(np.log10(fb @ mag), -7.0, 2.0))
  return np.array(out)


def _reference_bins(log_mel):
  centres = -7.0 + 0.6 * np.arange(16)
  return np.argmin(np.abs(log_mel[..., None] - centres), axis=-1)


# ---- constants ----------------------------------------------------------------------------


def test_constants_are_the_published_recipe_and_defined_once():
  # The numbers as the recipe states them (arXiv 2407.15835, docs/design.md §3), written
  # here, not read from the code; every module that needs one uses the same object.
  from tml_jax.audio import constants as K
  from tml_jax.data import speech
  assert (K.SAMPLE_RATE, K.HOP, K.WIN, K.N_FFT) == (SR, 400, 800, 1024)
  assert (K.N_MELS, K.FMIN, K.FMAX) == (80, 80.0, 7600.0)
  assert (K.LOG_MIN, K.LOG_MAX, K.NUM_BINS, K.FRAMES_PER_CHUNK) == (-7.0, 2.0, 16, 8)
  assert K.FRAMES_PER_CHUNK * K.HOP == SR // 5  # 8 frames are one 200 ms micro-turn
  for mod in (dmel, io, speech):
    assert mod.SAMPLE_RATE is K.SAMPLE_RATE, mod.__name__


# ---- dMel ---------------------------------------------------------------------------------


def test_filterbank_matches_independent_slaney():
  np.testing.assert_allclose(dmel.mel_filterbank().T, _reference_filterbank_MxF(),
                             rtol=1e-9, atol=1e-12)


def test_filterbank_matches_librosa():
  librosa = pytest.importorskip("librosa")
  ref = librosa.filters.mel(sr=SR, n_fft=1024, n_mels=80, fmin=80, fmax=7600, dtype=np.float64)
  np.testing.assert_allclose(dmel.mel_filterbank().T, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("num_samples", [1, 7, 399, 400, 401, 513, 3200, 5555])
def test_log_mel_and_bins_match_reference(num_samples):
  rng = np.random.default_rng(num_samples)
  # A loud and a quiet part so that the values cover most bins, including both clips.
  wav = rng.standard_normal(num_samples) * np.geomspace(1e-6, 30.0, num_samples)
  ref = _reference_log_mel(wav)
  got = dmel.log_mel(wav.astype(np.float32))
  assert got.shape == (1 + num_samples // 400, 80) and got.dtype == np.float32
  # float32 input and output: ~1e-7 relative on the signal, so ~1e-6 in log10.
  np.testing.assert_allclose(got, ref, atol=2e-5)
  bins = dmel.encode(wav.astype(np.float32))
  assert bins.dtype == np.int32 and bins.shape == got.shape
  # Bins may legitimately differ only where the value sits on a decision edge.
  near_edge = np.min(np.abs(ref[..., None] - dmel.BIN_EDGES), axis=-1) < 1e-4
  np.testing.assert_array_equal(bins[~near_edge], _reference_bins(ref)[~near_edge])


def test_silence_is_bin_zero():
  assert np.all(dmel.log_mel(np.zeros(4000)) == -7.0)
  assert np.all(dmel.encode(np.zeros(4000)) == 0)


def test_loud_tone_clips_to_top_bin_in_its_channel():
  t = np.arange(SR) / SR
  lm = dmel.log_mel(100.0 * np.sin(2 * np.pi * 1000 * t))
  centres = dmel.mel_to_hz(np.linspace(dmel.hz_to_mel(80), dmel.hz_to_mel(7600), 82))[1:-1]
  channel = int(np.argmin(np.abs(centres - 1000)))
  assert np.all(lm[:, channel] == 2.0)
  assert np.all(dmel.encode(100.0 * np.sin(2 * np.pi * 1000 * t))[:, channel] == 15)


def test_full_scale_audio_never_reaches_the_top_bins():
  # A property of the recipe that users must know: with magnitude (not power) and Slaney's
  # area-normalised filters, audio in [-1, 1] peaks near log10 = 1, so bins 14-15 (>= 1.7)
  # need gain > ~5. A full-scale tone or square wave is the loudest a channel can get.
  t = np.arange(SR) / SR
  for wav in (np.sin(2 * np.pi * 1000 * t), np.sign(np.sin(2 * np.pi * 100 * t))):
    assert 0.5 < dmel.log_mel(wav).max() < dmel.BIN_EDGES[13]


def test_quantize_edges_and_ties():
  np.testing.assert_allclose(dmel.BIN_EDGES, -6.7 + 0.6 * np.arange(15), atol=1e-6)
  # A value exactly halfway (the float32 edge itself) goes to the upper bin; one ulp less, lower.
  np.testing.assert_array_equal(dmel.quantize(dmel.BIN_EDGES), np.arange(1, 16))
  below = np.nextafter(dmel.BIN_EDGES, np.float32(-np.inf))
  np.testing.assert_array_equal(dmel.quantize(below), np.arange(15))
  np.testing.assert_array_equal(dmel.quantize(dmel.BIN_CENTRES), np.arange(16))
  np.testing.assert_array_equal(dmel.decode(np.arange(16)), dmel.BIN_CENTRES)
  assert dmel.BIN_CENTRES[0] == -7.0 and dmel.BIN_CENTRES[-1] == 2.0
  with pytest.raises(ValueError, match="16"):
    dmel.decode(np.array([0, 16]))


def test_decode_of_encode_is_within_half_a_bin():
  rng = np.random.default_rng(0)
  wav = rng.standard_normal(3 * SR) * np.geomspace(1e-5, 3.0, 3 * SR)
  err = np.abs(dmel.decode(dmel.encode(wav)) - dmel.log_mel(wav))
  assert err.max() <= 0.3 + 1e-6
  assert err.mean() > 0.05  # the bins really quantise (a test that could fail)


@pytest.mark.parametrize("num_samples", [1, 399, 400, 401, 3199, 3200, 16001])
def test_frame_count(num_samples):
  assert dmel.encode(np.ones(num_samples) * 0.1).shape == (1 + num_samples // 400, 80)
  assert dmel.num_frames(num_samples) == 1 + num_samples // 400


def test_chunks_are_causal_at_chunk_granularity():
  rng = np.random.default_rng(1)
  chunk = 3200
  wav = rng.standard_normal(5 * chunk + 1234).astype(np.float32)
  full = dmel.log_mel_chunks(wav)
  assert full.shape == (5, 8, 80)
  np.testing.assert_array_equal(full.reshape(-1, 80), dmel.log_mel(wav)[:40])
  for c in range(1, 6):
    prefix = wav[:c * chunk]
    np.testing.assert_array_equal(dmel.log_mel_chunks(prefix), full[:c])
    np.testing.assert_array_equal(dmel.encode_chunks(prefix), dmel.quantize(full[:c]))
    # The prefix's own last frame (index 8c, centred on its final sample + 1) is the only one
    # that reads reflect padding, so it is the only frame that differs from the full signal.
    lm = dmel.log_mel(prefix)
    np.testing.assert_array_equal(lm[:8 * c], dmel.log_mel(wav)[:8 * c])
    assert not np.allclose(lm[8 * c], dmel.log_mel(wav)[8 * c])
  # The boundary is tight: the last sample of chunk 1 changes chunk 1's last frame, the first
  # sample of chunk 2 changes nothing before chunk 2.
  poked = wav.copy()
  poked[2 * chunk - 1] += 1.0
  changed = np.any(dmel.log_mel_chunks(poked) != full, axis=-1)
  assert changed[1, 7] and not changed[:1].any() and not changed[1, :7].any()
  poked = wav.copy()
  poked[2 * chunk] += 1.0
  assert np.array_equal(dmel.log_mel_chunks(poked)[:2], full[:2])


def test_stream_equals_offline_chunks():
  rng = np.random.default_rng(2)
  wav = rng.standard_normal(6 * 3200).astype(np.float32) * 0.1
  stream = dmel.DMelStream()
  pushed = np.stack([stream.push(wav[i * 3200:(i + 1) * 3200]) for i in range(6)])
  np.testing.assert_array_equal(pushed, dmel.log_mel_chunks(wav))
  with pytest.raises(ValueError, match="3200"):
    stream.push(np.zeros(100))


def test_batch_equals_one_by_one():
  wav = np.random.default_rng(3).standard_normal((3, 4321)).astype(np.float32)
  np.testing.assert_array_equal(dmel.encode_batch(wav), np.stack([dmel.encode(w) for w in wav]))


def test_long_input_uses_blocks_consistently():
  # More frames than one FFT block: frames on both sides of the block boundary, and the ends,
  # must equal the reference. Frame 1 of a clip starting at sample f*400 - 400 is frame f of
  # the whole signal: its non-zero window taps read clip samples [0, 800), no padding.
  wav = np.random.default_rng(4).standard_normal(400 * (dmel._BLOCK_FRAMES + 50))
  got = dmel.log_mel(wav)
  for f in (dmel._BLOCK_FRAMES - 1, dmel._BLOCK_FRAMES, dmel._BLOCK_FRAMES + 1):
    ref = _reference_log_mel(wav[f * 400 - 400:f * 400 + 400])
    np.testing.assert_allclose(got[f], ref[1], atol=2e-5)
  np.testing.assert_allclose(got[:2], _reference_log_mel(wav[:800])[:2], atol=2e-5)
  np.testing.assert_allclose(got[-2:], _reference_log_mel(wav[-1200:])[-2:], atol=2e-5)


# ---- input checks and resampling -----------------------------------------------------------


def _peak_hz(wav, sr):
  spec = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
  return np.argmax(spec) * sr / len(wav)


@pytest.mark.parametrize("sr", [8000, 22050, 24000, 32000, 44100, 48000])
def test_resampling_keeps_frequency(sr):
  t = np.arange(sr) / sr  # one second
  wav16 = io.check_wav(np.sin(2 * np.pi * 1000 * t).astype(np.float32), sr)
  assert wav16.dtype == np.float32 and abs(len(wav16) - SR) <= 1
  assert abs(_peak_hz(wav16, SR) - 1000) <= 1.0
  # And dMel sees the same loudest channel as for a native 16 kHz tone.
  native = dmel.log_mel(np.sin(2 * np.pi * 1000 * np.arange(SR) / SR))
  assert np.argmax(dmel.log_mel(wav16)[10]) == np.argmax(native[10])


def test_bad_inputs_raise_helpful_errors():
  with pytest.raises(ValueError, match="12345"):
    io.check_wav(np.zeros(100), 12345)
  with pytest.raises(ValueError, match="not a positive"):
    io.check_wav(np.zeros(100), 0)
  with pytest.raises(ValueError, match=r"2 NaN/Inf samples .*first at index 3"):
    io.check_wav(np.array([0, 0, 0, np.nan, 0, np.inf]), SR)
  with pytest.raises(ValueError, match="empty"):
    io.check_wav(np.zeros(0), SR)
  with pytest.raises(ValueError, match=r"2 channels.*Mix down"):
    io.check_wav(np.zeros((100, 2)), SR)
  with pytest.raises(ValueError, match="dtype complex"):
    io.check_wav(np.zeros(10, np.complex64), SR)
  with pytest.raises(ValueError, match=r"shape \(2, 2, 2\)"):
    io.check_wav(np.zeros((2, 2, 2)), SR)
  with pytest.raises(ValueError, match="NaN"):
    dmel.encode(np.array([np.nan] * 10))


def test_accepted_shapes_and_int16_scaling():
  x = np.linspace(-0.5, 0.5, 50, dtype=np.float32)
  np.testing.assert_array_equal(io.check_wav(x[:, None], SR), x)
  np.testing.assert_array_equal(io.check_wav(x[None, :], SR), x)
  pcm = np.array([-32768, -16384, 0, 16384, 32767], np.int16)
  np.testing.assert_array_equal(io.check_wav(pcm, SR), pcm / 32768.0)
  assert io.check_wav(pcm, SR).dtype == np.float32


def test_wav_files_roundtrip_and_errors(tmp_path):
  wav = np.random.default_rng(5).uniform(-0.9, 0.9, 1000).astype(np.float32)
  io.save_wav(tmp_path / "a.wav", wav)
  back, sr = io.load_wav(tmp_path / "a.wav")
  assert sr == SR and back.dtype == np.float32
  np.testing.assert_allclose(back, wav, atol=1 / 32768)
  (tmp_path / "empty.wav").write_bytes(b"")
  with pytest.raises(ValueError, match="empty file"):
    io.load_wav(tmp_path / "empty.wav")
  (tmp_path / "junk.wav").write_bytes(b"this is not a wav file at all")
  with pytest.raises(ValueError, match="cannot read"):
    io.load_wav(tmp_path / "junk.wav")
  with pytest.raises(FileNotFoundError):
    io.load_wav(tmp_path / "missing.wav")


# ---- vocoder -------------------------------------------------------------------------------


def _voiced(seed, seconds=1.0):
  """A vowel-like test signal: a wobbling harmonic tone over a little noise."""
  rng = np.random.default_rng(seed)
  n = int(seconds * SR)
  t = np.arange(n) / SR
  f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
  phase = 2 * np.pi * np.cumsum(f0) / SR
  tone = sum(np.sin(k * phase + rng.uniform(0, 6)) / k for k in range(1, 25))
  return (0.1 * tone + 0.01 * rng.standard_normal(n)).astype(np.float32)


def test_istft_inverts_stft_exactly():
  for n in (3, 401, 4800, 5000):
    x = np.random.default_rng(n).standard_normal(n)
    np.testing.assert_allclose(vocoder.istft(dmel.stft(x[None])[0], n), x, atol=1e-10)


def test_mel_inversion_reproduces_the_mel_frames():
  lm = dmel.log_mel(_voiced(0))
  mag = vocoder.mel_to_magnitude(lm)
  assert mag.min() >= 0 and mag.shape == (lm.shape[0], 513)
  relog = np.clip(np.log10(np.maximum(mag, 1e-10) @ dmel.mel_filterbank()), -7, 2)
  # 30 multiplicative steps reach ~0.003-0.005 on harmonic spectra (more steps buy little:
  # Griffin-Lim's error, ~0.04, dominates the round trip); without them the clipped
  # pseudo-inverse alone is ~10x worse.
  assert np.abs(relog - lm).mean() < 0.01
  mag0 = vocoder.mel_to_magnitude(lm, nnls_steps=0)
  relog0 = np.clip(np.log10(np.maximum(mag0, 1e-10) @ dmel.mel_filterbank()), -7, 2)
  assert np.abs(relog0 - lm).mean() > 2 * np.abs(relog - lm).mean()


def test_vocoder_round_trip():
  # Measured on these signals (3 seeds): log-mel L1 ~0.03-0.04 after 32 iterations, ~0.25 with
  # random phase. 0.08 leaves 2x margin and is still 1/4 of a dMel bin step (0.6), so the round
  # trip sits well inside quantisation noise.
  for seed in range(2):
    wav = _voiced(seed)
    lm = dmel.log_mel(wav)[:-1]  # 40 frames = 5 chunks; drop the frame that reads the padding
    out = vocoder.vocode(lm, n_iter=32, seed=seed)
    assert out.shape == (40 * 400,) and out.dtype == np.float32
    l1 = np.abs(dmel.log_mel(out)[:-1] - lm).mean()
    l1_random_phase = np.abs(dmel.log_mel(vocoder.vocode(lm, n_iter=0))[:-1] - lm).mean()
    assert l1 < 0.08 and l1 < 0.5 * l1_random_phase, (l1, l1_random_phase)
    dist = vocoder.spectral_distance(wav, out)
    assert dist["log_mel_l1"] < 0.08 and dist["spectral_convergence"] < 0.4, dist


def test_vocoder_chunk_length_and_bad_input():
  assert vocoder.vocode(np.full((8, 80), -7.0), n_iter=2).shape == (3200,)
  with pytest.raises(ValueError, match=r"\[T, 80\]"):
    vocoder.vocode(np.zeros((8, 40)))
