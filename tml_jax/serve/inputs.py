"""Where the engine's input comes from, and when: clocks, recorded streams, input files.

Live input goes through a jitter buffer: chunk t is due once it has been fully heard, at
(t+1)*chunk_s, but is still used if it arrives up to `jitter_buffer_s` later; only a chunk
that has not arrived by then (lost, or too late) becomes silence, reported as an event.

Inputs are checked before a session starts: audio by `tml_jax.audio.io.check_wav` (rate,
NaN/Inf, float PCM at the integer scale), video by `check_frames` (uint8 RGB, one frame per
chunk at most). A 16 kHz mono int16 file is read chunk by chunk (`WavFile`), so an hour of
input costs no memory.
"""

from __future__ import annotations

import os
import time
import wave

import numpy as np

from tml_jax.audio import io


class OfflineClock:
  """Conversation time = chunk index * chunk_s; never sleeps."""
  live = False

  def __init__(self, chunk_s: float):
    self.chunk_s, self.t = chunk_s, 0

  def start(self):
    self.t = 0

  def wait_for_chunk(self, t: int):
    self.t = t

  def wait_until(self, s: float):
    del s

  def now_s(self) -> float:
    return self.t * self.chunk_s


class LiveClock:
  """Wall clock since `start`, `speed` times faster than real time (1.0 = real time; tests
  use more). Chunk t is processed once it has been fully heard, at (t+1)*chunk_s.

  Catch-up policy: every micro-turn runs, in order (the model's clock is the chunk index;
  skipping one would shift SELF_AUDIO and positions against training). When a step ends
  after the next chunk was due, the next one starts at once, with no sleep, until the
  engine is back on schedule; each chunk's lag behind its schedule goes into latency.json.
  """
  live = True

  def __init__(self, chunk_s: float, speed: float = 1.0):
    self.chunk_s, self.speed, self.t0 = chunk_s, speed, None

  def start(self):
    self.t0 = time.perf_counter()

  def now_s(self) -> float:
    return (time.perf_counter() - self.t0) * self.speed

  def wait_until(self, s: float):
    delay = (s - self.now_s()) / self.speed
    if delay > 0:
      time.sleep(delay)

  def wait_for_chunk(self, t: int):
    self.wait_until((t + 1) * self.chunk_s)


# Video input is 5 fps, one frame per 200 ms (the FDB export and `load_input`), whatever the
# model's micro-turn: chunk t shows the frame of the 200 ms period that holds its start.
FRAME_S = 0.2


class RecordedInput:
  """A recording played as a stream: chunk t arrives at (t+1)*chunk_s + jitter; `drop`
  loses chunks at random (both simulate a network in live mode; offline ignores arrival).
  `wav_N` may be float audio or a `WavFile`: chunks are read when used."""

  def __init__(self, wav_N: np.ndarray, chunk_samples: int, *, chunk_s: float,
               jitter_s: float = 0.0, drop: float = 0.0, seed: int = 0, frames=None,
               jitter_buffer_s: float = 0.0):
    self.wav, self.S, self.chunk_s = wav_N, chunk_samples, chunk_s
    self.num_samples = wav_N.shape[0]
    self.num_chunks = -(-self.num_samples // chunk_samples)
    self.jitter_buffer_s = jitter_buffer_s
    rng = np.random.default_rng(seed)
    self.arrival_s = (np.arange(1, self.num_chunks + 1) * chunk_s
                      + rng.uniform(0, jitter_s, self.num_chunks))
    self.dropped = rng.random(self.num_chunks) < drop
    period = int(round(FRAME_S * chunk_samples / chunk_s))  # samples per video frame
    self.frames = check_frames(frames, -(-self.num_samples // period))

  def chunk(self, t: int) -> np.ndarray:
    out = np.zeros(self.S, np.float32)
    piece = io.to_float(np.asarray(self.wav[t * self.S:(t + 1) * self.S]))
    out[:piece.size] = piece
    return out

  def get(self, t: int, clock) -> tuple[np.ndarray | None, float]:
    """(chunk t's audio or None when lost or later than the jitter buffer, seconds waited
    for it past its due time)."""
    if not clock.live:
      return self.chunk(t), 0.0
    due = (t + 1) * self.chunk_s
    deadline = due + self.jitter_buffer_s
    arrives = np.inf if self.dropped[t] else float(self.arrival_s[t])
    now = clock.now_s()
    if arrives > now:
      clock.wait_until(min(arrives, deadline))
    waited = max(0.0, min(arrives, deadline) - max(now, due)) if arrives > now else 0.0
    return (self.chunk(t) if arrives <= deadline else None), waited

  def frame_index(self, t: int) -> int:
    return int(np.floor(t * self.chunk_s / FRAME_S + 1e-9))

  def frame(self, t: int):
    i = self.frame_index(t)
    if self.frames is None or i >= len(self.frames):
      return None
    return self.frames[i]

  def video_ends_at(self, t: int) -> bool:
    """Chunk t is the first without a frame, in a run that had video."""
    if self.frames is None or not len(self.frames):
      return False
    n = len(self.frames)
    return self.frame_index(t) >= n and (t == 0 or self.frame_index(t - 1) < n)


def check_frames(frames, num_chunks: int):
  """Video frames as uint8 [N, H, W, 3], N <= num_chunks (one per 200 ms chunk; a video that
  ends early leaves the later chunks without a frame), or a ValueError naming the fix."""
  if frames is None:
    return None
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"video frames have shape {frames.shape}; expected [N, H, W, 3] RGB, one "
                     "frame per 200 ms chunk (a single frame is frames[None]).")
  if frames.dtype != np.uint8:
    hint = ("np.clip(frames * 255, 0, 255).astype(np.uint8)"
            if np.issubdtype(frames.dtype, np.floating) else "frames.astype(np.uint8)")
    raise ValueError(f"video frames have dtype {frames.dtype}; expected uint8 RGB in [0, 255]. "
                     f"Convert them, e.g. {hint}.")
  if len(frames) > num_chunks:
    raise ValueError(
        f"{len(frames)} video frames for {num_chunks} chunks of audio: one frame per 200 ms "
        f"chunk is expected (5 fps); subsample the video (e.g. frames[::6] for 30 fps) or "
        "check that the audio is complete.")
  return frames


def _wav_header(path: str):
  try:
    with wave.open(path, "rb") as w:
      return w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
  except (wave.Error, EOFError, OSError):
    return None


class WavFile:
  """A mono int16 wav read piece by piece (`wav[a:b]`), as the engine plays it: memory holds
  one chunk, not the recording. (A memory map would do, but its pages stay resident: an
  hour of input would add 115 MB to the process's RSS.)"""
  dtype, ndim = np.dtype(np.int16), 1

  def __init__(self, path: str):
    self.path = path
    self._f = wave.open(path, "rb")
    self.shape = (self._f.getnframes(),)

  def __getitem__(self, piece: slice) -> np.ndarray:
    start, stop, _ = piece.indices(self.shape[0])
    if stop <= start:
      return np.zeros(0, np.int16)
    self._f.setpos(start)
    return np.frombuffer(self._f.readframes(stop - start), "<i2")

  def close(self):
    self._f.close()


def open_wav(path: str, sample_rate: int = io.SAMPLE_RATE):
  """A wav as the engine's input: a `WavFile` read as it is played when it is mono int16
  PCM at `sample_rate`, else the samples loaded, checked and resampled as a whole."""
  head = _wav_header(path) if os.path.exists(path) else None
  if head is not None and head[:3] == (1, 2, sample_rate) and head[3] > 0:
    return WavFile(path)
  wav, rate = io.load_wav(path)  # integer PCM comes back scaled to [-1, 1)
  wav_N = io.check_wav(wav, rate, name=path)
  io.check_float_scale(wav, wav_N, path)
  return wav_N


def typed_text(events) -> list[tuple[float, str]]:
  """(time_s, text) of what the user typed, from a sample's or a corpus record's events (kind
  `typed_text`): the TEXT_IN a system is given. The corpus' background results and reminder
  firings are not in it: a system's own worker and tools make those."""
  return [(float(e["start_s"]), e["data"]["text"]) for e in events
          if e.get("kind") == "typed_text"]


def sample_typed_text(folder: str) -> list[tuple[float, str]]:
  """`typed_text` of a sample folder's annotations.json (none without one)."""
  path = os.path.join(folder, "annotations.json")
  if not os.path.isfile(path):
    return []
  import json
  with open(path) as f:
    ann = json.load(f)
  return typed_text(ann.get("events") or []) if isinstance(ann, dict) else []


def load_input(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """A 16 kHz wav, or a Full-Duplex-Bench sample folder (input.wav, optional video.npy
  [T, H, W, 3] or frames/*.png|jpg, one frame per chunk). NaN/Inf or unusable rates fail."""
  frames = None
  if os.path.isdir(path):
    wav_path = os.path.join(path, "input.wav")
    if not os.path.exists(wav_path):
      raise FileNotFoundError(f"{path!r} is a folder without input.wav; pass a 16 kHz wav or a "
                              "Full-Duplex-Bench sample folder (input.wav + optional frames).")
    if os.path.exists(os.path.join(path, "video.npy")):
      frames = np.load(os.path.join(path, "video.npy"))
    elif os.path.isdir(os.path.join(path, "frames")):
      from PIL import Image
      d = os.path.join(path, "frames")
      names = sorted(n for n in os.listdir(d) if n.lower().endswith((".png", ".jpg", ".jpeg")))
      frames = np.stack([np.asarray(Image.open(os.path.join(d, n)).convert("RGB"))
                         for n in names]) if names else None
  else:
    wav_path = path
  return open_wav(wav_path), frames


class LiveInput:
  """Microphone audio arriving over a network in frames of any length, re-chunked to
  micro-turns on the wall clock (`now`, seconds), through the jitter buffer.

  The stream's first sample was captured when the first frame arrived minus that frame's
  duration (`t0`); chunk t = samples [t*S, (t+1)*S) is due at t0 + (t+1)*chunk_s, and is
  ready when all of it has arrived or at its deadline, due + jitter_buffer_s, whichever
  comes first. At the deadline the model hears what has arrived of it (the rest as silence,
  counted as missing samples); samples that come after their chunk was taken are discarded
  and counted as late, so the stream stays on the clock. A client more than `max_ahead_s`
  ahead of the clock is refused the excess (ValueError).
  """

  def __init__(self, chunk_samples: int, *, chunk_s: float, jitter_buffer_s: float,
               max_ahead_s: float = 30.0, now=time.perf_counter):
    self.S, self.chunk_s, self.jitter_buffer_s = chunk_samples, chunk_s, jitter_buffer_s
    self.sample_rate = chunk_samples / chunk_s
    self.max_ahead_s, self.now = max_ahead_s, now
    self.t0 = None
    self._buf = bytearray()        # int16 samples from `_base` on
    self._base = 0                 # stream index of _buf's first sample
    self._taken = 0                # chunks handed to the model
    self._complete_at: dict[int, float] = {}  # chunk -> wall time its last sample arrived
    self.received_samples = self.late_samples = self.missing_samples = 0
    self.arrival_lag_s: list[float] = []  # per complete chunk: arrival - due (< 0: early)

  @property
  def started(self) -> bool:
    return self.t0 is not None

  def push(self, pcm: bytes):
    """One client frame: little-endian int16 mono at the stream's rate, any length."""
    if len(pcm) % 2:
      raise ValueError(f"an audio frame of {len(pcm)} bytes: 16-bit PCM frames hold an even "
                       "number of bytes (2 per sample)")
    now, n = self.now(), len(pcm) // 2
    if self.t0 is None:
      self.t0 = now - n / self.sample_rate
    start = self.received_samples
    ahead_s = (start + n) / self.sample_rate - (now - self.t0)
    if ahead_s > self.max_ahead_s:
      raise ValueError(f"the client is {ahead_s:.1f} s ahead of real time (at most "
                       f"{self.max_ahead_s:.0f} s is buffered); send audio as it is captured")
    self.received_samples += n
    skip = max(0, self._taken * self.S - start)  # samples of chunks already taken: late
    self.late_samples += min(skip, n)
    if skip < n:
      self._buf += pcm[2 * skip:]
    end = self._base + len(self._buf) // 2
    for t in range(self._taken, end // self.S):
      self._complete_at.setdefault(t, now)

  def due(self, t: int) -> float:
    return self.t0 + (t + 1) * self.chunk_s

  def ready_at(self, t: int) -> float:
    """Wall time at which chunk t is ready: when it completed, else its deadline."""
    return self._complete_at.get(t, self.due(t) + self.jitter_buffer_s)

  def take(self, t: int) -> tuple[np.ndarray | None, int]:
    """(chunk t as float [S] or None when nothing of it arrived, samples missing from it).
    Chunks are taken in order, once each."""
    if t != self._taken:
      raise ValueError(f"chunk {t} taken after {self._taken} chunks: one at a time, in order")
    have = min(self.S, len(self._buf) // 2)
    audio = None
    if have:
      audio = np.zeros(self.S, np.float32)
      audio[:have] = io.to_float(np.frombuffer(bytes(self._buf[:2 * have]), "<i2"))
    del self._buf[:2 * have]
    self._base += have
    self._taken += 1
    self._base = max(self._base, self._taken * self.S)  # a partial chunk's rest never comes
    done = self._complete_at.pop(t, None)
    if done is not None:
      self.arrival_lag_s.append(done - self.due(t))
    self.missing_samples += self.S - have
    return audio, self.S - have
