"""Which (q block, kv block) pairs the micro-turn attention kernels visit, from metadata only.

The mask (docs/design.md §4) is a function of per-token metadata, so a cheap jnp pre-pass
reduces the metadata of every q block and kv block to a few ranges (chunk, doc,
prediction-chunk and slot extremes, any-valid, any-prefix) and classifies each pair as
SKIP / PARTIAL / FULL. The classification is sound for any metadata (a block with a visible
pair is never skipped, FULL only when every pair is visible) and, on chunk-major rows built
by `ChunkLayout.meta` (packed docs, prefix, invalid chunks or tokens), exact: the tests
compare it with the dense mask reduced per block. Per q block the visited kv blocks are
then compacted into a padded list plus a count.

Also here: `BlockSizes`, and the kernel-side token encoding (`Tokens`, `visible`) that lets
a kernel evaluate the mask of a PARTIAL block from three int32 tiles.

Shape legend: B batch, L length, nQ / nK number of q / kv blocks, V visits per block (padded).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tml_jax.microturn import Segment, TokenMeta, is_observation

SKIP, PARTIAL, FULL = 0, 1, 2

# Kernel-side token encoding (int32 each): chunk, code, doc.
#   key code: -2 PREFIX, -1 other observation, slot for a prediction (slots are >= 0);
#   query code: -1 observation (PREFIX included), slot for a prediction.
# Then "same chunk and (k is an observation or both predictions with slot_k <= slot_q)" is
# `k_code <= q_code`. Invalid tokens get distinct out-of-range docs, so no pair matches.
PREFIX_CODE, OBS_CODE = -2, -1
_Q_PAD_DOC = int(np.iinfo(np.int32).min)
_K_PAD_DOC = int(np.iinfo(np.int32).max)
_BIG = 2**29  # sentinel for empty min/max reductions; 2 * _BIG still fits in int32


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
  """Tiles and visit-list bounds; backward tiles default to the forward ones.

  Attributes:
    block_q, block_k: forward tiles. GPU (Triton) needs powers of two >= 16, TPU (Mosaic)
      multiples of 128. Shorter sequences shrink the tile to fit.
    block_q_bwd, block_k_bwd: tiles of the dQ and dK/dV kernels.
    num_warps, num_stages: Triton only.
    max_kv_blocks: bound on the kv blocks one q block visits (forward and dQ lists);
    max_q_blocks: bound on the q blocks that visit one kv block (dK/dV lists).
      On TPU a bound is the width of the innermost grid axis: leave None (every block:
      correct, but nK grid steps per q block) only for short rows, and derive it from the
      config for long ones (about window * chunk_len / block + 3, plus the prefix blocks;
      a prefix kv block is visited by every q block, so max_q_blocks = nQ with a prefix;
      `block_schedule(...).num_visits.max()` gives the exact value for a row). A row that
      needs more visits than its bound makes the output NaN, never silently wrong. The
      Triton kernels loop to each block's own count: GPU needs no bounds.
  """
  block_q: int = 128
  block_k: int = 128
  block_q_bwd: int | None = None
  block_k_bwd: int | None = None
  num_warps: int | None = None
  num_stages: int = 2
  max_kv_blocks: int | None = None
  max_q_blocks: int | None = None

  @property
  def bwd(self) -> tuple[int, int]:
    return self.block_q_bwd or self.block_q, self.block_k_bwd or self.block_k


class Tokens(NamedTuple):
  """Encoded metadata (see `encode_q` / `encode_k`), int32 `[B, L]` each."""
  chunk: jax.Array
  code: jax.Array
  doc: jax.Array


class BlockSchedule(NamedTuple):
  """Which kv blocks each q block visits.

  kv_index: int32 `[B, nQ, V]` kv block ids, visited ones first in increasing order; entries
    past `num_visits` repeat the last visited id (so a TPU pipeline issues no new copy).
  kv_flag: int32 `[B, nQ, V]` PARTIAL or FULL for visited entries, SKIP for padding.
  num_visits: int32 `[B, nQ]`.
  block_flag: int32 `[B, nQ, nK]` the dense classification (SKIP / PARTIAL / FULL).
  """
  kv_index: jax.Array
  kv_flag: jax.Array
  num_visits: jax.Array
  block_flag: jax.Array


# ----------------------------------------------------------------------------- encoding


def encode_q(meta: TokenMeta) -> Tokens:
  seg, slot = jnp.asarray(meta.segment, jnp.int32), jnp.asarray(meta.slot, jnp.int32)
  code = jnp.where(is_observation(seg), OBS_CODE, slot)
  doc = jnp.where(jnp.asarray(meta.valid, bool), jnp.asarray(meta.doc, jnp.int32), _Q_PAD_DOC)
  return Tokens(jnp.asarray(meta.chunk, jnp.int32), code, doc)


def encode_k(meta: TokenMeta) -> Tokens:
  seg, slot = jnp.asarray(meta.segment, jnp.int32), jnp.asarray(meta.slot, jnp.int32)
  code = jnp.where(seg == int(Segment.PREFIX), PREFIX_CODE,
                   jnp.where(is_observation(seg), OBS_CODE, slot))
  doc = jnp.where(jnp.asarray(meta.valid, bool), jnp.asarray(meta.doc, jnp.int32), _K_PAD_DOC)
  return Tokens(jnp.asarray(meta.chunk, jnp.int32), code, doc)


def visible(q: Tokens, k: Tokens, window: int | None):
  """docs/design.md §4 on encoded tokens; q fields shaped `[bq, 1]`, k fields `[1, bk]`."""
  earlier = k.chunk < q.chunk
  if window is not None:
    earlier = earlier & (q.chunk - k.chunk < window)
  same_chunk = (k.chunk == q.chunk) & (k.code <= q.code)
  return (q.doc == k.doc) & ((k.code == PREFIX_CODE) | earlier | same_chunk)


def pad_meta(meta: TokenMeta, length: int) -> TokenMeta:
  """Pad every field to `length` tokens; the padding is invalid (valid pads with False)."""
  pad = length - meta.chunk.shape[1]
  if pad == 0:
    return TokenMeta(*(jnp.asarray(f) for f in meta))
  fill = lambda f: jnp.pad(jnp.asarray(f), ((0, 0), (0, pad)))
  return TokenMeta(*(fill(f) for f in meta))


# ----------------------------------------------------------------------------- block stats


def _rmin(x, m):
  return jnp.min(jnp.where(m, x, _BIG), axis=-1)


def _rmax(x, m):
  return jnp.max(jnp.where(m, x, -_BIG), axis=-1)


def _block_fields(meta: TokenMeta, blk: int):
  split = lambda f: jnp.asarray(f).reshape(f.shape[0], -1, blk)
  c, seg, s, d = (split(jnp.asarray(f, jnp.int32))
                  for f in (meta.chunk, meta.segment, meta.slot, meta.doc))
  valid = split(jnp.asarray(meta.valid, bool))
  return c, seg, s, d, valid


def q_block_stats(meta: TokenMeta, blk: int) -> dict:
  c, seg, s, d, valid = _block_fields(meta, blk)
  obs = valid & is_observation(seg)
  pred = valid & ~obs
  cmin, cmax = _rmin(c, valid), _rmax(c, valid)
  pmin, pmax = _rmin(c, pred), _rmax(c, pred)
  at = lambda m, ref: m & (c == ref[..., None])
  return dict(
      any=valid.any(-1), all=valid.all(-1), cmin=cmin, cmax=cmax,
      dmin=_rmin(d, valid), dmax=_rmax(d, valid), pmin=pmin, pmax=pmax,
      slotmax_at_pmin=_rmax(s, at(pred, pmin)), slotmax_at_pmax=_rmax(s, at(pred, pmax)),
      obs_at_cmin=at(obs, cmin).any(-1), slotmin_at_cmin=_rmin(s, at(pred, cmin)))


def k_block_stats(meta: TokenMeta, blk: int) -> dict:
  c, seg, s, d, valid = _block_fields(meta, blk)
  prefix = valid & (seg == int(Segment.PREFIX))
  rest = valid & ~prefix  # rules 1-3 only; PREFIX keys are visible whatever the chunk
  pred = valid & ~is_observation(seg)
  obs = rest & ~pred
  cmax = _rmax(c, rest)
  pmin, pmax = _rmin(c, pred), _rmax(c, pred)
  at = lambda m, ref: m & (c == ref[..., None])
  return dict(
      all=valid.all(-1), dmin=_rmin(d, valid), dmax=_rmax(d, valid),
      pre_dmin=_rmin(d, prefix), pre_dmax=_rmax(d, prefix),
      rest_dmin=_rmin(d, rest), rest_dmax=_rmax(d, rest),
      cmin=_rmin(c, rest), cmax=cmax, ocmin=_rmin(c, obs), ocmax=_rmax(c, obs),
      pmin=pmin, pmax=pmax,
      slotmin_at_pmin=_rmin(s, at(pred, pmin)), slotmin_at_pmax=_rmin(s, at(pred, pmax)),
      pred_at_cmax=at(pred, cmax).any(-1), slotmax_at_cmax=_rmax(s, at(pred, cmax)))


# ----------------------------------------------------------------------------- classify


def classify(qs: dict, ks: dict, window: int | None) -> jax.Array:
  """int32 `[B, nQ, nK]`: SKIP / PARTIAL / FULL (see the module docstring for guarantees)."""
  q = {n: x[:, :, None] for n, x in qs.items()}
  k = {n: x[:, None, :] for n, x in ks.items()}
  overlap = lambda a0, a1, b0, b1: (a0 <= b1) & (b0 <= a1)
  # Some pair may be visible (an over-approximation from ranges).
  prefix = overlap(q["dmin"], q["dmax"], k["pre_dmin"], k["pre_dmax"])
  earlier = q["cmax"] > k["cmin"]
  if window is not None:
    earlier &= q["cmin"] - k["cmax"] < window
  same_obs = overlap(q["cmin"], q["cmax"], k["ocmin"], k["ocmax"])
  lo, hi = jnp.maximum(q["pmin"], k["pmin"]), jnp.minimum(q["pmax"], k["pmax"])
  # Only the first/last prediction chunk of a block can hold part of that chunk's slots.
  q_slotmax = lambda c: jnp.where(c == q["pmax"], q["slotmax_at_pmax"],
                                  jnp.where(c == q["pmin"], q["slotmax_at_pmin"], _BIG))
  k_slotmin = lambda c: jnp.where(c == k["pmin"], k["slotmin_at_pmin"],
                                  jnp.where(c == k["pmax"], k["slotmin_at_pmax"], -_BIG))
  same_pred = (lo <= hi) & ((hi - lo >= 2) | (q_slotmax(lo) >= k_slotmin(lo))
                            | (q_slotmax(hi) >= k_slotmin(hi)))
  rest_doc = overlap(q["dmin"], q["dmax"], k["rest_dmin"], k["rest_dmax"])
  visit = q["any"] & (prefix | (rest_doc & (earlier | same_obs | same_pred)))
  # Every pair is visible (exact: these conditions are necessary and sufficient).
  one_doc = (q["all"] & k["all"] & (q["dmin"] == q["dmax"]) & (k["dmin"] == k["dmax"])
             & (q["dmin"] == k["dmin"]))
  ordered = k["cmax"] <= q["cmin"]
  if window is not None:
    ordered &= q["cmax"] - k["cmin"] < window
  tie_ok = ((k["cmax"] < q["cmin"]) | ~k["pred_at_cmax"]
            | (~q["obs_at_cmin"] & (k["slotmax_at_cmax"] <= q["slotmin_at_cmin"])))
  full = one_doc & ordered & tie_ok
  return jnp.where(full, FULL, jnp.where(visit, PARTIAL, SKIP)).astype(jnp.int32)


def block_flags(q_meta: TokenMeta, kv_meta: TokenMeta, window: int | None, block_q: int,
                block_k: int) -> jax.Array:
  """`classify` of block-aligned metadata: int32 `[B, nQ, nK]`."""
  return classify(q_block_stats(q_meta, block_q), k_block_stats(kv_meta, block_k), window)


# ----------------------------------------------------------------------------- compaction


def compact(block_flag: jax.Array, width: int | None = None) -> BlockSchedule:
  """Dense `[B, n, m]` flags -> per-row visit lists padded to `width` (default m)."""
  m = block_flag.shape[-1]
  width = m if width is None else width
  j = jnp.arange(m, dtype=jnp.int32)
  order = jnp.argsort(jnp.where(block_flag > 0, j, m + j), axis=-1).astype(jnp.int32)
  count = jnp.minimum(jnp.sum(block_flag > 0, axis=-1, dtype=jnp.int32), width)
  if width > m:
    order = jnp.pad(order, ((0, 0), (0, 0), (0, width - m)))
  order = order[..., :width]
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  live = jnp.arange(width, dtype=jnp.int32)[None, None, :] < count[..., None]
  index = jnp.where(live, order, last)
  flag = jnp.where(live, jnp.take_along_axis(block_flag, index, axis=-1), SKIP)
  return BlockSchedule(index, flag, count, block_flag)


def pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def bounded_schedule(block_flag: jax.Array, bound: int | None, *, pow2_width: bool):
  """(visit lists of `block_flag` at most `bound` wide, whether some row needed more).

  pow2_width: round the width up to a power of two (Triton blocks are powers of two; a
  wider list costs nothing there, while on TPU the width is a grid axis).
  """
  n = block_flag.shape[-1]
  width = n if bound is None else min(bound, n)
  overflow = jnp.any(jnp.sum(block_flag > 0, axis=-1) > width)
  return compact(block_flag, pow2(width) if pow2_width else width), overflow


def block_schedule(q_meta: TokenMeta, kv_meta: TokenMeta, window: int | None, block_q: int,
                   block_k: int) -> BlockSchedule:
  """The kv blocks each q block must visit, with SKIP / PARTIAL / FULL flags.

  Lengths that are not multiples of the block sizes are padded with invalid tokens. The
  visit lists are padded to a power of two (Triton needs power-of-two blocks).
  """
  tq = -(-q_meta.chunk.shape[1] // block_q) * block_q
  tk = -(-kv_meta.chunk.shape[1] // block_k) * block_k
  flags = block_flags(pad_meta(q_meta, tq), pad_meta(kv_meta, tk), window, block_q, block_k)
  return compact(flags, pow2(flags.shape[-1]))
