"""What a system said out loud: offline speech recognition of its output.wav.

Full-Duplex-Bench transcribes every system's output.wav with an ASR that gives word
timestamps and writes output.json next to it, {"text": words joined by spaces, "chunks":
[{"text": word, "timestamp": [start_s, end_s]}]} (v1_v1.5/get_transcript/asr.py L61-79);
its scoring rules read only those chunks. For user interruption it transcribes only the
audio after the barge-in ends and adds that offset back (asr.py L33-45, L63-65), which
`crop_s` reproduces. The benchmark's recogniser (NeMo parakeet-tdt-0.6b-v2, asr.py L18-20)
needs a GPU and a model download; here one offline recogniser serves every system alike:
pocketsphinx, whose en-us acoustic model, dictionary and language model ship inside the
PyPI package. Word times come from `Decoder.seg()` frames (100 frames/s by default).

Speed: only what the Silero VAD (`tml_jax.eval.vad`) hears as speech is decoded, each
segment with `CONTEXT_S` of audio either side (the VAD's 30 ms pad cuts word edges), and
times are mapped back to the clip. A run of exact zeros of `ZERO_RUN_S` or more (digital
silence: no one speaks there) splits a region, and zeros at a region's edges are trimmed,
so the same utterance played at different times by a baseline is the same audio. Regions
are cached by a hash of their samples and the recogniser's settings (in memory, and on
disk when given a folder), and new ones are decoded on a process pool.

Shape legend: N samples at 16 kHz (int16 PCM as written to output.wav).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import multiprocessing
import os
import re
import time

import numpy as np

SAMPLE_RATE = 16000
CONTEXT_S = 0.2
ZERO_RUN_S = 0.1
LEAD_S = 0.1      # silence fed before and after a region, so a word never starts the audio
# Gaussian noise (int16 units, about -80 dBFS) added to what the decoder hears: on clean
# eSpeak speech with digital silence it cuts pocketsphinx's word error rate from 0.72 to
# 0.58 (`python benchmarks/asr.py [--dither=0]`: 64 sentences in the 4 model voices).
# Seeded, so a region's transcript depends on its samples alone and the cache stays valid.
DITHER = 3.0
POOL_MIN_S = 30.0  # less new audio than this is decoded in this process (a pool costs ~2 s)

Word = tuple[str, float, float]
_MEMO: dict[str, list[Word]] = {}  # region key -> words relative to the region start


@functools.lru_cache(maxsize=1)
def _decoder():
  try:
    from pocketsphinx import Decoder
  except ImportError as e:
    raise ImportError("the ASR needs pocketsphinx: pip install -e . (it is in setup.py) or "
                      "pip install pocketsphinx") from e
  return Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")


@functools.lru_cache(maxsize=1)
def recogniser() -> str:
  """Names the recogniser and its settings; part of every cache key."""
  from importlib import metadata
  return (f"pocketsphinx {metadata.version('pocketsphinx')} en-us defaults, 16 kHz, "
          f"context {CONTEXT_S} s, lead {LEAD_S} s, dither {DITHER}")


def clean_word(word: str) -> str | None:
  """A pocketsphinx segment's word, or None for silence and fillers (<s>, </s>, <sil>,
  [NOISE]); alternate pronunciations "the(2)" are the word itself."""
  word = re.sub(r"\(\d+\)$", "", word.strip())
  return word if re.match(r"[a-z0-9']", word) else None


def decode(pcm_N: np.ndarray) -> list[Word]:
  """Words [(text, start_s, end_s)] of one region, times from the region's first sample."""
  d = _decoder()
  lead = np.zeros(int(LEAD_S * SAMPLE_RATE))
  audio = np.concatenate([lead, np.asarray(pcm_N, np.float64), lead])
  audio += np.random.default_rng(0).normal(0.0, DITHER, audio.shape)
  audio = np.clip(np.round(audio), -2**15, 2**15 - 1).astype(np.int16)
  d.start_utt()
  d.process_raw(audio.tobytes(), False, True)
  d.end_utt()
  frate, length = float(d.config["frate"]), len(pcm_N) / SAMPLE_RATE
  out = []
  for seg in d.seg():
    w = clean_word(seg.word)
    if w:  # end_frame is the segment's last frame, inclusive; the lead is not the region
      s = min(max(seg.start_frame / frate - LEAD_S, 0.0), length)
      e = min(max((seg.end_frame + 1) / frate - LEAD_S, s), length)
      out.append((w, round(s, 3), round(e, 3)))
  return out


def _decode_timed(pcm_N: np.ndarray) -> tuple[list[Word], float]:
  t0 = time.process_time()
  words = decode(pcm_N)
  return words, time.process_time() - t0


def _split_zeros(a: int, b: int, zero_N: np.ndarray, min_run: int) -> list[tuple[int, int]]:
  """[a, b) cut at runs of >= min_run exact zeros, with zeros trimmed at the edges."""
  nz = np.flatnonzero(~zero_N[a:b]) + a
  if not nz.size:
    return []
  cuts = np.flatnonzero(np.diff(nz) > min_run)
  starts = np.concatenate([[nz[0]], nz[cuts + 1]])
  ends = np.concatenate([nz[cuts], [nz[-1]]]) + 1
  return [(int(s), int(e)) for s, e in zip(starts, ends)]


def regions(pcm_N: np.ndarray, segs: list[tuple[float, float]], crop_s: float = 0.0
            ) -> list[tuple[int, int]]:
  """Sample ranges [(start, end)] to decode: VAD segments widened by CONTEXT_S, kept after
  crop_s, merged, split at digital silence."""
  n, ctx = len(pcm_N), int(CONTEXT_S * SAMPLE_RATE)
  lo = int(round(crop_s * SAMPLE_RATE))
  spans: list[list[int]] = []
  for a, b in sorted(segs):
    s, e = max(lo, int(a * SAMPLE_RATE) - ctx), min(n, int(np.ceil(b * SAMPLE_RATE)) + ctx)
    if e <= s:
      continue
    if spans and s <= spans[-1][1]:
      spans[-1][1] = max(spans[-1][1], e)
    else:
      spans.append([s, e])
  zero_N = np.asarray(pcm_N) == 0
  out = []
  for s, e in spans:
    out += _split_zeros(s, e, zero_N, int(ZERO_RUN_S * SAMPLE_RATE))
  return out


def region_key(pcm_N: np.ndarray) -> str:
  h = hashlib.sha1(recogniser().encode())
  h.update(np.ascontiguousarray(pcm_N, np.int16).tobytes())
  return h.hexdigest()


class Transcriber:
  """Transcribes many recordings at once; identical regions are decoded once.

  processes: decoding processes (default: every core, at most 2 on this project's
  machines); cache_dir: a folder for region transcripts that outlives the process.
  `stats` counts what was decoded: audio seconds, CPU seconds, regions and cache hits.
  """

  def __init__(self, processes: int | None = None, cache_dir: str | None = None):
    self.processes = processes or min(2, os.cpu_count() or 1)
    self.cache_dir = cache_dir
    self.stats = dict(regions=0, decoded=0, cache_hits=0, audio_s=0.0, cpu_s=0.0)

  def _disk(self, key: str) -> list[Word] | None:
    if not self.cache_dir:
      return None
    try:
      with open(os.path.join(self.cache_dir, key + ".json")) as f:
        return [tuple(w) for w in json.load(f)]
    except (OSError, ValueError):
      return None

  def _store(self, key: str, words: list[Word]):
    _MEMO[key] = words
    if self.cache_dir:
      os.makedirs(self.cache_dir, exist_ok=True)
      with open(os.path.join(self.cache_dir, key + ".json"), "w") as f:
        json.dump(words, f)

  def _decode_all(self, todo: dict[str, np.ndarray]):
    keys = sorted(todo, key=lambda k: -len(todo[k]))  # longest first balances the pool
    seconds = sum(len(todo[k]) for k in keys) / SAMPLE_RATE
    if self.processes > 1 and seconds >= POOL_MIN_S:
      ctx = multiprocessing.get_context("spawn")  # JAX's threads make fork unsafe
      with concurrent.futures.ProcessPoolExecutor(self.processes, mp_context=ctx) as pool:
        results = list(pool.map(_decode_timed, [todo[k] for k in keys]))
    else:
      results = [_decode_timed(todo[k]) for k in keys]
    for k, (words, cpu_s) in zip(keys, results):
      self._store(k, words)
      self.stats["cpu_s"] += cpu_s
    self.stats["decoded"] += len(keys)
    self.stats["audio_s"] += seconds

  def run(self, items) -> list[list[Word]]:
    """items: (pcm_N int16, VAD segments in s, crop_s, duration_s) per recording ->
    its words in clip time, sorted, none starting at or past the clip end."""
    plan, todo = [], {}
    for pcm_N, segs, crop_s, _ in items:
      spans = []
      for a, b in regions(pcm_N, segs, crop_s):
        key = region_key(pcm_N[a:b])
        spans.append((a, key))
        self.stats["regions"] += 1
        if key in _MEMO or key in todo:
          self.stats["cache_hits"] += 1
          continue
        cached = self._disk(key)
        if cached is not None:
          _MEMO[key] = cached
          self.stats["cache_hits"] += 1
        else:
          todo[key] = np.array(pcm_N[a:b], np.int16)
      plan.append(spans)
    if todo:
      self._decode_all(todo)
    out = []
    for spans, (_, _, crop_s, duration_s) in zip(plan, items):
      words = []
      for a, key in spans:
        t0 = a / SAMPLE_RATE
        for w, s, e in _MEMO[key]:
          s, e = max(t0 + s, crop_s), t0 + e
          if s < duration_s:  # words past the clip end were never played
            words.append((w, round(s, 3), round(min(max(e, s), duration_s), 3)))
      out.append(sorted(words, key=lambda w: w[1]))
    return out


def to_fdb(words: list[Word]) -> dict:
  """The benchmark's output.json shape (get_transcript/asr.py L61-79)."""
  return {"text": " ".join(w for w, _, _ in words),
          "chunks": [{"text": w, "timestamp": [s, e]} for w, s, e in words]}


def transcribe_wav(wav_N: np.ndarray, crop_s: float = 0.0,
                   transcriber: Transcriber | None = None) -> list[Word]:
  """One recording (float or int16) -> its words; the VAD runs here."""
  from tml_jax.eval import vad
  pcm = wav_N if np.asarray(wav_N).dtype == np.int16 else to_pcm(wav_N)
  segs = vad.segments(np.asarray(pcm, np.float32) / 32768.0)
  return (transcriber or Transcriber(processes=1)).run(
      [(pcm, segs, crop_s, len(pcm) / SAMPLE_RATE)])[0]


def to_pcm(wav_N: np.ndarray) -> np.ndarray:
  """float audio -> int16 exactly as tml_jax.audio.io.save_wav writes it."""
  wav = np.asarray(wav_N, np.float64)
  return np.clip(np.round(wav * 2.0**15), -2**15, 2**15 - 1).astype(np.int16)


def write_transcript(folder: str, crop_s: float = 0.0) -> dict:
  """folder/output.wav -> folder/output.json (the FDB shape); returns what it wrote."""
  from tml_jax.audio import io as audio_io
  wav, sr = audio_io.load_wav(os.path.join(folder, "output.wav"))
  out = to_fdb(transcribe_wav(audio_io.check_wav(wav, sr, name="output.wav"), crop_s))
  with open(os.path.join(folder, "output.json"), "w") as f:
    json.dump(out, f, indent=1)
  return out


# ---- agreement of two word lists ------------------------------------------------------

def tokens(text: str) -> list[str]:
  """Lower-case words without punctuation (what a word error rate compares)."""
  return re.findall(r"[a-z0-9']+", str(text).lower().replace("’", "'"))


def edit_distance(ref: list[str], hyp: list[str]) -> int:
  """Word-level Levenshtein distance (substitutions, insertions, deletions)."""
  prev = np.arange(len(hyp) + 1)
  for i, r in enumerate(ref, 1):
    cur = np.empty_like(prev)
    cur[0] = i
    for j, h in enumerate(hyp, 1):
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
    prev = cur
  return int(prev[-1])
