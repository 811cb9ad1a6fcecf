"""Speech with exact word timestamps from eSpeak NG, driven through ctypes (docs/design.md §6).

The pip package `espeakng-loader` ships `libespeak-ng.so` and its `espeak-ng-data`; we call
the C API in synchronous mode, so every buffer of samples comes back through our callback
together with the synthesiser's events. A WORD event carries the word's character offset in
the text and the sample index where its audio begins; a word ends where the next WORD / END
event begins, less the silence that espeak puts at clause boundaries, which we trim by energy
(the same trim moves a word's start past leading pause samples).

The library keeps its state in C globals that survive between utterances, so `_espeak` loads
a fresh copy for every utterance (see there): `synth` is a pure function of its arguments,
and nothing is cached at module level, so forked and spawned workers are equally safe.

Voices are "<language>+<variant>" names (espeak's own syntax, e.g. "en-us+f3"). English
accents and variants are split into disjoint train and held-out test pools (`voices`).

Shape legend: N samples at 16 kHz, M samples at espeak's native 22050 Hz.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import pathlib
import re
import threading
import zlib

import numpy as np
import scipy.signal

from tml_jax.audio.constants import SAMPLE_RATE

NATIVE_RATE = 22_050  # espeak-ng's fixed output rate; 16000/22050 = 320/441
_UP, _DOWN = 320, 441

# English accents (files under espeak-ng-data/lang/gmw) and voice variants (voices/!v).
# Test voices are accent x variant pairs that never occur in training: both factors are new.
TRAIN_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan")
TEST_ACCENTS = ("en-029", "en-gb-scotland", "en-gb-x-gbcwmd")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "adam", "david",
                  "linda", "steph", "robert", "max", "paul", "aunty", "grandpa")
TEST_VARIANTS = ("m7", "m8", "f4", "f5", "john", "anika", "belinda", "quincy")
# The model's own voice is a persona, the same across splits: generalisation is about users.
MODEL_VOICES = ("en-us+f3", "en-gb-x-rp+m3", "en-us+m2", "en+f2")
# Foreign-language voices for simultaneous translation (the user speaks these).
FOREIGN_VOICES = {"es": "es", "fr": "fr", "de": "de"}

# Event types and API constants from espeak-ng's speak_lib.h.
_EV_END_OF_LIST, _EV_WORD, _EV_SENTENCE, _EV_END, _EV_MSG_TERMINATED = 0, 1, 2, 5, 6
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EDGE_PUNCT = ".,!?;:\"'()[]"
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4


def installed_voices() -> dict[str, tuple[str, ...]]:
  """What espeakng-loader's espeak-ng-data ships: language codes (lower case, from lang/) and
  voice variants (voices/!v), the two halves of a "<language>+<variant>" name."""
  import espeakng_loader

  root = pathlib.Path(espeakng_loader.get_data_path())
  langs = sorted(p.name.lower() for p in (root / "lang").rglob("*") if p.is_file())
  variants = sorted(p.name for p in (root / "voices" / "!v").iterdir() if p.is_file())
  return {"languages": tuple(langs), "variants": tuple(variants)}


def voices(split: str) -> tuple[str, ...]:
  """User/other-speaker voices of a split: 'test' gets the held-out pool, others the train
  pool; never one of the model's own voices, so a voice alone never says who is talking."""
  if split not in ("train", "validation", "test"):
    raise ValueError(f"split={split!r}: expected 'train', 'validation' or 'test'")
  accents, variants = ((TEST_ACCENTS, TEST_VARIANTS) if split == "test"
                       else (TRAIN_ACCENTS, TRAIN_VARIANTS))
  return tuple(name for a in accents for v in variants
               if (name := f"{a}+{v}") not in MODEL_VOICES)


@dataclasses.dataclass(frozen=True)
class Utterance:
  """Synthesised speech: 16 kHz float32 samples and word spans in seconds from its start."""
  wav: np.ndarray                            # float32 [N], peak-normalised to 0.5
  words: tuple[tuple[str, float, float], ...]  # (text, start_s, end_s)
  voice: str
  text: str

  @property
  def duration_s(self) -> float:
    return len(self.wav) / SAMPLE_RATE

  def slice(self, i: int, j: int) -> "Utterance":
    """Words i..j-1 as an utterance of their own: the audio from word i's start to word
    j-1's end (10 ms fade-out where speech continued), times from the new start.

    Cutting one synthesis at a word boundary keeps the words' own prosody: what comes
    before a mid-utterance pause still sounds unfinished, as it does when people pause.
    """
    if not 0 <= i < j <= len(self.words):
      raise ValueError(f"slice({i}, {j}) of an utterance with {len(self.words)} words")
    a = int(round(self.words[i][1] * SAMPLE_RATE))
    b = int(round(self.words[j - 1][2] * SAMPLE_RATE)) if j < len(self.words) else len(self.wav)
    wav = self.wav[a:b].copy()
    if j < len(self.words):
      fade = min(160, len(wav))
      wav[len(wav) - fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    t0 = self.words[i][1]
    words = tuple((w, round(s - t0, 4), round(min(e - t0, len(wav) / SAMPLE_RATE), 4))
                  for w, s, e in self.words[i:j])
    return Utterance(wav=wav, words=words, voice=self.voice,
                     text=" ".join(w for w, _, _ in words))


class _EventId(ctypes.Union):
  _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
  _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
              ("text_position", ctypes.c_int), ("length", ctypes.c_int),
              ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
              ("user_data", ctypes.c_void_p), ("id", _EventId)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_Event))


def _load(path: str):
  lib = ctypes.CDLL(path)
  lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
  lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
  lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
  lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
  lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                               ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
  return lib


_LOCK = threading.Lock()  # the library is one set of C globals: one synthesis at a time


def _espeak(text: str, voice: str, rate_wpm: int, pitch: int, pitch_range: int):
  """Raw synthesis: int16 samples at 22050 Hz and (type, text_position, length, sample) events.

  Two things made the same call give different samples depending on what was said before:
  libespeak-ng keeps state in C statics that neither espeak_Terminate nor a new
  espeak_Initialize resets (we saw it with plain voices), and the breath noise of variants
  such as +f2 draws from libc's process-wide rand(). So every utterance loads a fresh copy
  of the library and unloads it afterwards (about 8 ms), and rand() and espeak's own seed
  are set from the request: the audio is a pure function of the arguments, in any process
  and any order, and no handle is shared between processes. (Side effect: libc's rand()
  state is reseeded; Python and numpy do not use it.)
  """
  import _ctypes
  import espeakng_loader  # imported here so the module imports without the package

  chunks: list[np.ndarray] = []
  events: list[tuple[int, int, int, int]] = []

  def on_audio(wav, num_samples, evs):
    if num_samples > 0:
      chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
    i = 0
    while evs[i].type != _EV_END_OF_LIST:
      e = evs[i]
      events.append((e.type, e.text_position, e.length, e.sample))
      i += 1
    return 0  # 0 = continue synthesis

  callback = _CALLBACK(on_audio)
  data = text.encode("utf-8")
  with _LOCK:
    libc = ctypes.CDLL(None)
    libc.srand.argtypes = [ctypes.c_uint]
    lib = _load(espeakng_loader.get_library_path())
    try:
      rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                   espeakng_loader.get_data_path().encode(), 0)
      if rate != NATIVE_RATE:
        raise RuntimeError(f"libespeak-ng initialised at {rate} Hz, expected {NATIVE_RATE}: "
                           "reinstall espeakng-loader (pip install -U espeakng-loader).")
      lib.espeak_SetSynthCallback(callback)
      # Breath noise of the voice variants draws from libc's rand(), whose state is the
      # process's, not the library's: seed it (and espeak's own seed) from the request.
      seed = zlib.crc32(f"{voice}|{rate_wpm}|{pitch}|{pitch_range}|".encode() + data)
      libc.srand(seed)
      lib.espeak_ng_SetRandSeed(seed)
      if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"espeak-ng has no voice {voice!r}: use '<language>[+<variant>]' "
                         "with a language under espeak-ng-data/lang and a variant under "
                         "voices/!v, e.g. 'en-us+f3'.")
      lib.espeak_SetParameter(_PARAM_RATE, int(rate_wpm), 0)
      lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
      lib.espeak_SetParameter(_PARAM_RANGE, int(pitch_range), 0)
      lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
      lib.espeak_Synchronize()
    finally:
      lib.espeak_Terminate()
      handle = lib._handle
      del lib
      _ctypes.dlclose(handle)  # refcount 0: the next load starts from pristine statics
  wav_M = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
  return wav_M, events


def _active_frames(wav_M: np.ndarray, frame: int, rel_db: float) -> np.ndarray:
  """Per-frame bool: frame energy within `rel_db` of the utterance's loudest frame."""
  n = len(wav_M) // frame
  e = np.square(wav_M[:n * frame].astype(np.float32).reshape(n, frame)).mean(1)
  return e > e.max(initial=0.0) * 10 ** (rel_db / 10) + 1e-3


def synth(text: str, voice: str = "en-us", *, rate_wpm: int = 175, pitch: int = 50,
          pitch_range: int = 50) -> Utterance:
  """Speak `text` with an espeak voice; 16 kHz float32 audio plus word timestamps.

  rate_wpm: 80..450 words per minute; pitch, pitch_range: 0..100 (espeak's own scales).
  Leading and trailing silence is cut, so the audio starts at the first word.
  """
  text = " ".join(text.split())
  if not text:
    raise ValueError("synth(text='') has nothing to say: pass a non-empty string.")
  wav_M, events = _espeak(text, voice, rate_wpm, pitch, pitch_range)
  frame = 110  # 5 ms at 22050 Hz: fine enough for edges, coarse enough to be cheap
  # Before a clause pause espeak lets a word decay for ~0.1 s at -36..-41 dB re. the loudest
  # frame; -30 dB ends the word where it is audible, not where the decay fades out.
  active = _active_frames(wav_M, frame, rel_db=-30.0)
  # Word starts, and every later event that bounds the previous word (clause/sentence ends).
  bounds = sorted({s for t, _, _, s in events if t in (_EV_WORD, _EV_END, _EV_SENTENCE,
                                                        _EV_MSG_TERMINATED)} | {len(wav_M)})
  # espeak emits several WORD events inside one written token ("23" -> "twenty", "three";
  # "mm-hmm" -> "mm"): merge events by the whitespace token that holds their text position,
  # so a word is what was written and its span covers all of its sounds.
  tokens = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
  token_starts = [a for a, _ in tokens]
  spans: dict[int, list[int]] = {}
  for t, pos, length, start in events:
    if t != _EV_WORD or length <= 0:
      continue
    k = bisect.bisect_right(token_starts, pos - 1) - 1  # text_position is 1-based characters
    stop = next((b for b in bounds if b > start), len(wav_M))
    f0, f1 = start // frame, max(start // frame + 1, stop // frame)
    on = np.flatnonzero(active[f0:f1])
    if on.size == 0:  # a silent "word" (punctuation read as nothing): no span to align
      continue
    w0, w1 = (f0 + on[0]) * frame, min((f0 + on[-1] + 1) * frame, len(wav_M))
    if k in spans:
      spans[k][1] = max(spans[k][1], w1)
    else:
      spans[k] = [w0, w1]
  # espeak also speaks some word pairs as one unit with one event ("does not"); a token
  # without an event shares the span of the token before it, split by character count.
  groups: list[list[int]] = []
  for k in range(len(tokens)):
    if k in spans or not groups:
      groups.append([k])
    else:
      groups[-1].append(k)
  words, prev_end = [], 0
  for group in groups:
    owner = next((k for k in group if k in spans), None)
    if owner is None:  # leading tokens with no sound at all
      continue
    w0, w1 = spans[owner]
    w0 = max(w0, prev_end)  # frames round outward: never overlap the previous word
    prev_end = w1 = max(w1, w0 + frame)
    texts = [text[tokens[k][0]:tokens[k][1]].strip(_EDGE_PUNCT) for k in group]
    weights = np.cumsum([0] + [max(len(x), 1) for x in texts])
    cuts = [int(round(w0 + (w1 - w0) * c / weights[-1])) for c in weights]
    words += [(x, a, b) for x, a, b in zip(texts, cuts[:-1], cuts[1:]) if x]
  if not words:
    raise ValueError(f"espeak-ng produced no words for {text!r} with voice {voice!r}.")
  # Cut leading/trailing silence, then resample 22050 -> 16000 Hz.
  lo, hi = words[0][1], words[-1][2]
  wav_N = scipy.signal.resample_poly(wav_M[lo:hi].astype(np.float32), _UP, _DOWN)
  wav_N = (0.5 / max(np.abs(wav_N).max(), 1e-6) * wav_N).astype(np.float32)
  scale = 1.0 / NATIVE_RATE
  spans = tuple((w, round(float(a - lo) * scale, 4), round(float(b - lo) * scale, 4))
                for w, a, b in words)
  return Utterance(wav=wav_N, words=spans, voice=voice, text=text)
