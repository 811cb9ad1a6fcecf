"""The micro-turn sequence: token metadata, chunk-major packing and the attention mask.

DESIGN §4 is the contract. A sequence is an optional PREFIX block followed by `num_chunks`
chunks; every chunk has the same fixed slot counts per segment, in the order of `Segment`
(observations first, then predictions). Shapes are static per config, so the position of
every segment inside the flat sequence is known at trace time and packing is a reshape.

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
  """Slot counts of one chunk (DESIGN §4) plus the optional prefix block."""
  user_audio: int = 8
  self_audio: int = 8
  video: int = 4
  text_in: int = 8
  model_text: int = 12
  model_audio: int = 8
  prefix: int = 0

  @classmethod
  def from_config(cls, layout_cfg) -> "ChunkLayout":
    frames = frames_per_chunk(layout_cfg.chunk_ms, layout_cfg.sample_rate, layout_cfg.hop)
    return cls(user_audio=frames, self_audio=frames, video=layout_cfg.video_slots,
               text_in=layout_cfg.text_in_slots, model_text=layout_cfg.model_text_slots,
               model_audio=layout_cfg.model_audio_slots, prefix=layout_cfg.prefix_slots)

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


def _is_obs(segment):
  return (segment <= int(Segment.TEXT_IN)) | (segment == int(Segment.PREFIX))


def microturn_mask(q_meta: TokenMeta, kv_meta: TokenMeta, window: int | None) -> jnp.ndarray:
  """Dense boolean mask `[B, Lq, Lk]`: True where query q may attend to key k (DESIGN §4)."""
  q = {f: jnp.asarray(v)[:, :, None] for f, v in q_meta._asdict().items()}
  k = {f: jnp.asarray(v)[:, None, :] for f, v in kv_meta._asdict().items()}
  same_doc = (q["doc"] == k["doc"]) & q["valid"] & k["valid"]
  earlier = k["chunk"] < q["chunk"]
  if window is not None:
    earlier = earlier & (q["chunk"] - k["chunk"] < window)
  same_chunk = q["chunk"] == k["chunk"]
  k_obs = _is_obs(k["segment"])
  both_pred = ~_is_obs(q["segment"]) & ~k_obs
  causal_pred = same_chunk & both_pred & (k["slot"] <= q["slot"])
  prefix = k["segment"] == int(Segment.PREFIX)
  return same_doc & (earlier | (same_chunk & k_obs) | causal_pred | prefix)


def render_mask_png(meta: TokenMeta, window: int | None, path: str, *, row: int = 0,
                    title: str | None = None) -> str:
  """Draw the mask of one batch row, coloured by the rule that opens each pair."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap

  m = TokenMeta(*(np.asarray(f)[row:row + 1] for f in meta))
  allowed = np.asarray(microturn_mask(m, m, window))[0]
  chunk, seg, slot = m.chunk[0], m.segment[0], m.slot[0]
  q_chunk, k_chunk = chunk[:, None], chunk[None, :]
  kind = np.zeros(allowed.shape, np.int8)  # 0 masked
  kind[allowed & (k_chunk < q_chunk)] = 1  # earlier chunk in window
  kind[allowed & (k_chunk == q_chunk) & _is_obs(seg)[None, :]] = 2  # same-chunk observation
  kind[allowed & (k_chunk == q_chunk) & ~_is_obs(seg)[None, :]] = 3  # causal prediction
  kind[allowed & (seg == int(Segment.PREFIX))[None, :]] = 4  # prefix
  cmap = ListedColormap(["#ffffff", "#9ecae1", "#31a354", "#e6550d", "#756bb1"])
  fig, ax = plt.subplots(figsize=(8, 8), dpi=120)
  ax.imshow(kind, cmap=cmap, vmin=0, vmax=4, interpolation="nearest")
  bounds = np.flatnonzero(np.diff(chunk)) + 0.5
  for b in bounds:
    ax.axhline(b, color="#888888", lw=0.3)
    ax.axvline(b, color="#888888", lw=0.3)
  ax.set_xlabel("key token")
  ax.set_ylabel("query token")
  names = ["masked", "earlier chunk", "same-chunk observation", "causal prediction", "prefix"]
  handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(5)]
  ax.legend(handles, names, loc="upper right", fontsize=7)
  ax.set_title(title or f"micro-turn mask, window={window} chunks, {len(chunk)} tokens")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
