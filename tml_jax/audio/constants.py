"""The audio constants of the whole repository, defined here once (docs/design.md §3).

Everything that reads, writes, synthesises or featurises audio imports these names instead
of writing the numbers again: the dMel recipe (Bai et al., arXiv 2407.15835) only holds at
these values, and a second copy that drifts would silently mis-align features and audio.
This module imports nothing, so any module (audio, data, eval, serve) can use it without
pulling in scipy or creating an import cycle.
"""

SAMPLE_RATE = 16000  # Hz, mono; other rates are resampled on input (audio.io.check_wav)

# STFT framing: frame t is centred on sample t*HOP and reads the WIN non-zero taps of a
# periodic Hann window zero-padded to N_FFT. WIN == 2*HOP keeps chunks causal (dmel docstring).
HOP = 400     # samples: 25 ms, 40 frames per second
WIN = 800     # samples: 50 ms
N_FFT = 1024

# Mel filterbank: Slaney scale, area-normalised (librosa.filters.mel defaults).
N_MELS = 80
FMIN = 80.0   # Hz
FMAX = 7600.0  # Hz

# Log10 magnitudes are floored, clipped to [LOG_MIN, LOG_MAX] and cut into NUM_BINS uniform bins.
MAG_FLOOR = 1e-10
LOG_MIN = -7.0
LOG_MAX = 2.0
NUM_BINS = 16

# Frames per micro-turn at the default 200 ms chunk; configs choose others through
# tml_jax.microturn.frames_per_chunk(chunk_ms, sample_rate, hop).
FRAMES_PER_CHUNK = 8
