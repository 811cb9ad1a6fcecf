"""Audio: dMel tokens (the model's audio input and flow-matching targets), I/O, a vocoder.

The audio constants (sample rate, STFT and mel parameters) are defined once, in `constants`.
"""

from tml_jax.audio.constants import FRAMES_PER_CHUNK, HOP, N_MELS, NUM_BINS, SAMPLE_RATE
from tml_jax.audio.dmel import DMelStream, decode, encode, encode_chunks, log_mel, log_mel_chunks
from tml_jax.audio.io import check_wav, load_wav, save_wav
from tml_jax.audio.vocoder import spectral_distance, vocode
