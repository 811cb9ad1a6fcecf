"""The micro-turn contract in one file: streams, token metadata, packing, text queues, masks.

docs/design.md §3-4 describe it; nothing else in the code base defines any of it. A sequence
is an optional PREFIX block followed by `num_chunks` chunks; every chunk has the same fixed
slot counts per segment, in the order of `Segment` (observations first, then predictions).
Shapes are static per config, so the position of every segment inside the flat sequence is
known at trace time and packing is a reshape.

Reading order: `Segment` and `is_observation`; `TokenMeta`; `ChunkLayout` (slot counts,
window, metadata builders, pack/unpack); `TextFifo` (how text arriving per chunk fills the
fixed slots, for training rows and for the live engine alike); `microturn_mask`, the
background model's `context_mask`; `render_mask_png`.

Shape legend: B batch, C chunks, S slots of one segment, K = chunk_len, L = flat length,
P prefix length, D features.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Segment(enum.IntEnum):
  USER_AUDIO = 0
  SELF_AUDIO = 1
  VIDEO = 2
  TEXT_IN = 3
  MODEL_TEXT = 4
  MODEL_AUDIO = 5
  PREFIX = 6


CHUNK_SEGMENTS = (Segment.USER_AUDIO, Segment.SELF_AUDIO, Segment.VIDEO, Segment.TEXT_IN,
                  Segment.MODEL_TEXT, Segment.MODEL_AUDIO)
OBSERVATIONS = (Segment.USER_AUDIO, Segment.SELF_AUDIO, Segment.VIDEO, Segment.TEXT_IN,
                Segment.PREFIX)
PREDICTIONS = (Segment.MODEL_TEXT, Segment.MODEL_AUDIO)


def is_observation(segment):
  """True for observation segment ids (0-3 and PREFIX), False for predictions (4-5).

  Works on Python ints, numpy and jax arrays (traced values included)."""
  return (segment <= int(Segment.TEXT_IN)) | (segment == int(Segment.PREFIX))


class TokenMeta(NamedTuple):
  """Per-token metadata, each field `[batch, length]` (a pytree, so it passes through jit)."""
  chunk: jnp.ndarray    # int32, time index (chunk t covers [t*chunk_ms, (t+1)*chunk_ms))
  segment: jnp.ndarray  # int32, a `Segment` id
  slot: jnp.ndarray     # int32, position inside the chunk (prefix tokens: position in prefix)
  doc: jnp.ndarray      # int32, conversation id, for packing several into one row
  valid: jnp.ndarray    # bool, False for padding

  def slice(self, start: int, stop: int) -> "TokenMeta":
    return TokenMeta(*(f[:, start:stop] for f in self))

  def concat(self, other: "TokenMeta") -> "TokenMeta":
    xp = jnp if any(isinstance(f, jnp.ndarray) and not isinstance(f, np.ndarray)
                    for f in (*self, *other)) else np
    return TokenMeta(*(xp.concatenate([a, b], axis=1) for a, b in zip(self, other)))


def frames_per_chunk(chunk_ms: int, sample_rate: int, hop: int) -> int:
  """dMel frames in one chunk; the chunk must hold a whole number of hops."""
  samples = chunk_ms * sample_rate
  if samples % 1000 or (samples // 1000) % hop:
    raise ValueError(
        f"layout.chunk_ms={chunk_ms} gives {samples / 1000:g} samples per chunk at "
        f"{sample_rate} Hz, not a multiple of the dMel hop {hop}. Fix: pick a chunk length that is "
        f"a multiple of {1000 * hop // np.gcd(1000 * hop, sample_rate)} ms (e.g. 100, 200, 400).")
  return samples // 1000 // hop


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
  """Slot counts of one chunk, the optional prefix block, and the attention window.

  window: how many chunks back a query may look (mask rule 1); None = unbounded.
  """
  user_audio: int = 8
  self_audio: int = 8
  video: int = 4
  text_in: int = 8
  model_text: int = 12
  model_audio: int = 8
  prefix: int = 0
  window: int | None = None

  @classmethod
  def from_config(cls, layout_cfg) -> "ChunkLayout":
    frames = frames_per_chunk(layout_cfg.chunk_ms, layout_cfg.sample_rate, layout_cfg.hop)
    return cls(user_audio=frames, self_audio=frames, video=layout_cfg.video_slots,
               text_in=layout_cfg.text_in_slots, model_text=layout_cfg.model_text_slots,
               model_audio=layout_cfg.model_audio_slots, prefix=layout_cfg.prefix_slots,
               window=layout_cfg.get("window", None))

  def slots(self, segment: Segment) -> int:
    return {Segment.USER_AUDIO: self.user_audio, Segment.SELF_AUDIO: self.self_audio,
            Segment.VIDEO: self.video, Segment.TEXT_IN: self.text_in,
            Segment.MODEL_TEXT: self.model_text, Segment.MODEL_AUDIO: self.model_audio,
            Segment.PREFIX: self.prefix}[Segment(segment)]

  @property
  def chunk_len(self) -> int:
    return sum(self.slots(s) for s in CHUNK_SEGMENTS)

  def offset(self, segment: Segment) -> int:
    """First slot of `segment` inside a chunk."""
    off = 0
    for s in CHUNK_SEGMENTS:
      if s == segment:
        return off
      off += self.slots(s)
    raise ValueError(f"{segment!r} is not a per-chunk segment")

  def seq_len(self, num_chunks: int) -> int:
    return self.prefix + num_chunks * self.chunk_len

  def chunk_meta(self, num_chunks: int, first_chunk: int = 0) -> dict[str, np.ndarray]:
    """chunk/segment/slot `[L]` for chunks [first_chunk, first_chunk + num_chunks), no prefix."""
    seg_K = np.concatenate([np.full(self.slots(s), int(s), np.int32) for s in CHUNK_SEGMENTS])
    chunk = np.repeat(np.arange(first_chunk, first_chunk + num_chunks, dtype=np.int32),
                      self.chunk_len)
    return dict(chunk=chunk, segment=np.tile(seg_K, num_chunks),
                slot=np.tile(np.arange(self.chunk_len, dtype=np.int32), num_chunks))

  def chunk_token_meta(self, t, video_valid=True) -> TokenMeta:
    """jnp `TokenMeta` [1, K] of the one chunk t (serving; t and video_valid may be traced)."""
    cm = self.chunk_meta(1)
    seg_K = jnp.asarray(cm["segment"])
    valid = jnp.where(seg_K == int(Segment.VIDEO), video_valid, True)
    K = self.chunk_len
    return TokenMeta(chunk=jnp.full((1, K), t, jnp.int32), segment=seg_K[None],
                     slot=jnp.asarray(cm["slot"])[None], doc=jnp.zeros((1, K), jnp.int32),
                     valid=valid[None])

  def prefix_meta(self) -> TokenMeta:
    """jnp `TokenMeta` [1, P] of the prefix block (chunk 0, doc 0)."""
    P = self.prefix
    return TokenMeta(chunk=jnp.zeros((1, P), jnp.int32),
                     segment=jnp.full((1, P), int(Segment.PREFIX), jnp.int32),
                     slot=jnp.arange(P, dtype=jnp.int32)[None],
                     doc=jnp.zeros((1, P), jnp.int32), valid=jnp.ones((1, P), bool))

  def meta(self, num_chunks: int, batch: int = 1, doc_BC: np.ndarray | None = None,
           valid_BC: np.ndarray | None = None, valid_BL: np.ndarray | None = None) -> TokenMeta:
    """Metadata of a full training row (prefix + chunks) as numpy arrays.

    doc_BC: conversation id of each chunk (packing); the prefix belongs to chunk 0's doc.
    valid_BC: chunks that hold data (False = padding). valid_BL: a finer per-token mask that
    is and-ed in (e.g. the VIDEO slots of a conversation without video).
    """
    cm = self.chunk_meta(num_chunks)
    doc_BC = np.zeros((batch, num_chunks), np.int32) if doc_BC is None else np.asarray(doc_BC)
    valid_BC = (np.ones((batch, num_chunks), bool) if valid_BC is None
                else np.asarray(valid_BC, bool))
    K, P = self.chunk_len, self.prefix
    doc = np.concatenate([np.repeat(doc_BC[:, :1], P, 1), np.repeat(doc_BC, K, 1)], 1)
    valid = np.concatenate([np.repeat(valid_BC[:, :1], P, 1), np.repeat(valid_BC, K, 1)], 1)
    if valid_BL is not None:
      valid = valid & np.asarray(valid_BL, bool)
    pre = lambda v: np.full((batch, P), v, np.int32)
    return TokenMeta(
        chunk=np.concatenate([pre(0), np.broadcast_to(cm["chunk"], (batch, num_chunks * K))], 1),
        segment=np.concatenate([pre(int(Segment.PREFIX)),
                                np.broadcast_to(cm["segment"], (batch, num_chunks * K))], 1),
        slot=np.concatenate([np.broadcast_to(np.arange(P, dtype=np.int32), (batch, P)),
                             np.broadcast_to(cm["slot"], (batch, num_chunks * K))], 1),
        doc=doc.astype(np.int32), valid=valid)

  def pack(self, streams: Mapping[Segment, jnp.ndarray]) -> jnp.ndarray:
    """Per-segment arrays `[B, C, S, ...]` (and PREFIX `[B, P, ...]`) -> flat `[B, L, ...]`.

    Every per-chunk segment with a non-zero slot count must be present.
    """
    parts, ref = [], None
    for s in CHUNK_SEGMENTS:
      if self.slots(s) == 0:
        continue
      x = streams[s]
      if x.shape[2] != self.slots(s):
        raise ValueError(f"{s.name} stream has {x.shape[2]} slots, layout expects {self.slots(s)}")
      parts.append(x)
      ref = x
    x_BCK = jnp.concatenate(parts, axis=2)
    B, C = ref.shape[:2]
    x_BL = x_BCK.reshape(B, C * self.chunk_len, *ref.shape[3:])
    if self.prefix:
      x_BL = jnp.concatenate([streams[Segment.PREFIX], x_BL], axis=1)
    return x_BL

  def unpack(self, x_BL: jnp.ndarray, segment: Segment) -> jnp.ndarray:
    """Flat `[B, L, ...]` -> the `[B, C, S, ...]` slots of one segment (`[B, P, ...]` for PREFIX)."""
    if segment == Segment.PREFIX:
      return x_BL[:, :self.prefix]
    B, L = x_BL.shape[:2]
    C = (L - self.prefix) // self.chunk_len
    x_BCK = x_BL[:, self.prefix:].reshape(B, C, self.chunk_len, *x_BL.shape[2:])
    off = self.offset(segment)
    return x_BCK[:, :, off:off + self.slots(segment)]


class TextFifo:
  """Text arriving per chunk laid into a fixed number of slots per chunk, first come first
  served: what arrives in chunk k takes the first free slots from chunk k on, so a long
  answer spills over several chunks instead of being cut. Unused slots are PAD.

  reserve_eot: keep the last slot of every chunk for an EOT after the chunk's tokens (the
  MODEL_TEXT targets: "this is all I say in this chunk"; EOT alone means silence).

  The training pipeline lays a whole conversation with `layout` (arrivals known in advance);
  the engine calls `push` as text arrives and `take` once per micro-turn, with a `capacity`
  in tokens so that a flood of text cannot grow the queue without bound. Both go through
  `take`, so they cannot drift apart.
  """

  def __init__(self, slots: int, *, reserve_eot: bool = False, capacity: int | None = None):
    self.slots, self.reserve_eot, self.capacity = slots, reserve_eot, capacity
    self.queue: list[int] = []
    self.dropped = 0  # tokens dropped so far because the queue was full

  def push(self, tokens) -> int:
    """Queues `tokens`; past `capacity` (the engine's bound) the oldest queued tokens are
    dropped. Returns how many were dropped by this push."""
    self.queue.extend(int(t) for t in tokens)
    over = 0 if self.capacity is None else max(0, len(self.queue) - self.capacity)
    if over:
      del self.queue[:over]
      self.dropped += over
    return over

  def take(self) -> np.ndarray:
    """The next chunk's `[slots]` int32 tokens."""
    from tml_jax.text import tokenizer as tok
    room = self.slots - 1 if self.reserve_eot else self.slots
    head, self.queue = self.queue[:room], self.queue[room:]
    out = np.full((self.slots,), tok.PAD, np.int32)
    out[:len(head)] = head
    if self.reserve_eot:
      out[len(head)] = tok.EOT
    return out

  def __len__(self) -> int:
    return len(self.queue)

  @classmethod
  def layout(cls, items_per_chunk, slots: int, *, reserve_eot: bool = False) -> np.ndarray:
    """`[C, slots]`: the token lists arriving in each of C chunks, laid out by `take`."""
    fifo = cls(slots, reserve_eot=reserve_eot)
    rows = []
    for items in items_per_chunk:
      fifo.push(items)
      rows.append(fifo.take())
    return np.stack(rows) if rows else np.zeros((0, slots), np.int32)


def microturn_mask(q_meta: TokenMeta, kv_meta: TokenMeta, window: int | None) -> jnp.ndarray:
  """Dense boolean mask `[B, Lq, Lk]`: True where query q may attend to key k (rules 1-4 of
  docs/design.md §4)."""
  q = {f: jnp.asarray(v)[:, :, None] for f, v in q_meta._asdict().items()}
  k = {f: jnp.asarray(v)[:, None, :] for f, v in kv_meta._asdict().items()}
  same_doc = (q["doc"] == k["doc"]) & q["valid"] & k["valid"]
  earlier = k["chunk"] < q["chunk"]
  if window is not None:
    earlier = earlier & (q["chunk"] - k["chunk"] < window)
  same_chunk = q["chunk"] == k["chunk"]
  k_obs = is_observation(k["segment"])
  both_pred = ~is_observation(q["segment"]) & ~k_obs
  causal_pred = same_chunk & both_pred & (k["slot"] <= q["slot"])
  prefix = k["segment"] == int(Segment.PREFIX)
  return same_doc & (earlier | (same_chunk & k_obs) | causal_pred | prefix)


def context_mask(meta: TokenMeta, chunk_BN, window: int | None):
  """`[B, N, L]`: what a delegation made in chunk c may read, for the background model.

  It sees the whole conversation so far: every valid token of chunks <= c, its own chunk's
  predictions included (the DELEGATE was emitted there). `window` bounds the view to chunks
  (c-W, c] plus the prefix, as the interaction model sees it; None = unbounded. c < 0: none.
  """
  ch = jnp.asarray(meta.chunk)[:, None, :]
  c = jnp.asarray(chunk_BN)[:, :, None]
  seen = ch <= c
  if window is not None:
    seen = seen & ((c - ch < window) | (jnp.asarray(meta.segment)[:, None, :]
                                        == int(Segment.PREFIX)))
  return seen & jnp.asarray(meta.valid)[:, None, :] & (c >= 0)


def pooled_tokens(meta: TokenMeta):
  """`[B, L]` bool: the tokens a chunk's history vector averages (the background model's
  compact memory of chunks beyond the window): the chunk's valid observations (user and
  self audio, video, TEXT_IN; the prefix is always in view and is not pooled)."""
  seg = jnp.asarray(meta.segment)
  return (is_observation(seg) & (seg != int(Segment.PREFIX))) & jnp.asarray(meta.valid)


def history_mask(chunk_BN, hist_chunk_BH, window: int | None, horizon: int):
  """`[B, N, H]`: which history vectors (one per chunk, at chunks `hist_chunk_BH`, -1 for an
  empty slot) a delegation made in chunk c reads: those of chunks c - horizon < k <= c - W,
  the part of the conversation its window no longer holds. None window or horizon 0: none."""
  c = jnp.asarray(chunk_BN)[:, :, None]
  k = jnp.asarray(hist_chunk_BH)[:, None, :]
  if window is None or horizon <= 0:
    return jnp.zeros(c.shape[:2] + k.shape[-1:], bool)
  return (k >= 0) & (c - k >= window) & (c - k < horizon) & (c >= 0)


def render_mask_png(meta: TokenMeta, window: int | None, path: str, *, row: int = 0,
                    title: str | None = None) -> str:
  """Draw the mask of one batch row, coloured by the rule that opens each pair."""
  from matplotlib.colors import ListedColormap
  from matplotlib.figure import Figure  # no pyplot: a notebook's backend is left alone
  from matplotlib.patches import Rectangle

  m = TokenMeta(*(np.asarray(f)[row:row + 1] for f in meta))
  allowed = np.asarray(microturn_mask(m, m, window))[0]
  chunk, seg, slot = m.chunk[0], m.segment[0], m.slot[0]
  q_chunk, k_chunk = chunk[:, None], chunk[None, :]
  kind = np.zeros(allowed.shape, np.int8)  # 0 masked
  kind[allowed & (k_chunk < q_chunk)] = 1  # earlier chunk in window
  kind[allowed & (k_chunk == q_chunk) & is_observation(seg)[None, :]] = 2  # same-chunk observation
  kind[allowed & (k_chunk == q_chunk) & ~is_observation(seg)[None, :]] = 3  # causal prediction
  kind[allowed & (seg == int(Segment.PREFIX))[None, :]] = 4  # prefix
  cmap = ListedColormap(["#ffffff", "#9ecae1", "#31a354", "#e6550d", "#756bb1"])
  fig = Figure(figsize=(8, 8), dpi=120)
  ax = fig.subplots()
  ax.imshow(kind, cmap=cmap, vmin=0, vmax=4, interpolation="nearest")
  bounds = np.flatnonzero(np.diff(chunk)) + 0.5
  for b in bounds:
    ax.axhline(b, color="#888888", lw=0.3)
    ax.axvline(b, color="#888888", lw=0.3)
  ax.set_xlabel("key token")
  ax.set_ylabel("query token")
  names = ["masked", "earlier chunk", "same-chunk observation", "causal prediction", "prefix"]
  handles = [Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(5)]
  ax.legend(handles, names, loc="upper right", fontsize=7)
  ax.set_title(title or f"micro-turn mask, window={window} chunks, {len(chunk)} tokens")
  fig.tight_layout()
  fig.savefig(path)
  return path
