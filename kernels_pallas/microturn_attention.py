"""Flash attention under the micro-turn mask (DESIGN §4), skipping fully masked blocks.

Layout follows `jax.experimental.pallas.ops`: `BlockSizes`, the kernels, the `custom_vjp`
public function `microturn_attention`, and `microturn_attention_reference` in plain jnp.

How blocks are skipped. The mask is a function of per-token metadata only, so a cheap jnp
pre-pass (`block_schedule`) reduces the metadata of every q block and kv block to a few ranges
(chunk, doc, prediction-chunk and slot extremes, any-valid, any-prefix) and classifies each
(q block, kv block) pair as 0 skip / 1 partial / 2 full. The classification is sound for any
metadata (a block with a visible pair is never skipped, 'full' only when every pair is
visible) and, on chunk-major rows built by `ChunkLayout.meta` (packed docs, prefix, invalid
chunks or tokens), exact: the tests compare it with the dense mask reduced per block.
Per q block the visited kv blocks are compacted into a padded list plus a count; the kernels
loop over that list only (GPU/interpret: a dynamic-length loop; TPU: grid steps past the
count repeat the previous block index, so Pallas issues no copy, and do no work). Partial
blocks evaluate the mask from metadata tiles; full blocks skip it.

Backends: Triton on GPU, Mosaic on TPU (scalar-prefetched schedule), and interpret mode,
which is also what a CPU backend runs when `interpret=False` (so the model's "pallas"
attention backend works in CPU CI). Both public functions are jitted with `window`,
`block_sizes` and `interpret` static.

Numerics: float32 accumulation, logsumexp saved for the backward pass (FlashAttention-2),
rows without any visible key produce zeros (output and gradients) instead of NaN.

Shape legend: B batch, T query length, S key length, H query heads, K kv heads, G = H // K,
D head dim, nQ / nK number of q / kv blocks, V visits per block (padded).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from tml_jax.microturn import Segment, TokenMeta, microturn_mask

# Finite "minus infinity": keeps exp(m_old - m_new) free of inf - inf = NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
SKIP, PARTIAL, FULL = 0, 1, 2

# Kernel-side token encoding (int32 each): chunk, code, doc.
#   key code: -2 PREFIX, -1 other observation, slot for a prediction (slots are >= 0);
#   query code: -1 observation (PREFIX included), slot for a prediction.
# Then "same chunk and (k is an observation or both predictions with slot_k <= slot_q)" is
# `k_code <= q_code`. Invalid tokens get distinct out-of-range docs, so no pair matches.
_PREFIX_CODE, _OBS_CODE = -2, -1
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
  """Encoded metadata (see `_encode_q` / `_encode_k`), int32 `[B, L]` each."""
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


# ----------------------------------------------------------------------------- metadata


def _is_pred(segment):
  # Same partition as `tml_jax.microturn._is_obs`: everything that is not an observation.
  return ~((segment <= int(Segment.TEXT_IN)) | (segment == int(Segment.PREFIX)))


def _encode_q(meta: TokenMeta) -> Tokens:
  seg, slot = jnp.asarray(meta.segment, jnp.int32), jnp.asarray(meta.slot, jnp.int32)
  code = jnp.where(_is_pred(seg), slot, _OBS_CODE)
  doc = jnp.where(jnp.asarray(meta.valid, bool), jnp.asarray(meta.doc, jnp.int32), _Q_PAD_DOC)
  return Tokens(jnp.asarray(meta.chunk, jnp.int32), code, doc)


def _encode_k(meta: TokenMeta) -> Tokens:
  seg, slot = jnp.asarray(meta.segment, jnp.int32), jnp.asarray(meta.slot, jnp.int32)
  code = jnp.where(seg == int(Segment.PREFIX), _PREFIX_CODE,
                   jnp.where(_is_pred(seg), slot, _OBS_CODE))
  doc = jnp.where(jnp.asarray(meta.valid, bool), jnp.asarray(meta.doc, jnp.int32), _K_PAD_DOC)
  return Tokens(jnp.asarray(meta.chunk, jnp.int32), code, doc)


def _visible(q: Tokens, k: Tokens, window: int | None):
  """DESIGN §4 on encoded tokens; q fields shaped `[bq, 1]`, k fields `[1, bk]`."""
  earlier = k.chunk < q.chunk
  if window is not None:
    earlier = earlier & (q.chunk - k.chunk < window)
  same_chunk = (k.chunk == q.chunk) & (k.code <= q.code)
  return (q.doc == k.doc) & ((k.code == _PREFIX_CODE) | earlier | same_chunk)


def _pad_meta(meta: TokenMeta, length: int) -> TokenMeta:
  pad = length - meta.chunk.shape[1]
  if pad == 0:
    return TokenMeta(*(jnp.asarray(f) for f in meta))
  fill = lambda f: jnp.pad(jnp.asarray(f), ((0, 0), (0, pad)))  # valid pads with False
  return TokenMeta(*(fill(f) for f in meta))


# ----------------------------------------------------------------------------- schedule


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


def _q_block_stats(meta: TokenMeta, blk: int) -> dict:
  c, seg, s, d, valid = _block_fields(meta, blk)
  pred = valid & _is_pred(seg)
  obs = valid & ~pred
  cmin, cmax = _rmin(c, valid), _rmax(c, valid)
  pmin, pmax = _rmin(c, pred), _rmax(c, pred)
  at = lambda m, ref: m & (c == ref[..., None])
  return dict(
      any=valid.any(-1), all=valid.all(-1), cmin=cmin, cmax=cmax,
      dmin=_rmin(d, valid), dmax=_rmax(d, valid), pmin=pmin, pmax=pmax,
      slotmax_at_pmin=_rmax(s, at(pred, pmin)), slotmax_at_pmax=_rmax(s, at(pred, pmax)),
      obs_at_cmin=at(obs, cmin).any(-1), slotmin_at_cmin=_rmin(s, at(pred, cmin)))


def _k_block_stats(meta: TokenMeta, blk: int) -> dict:
  c, seg, s, d, valid = _block_fields(meta, blk)
  prefix = valid & (seg == int(Segment.PREFIX))
  rest = valid & ~prefix  # rules 1-3 only; PREFIX keys are visible whatever the chunk
  pred = valid & _is_pred(seg)
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


def _classify(qs: dict, ks: dict, window: int | None) -> jax.Array:
  """int32 `[B, nQ, nK]`: SKIP / PARTIAL / FULL (see module docstring for the guarantees)."""
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


def _compact(block_flag: jax.Array, width: int | None = None) -> BlockSchedule:
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


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def block_schedule(q_meta: TokenMeta, kv_meta: TokenMeta, window: int | None, block_q: int,
                   block_k: int) -> BlockSchedule:
  """The kv blocks each q block must visit, with SKIP / PARTIAL / FULL flags.

  Lengths that are not multiples of the block sizes are padded with invalid tokens. The
  visit lists are padded to a power of two (Triton needs power-of-two blocks).
  """
  tq = -(-q_meta.chunk.shape[1] // block_q) * block_q
  tk = -(-kv_meta.chunk.shape[1] // block_k) * block_k
  flags = _classify(_q_block_stats(_pad_meta(q_meta, tq), block_q),
                    _k_block_stats(_pad_meta(kv_meta, tk), block_k), window)
  return _compact(flags, _pow2(flags.shape[-1]))


# ----------------------------------------------------------------------------- kernels
# One kernel body per pass, shared by the Triton and interpret backends: the grid runs over
# (q block, batch, head) and a dynamic-length loop walks the block's visit list.


def _dot(a, b, *, trans_a=False, trans_b=False, precision=None):
  """`a @ b` (optionally transposed operands) accumulated in float32."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _load_tokens(c_ref, code_ref, doc_ref, sl, axis: int) -> Tokens:
  expand = lambda x: jnp.expand_dims(x, axis)
  return Tokens(expand(c_ref[sl]), expand(code_ref[sl]), expand(doc_ref[sl]))


def _masked_scores(q, k, flag, q_tok: Tokens, k_tok: Tokens, *, scale, window, precision):
  """Scaled scores `[bq, bk]` in float32; masked entries set to MASK_VALUE on PARTIAL."""
  s = _dot(q, k, trans_b=True, precision=precision) * scale

  def mask(s, q_tok, k_tok):
    return jnp.where(_visible(q_tok, k_tok, window), s, MASK_VALUE)

  # FULL blocks skip the element-wise mask evaluation entirely.
  return lax.cond(flag == FULL, lambda s, *_: s, mask, s, q_tok, k_tok)


def _fwd_kernel(kv_index_ref, kv_flag_ref, count_ref, q_ref, k_ref, v_ref,
                qc_ref, qcode_ref, qdoc_ref, kc_ref, kcode_ref, kdoc_ref,
                o_ref, lse_ref, *, scale, window, block_k, precision):
  q = q_ref[...]
  block_q, head_dim = q.shape
  q_tok = _load_tokens(qc_ref, qcode_ref, qdoc_ref, slice(None), 1)

  def body(t, carry):
    acc, m_prev, l_prev = carry
    sl = pl.ds(pl.multiple_of(kv_index_ref[t] * block_k, block_k), block_k)
    k_tok = _load_tokens(kc_ref, kcode_ref, kdoc_ref, sl, 0)
    s = _masked_scores(q, k_ref[sl, :], kv_flag_ref[t], q_tok, k_tok, scale=scale,
                       window=window, precision=precision)
    m_next = jnp.maximum(m_prev, s.max(axis=-1))
    alpha = jnp.exp(m_prev - m_next)
    # A row that has seen only masked entries has m_next == MASK_VALUE and p == 1 here; the
    # first visible key rescales that garbage by exp(MASK_VALUE - s) == 0, and a row that
    # never sees one is zeroed below.
    p = jnp.exp(s - m_next[:, None])
    v = v_ref[sl, :]
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, precision=precision)
    return acc, m_next, alpha * l_prev + p.sum(axis=-1)

  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), MASK_VALUE, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(0, count_ref[0], body, init)
  empty = m <= 0.5 * MASK_VALUE
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = jnp.where(empty[:, None], 0.0, acc / l_safe[:, None]).astype(o_ref.dtype)
  # +inf makes exp(s - lse) == 0 for empty rows in the backward kernels.
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(l_safe))


def _dq_kernel(kv_index_ref, kv_flag_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, qc_ref, qcode_ref, qdoc_ref, kc_ref, kcode_ref, kdoc_ref,
               dq_ref, *, scale, window, block_k, precision):
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_tok = _load_tokens(qc_ref, qcode_ref, qdoc_ref, slice(None), 1)

  def body(t, dq):
    sl = pl.ds(pl.multiple_of(kv_index_ref[t] * block_k, block_k), block_k)
    k_tok = _load_tokens(kc_ref, kcode_ref, kdoc_ref, sl, 0)
    k, v = k_ref[sl, :], v_ref[sl, :]
    s = _masked_scores(q, k, kv_flag_ref[t], q_tok, k_tok, scale=scale, window=window,
                       precision=precision)
    p = jnp.exp(s - lse[:, None])
    dp = _dot(do, v, trans_b=True, precision=precision)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, precision=precision)

  dq = lax.fori_loop(0, count_ref[0], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_index_ref, q_flag_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, qc_ref, qcode_ref, qdoc_ref, kc_ref, kcode_ref, kdoc_ref,
                dk_ref, dv_ref, *, scale, window, block_q, precision):
  k, v = k_ref[...], v_ref[...]
  k_tok = _load_tokens(kc_ref, kcode_ref, kdoc_ref, slice(None), 0)

  def body(t, carry):
    dk, dv = carry
    sl = pl.ds(pl.multiple_of(q_index_ref[t] * block_q, block_q), block_q)
    q_tok = _load_tokens(qc_ref, qcode_ref, qdoc_ref, sl, 1)
    q, do = q_ref[sl, :], do_ref[sl, :]
    s = _masked_scores(q, k, q_flag_ref[t], q_tok, k_tok, scale=scale, window=window,
                       precision=precision)
    p = jnp.exp(s - lse_ref[sl][:, None])
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
    dp = _dot(do, v, trans_b=True, precision=precision)
    ds = p * (dp - delta_ref[sl][:, None])
    return dk + _dot(ds.astype(q.dtype), q, trans_a=True, precision=precision), dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, count_ref[0], body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls


@dataclasses.dataclass(frozen=True)
class _Config:
  window: int | None
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  backend: str  # "triton" | "mosaic" | "interpret" | "mosaic_interpret" (tests only)
  num_warps: int | None
  num_stages: int


def _precision(dtype):
  # float32 callers (tests, debugging) want float32 products, not TF32 on GPU.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _call_kwargs(cfg: _Config, name: str, head_dim: int) -> dict:
  if cfg.backend == "interpret":
    return dict(interpret=True, name=name)
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  num_warps = cfg.num_warps or (4 if head_dim <= 64 else 8)
  return dict(name=name, compiler_params=plgpu.CompilerParams(
      num_warps=num_warps, num_stages=cfg.num_stages))


def _forward(cfg: _Config, q, k, v, q_tok: Tokens, k_tok: Tokens, sched: BlockSchedule):
  if cfg.backend in ("mosaic", "mosaic_interpret"):
    return _tpu_forward(cfg, q, k, v, q_tok, k_tok, sched)
  (B, T, H, D), S, G = q.shape, k.shape[1], q.shape[2] // k.shape[2]
  bq, bk, V = cfg.block_q, cfg.block_k, sched.kv_index.shape[-1]
  q_spec = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, lax.div(h, G), 0))
  qt_spec = pl.BlockSpec((None, bq), lambda i, b, h: (b, i))
  kt_spec = pl.BlockSpec((None, S), lambda i, b, h: (b, 0))
  visit_spec = pl.BlockSpec((None, None, V), lambda i, b, h: (b, i, 0))
  count_spec = pl.BlockSpec((None, None, 1), lambda i, b, h: (b, i, 0))
  kernel = functools.partial(_fwd_kernel, scale=1.0 / math.sqrt(D), window=cfg.window,
                             block_k=bk, precision=_precision(q.dtype))
  return pl.pallas_call(
      kernel, grid=(T // bq, B, H),
      in_specs=[visit_spec, visit_spec, count_spec, q_spec, kv_spec, kv_spec,
                qt_spec, qt_spec, qt_spec, kt_spec, kt_spec, kt_spec],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
      **_call_kwargs(cfg, "microturn_attention_fwd", D),
  )(sched.kv_index, sched.kv_flag, sched.num_visits[..., None], q, k, v, *q_tok, *k_tok)


def _backward(cfg: _Config, q, k, v, q_tok, k_tok, dq_sched, dkv_sched, o, lse, do):
  (B, T, H, D), (S, K), G = q.shape, k.shape[1:3], q.shape[2] // k.shape[2]
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  if cfg.backend in ("mosaic", "mosaic_interpret"):
    return _tpu_backward(cfg, q, k, v, q_tok, k_tok, dq_sched, dkv_sched, lse, delta, do)
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  common = dict(scale=1.0 / math.sqrt(D), window=cfg.window, precision=_precision(q.dtype))
  qt_full = pl.BlockSpec((None, T), lambda j, b, h: (b, 0))
  kt_full = pl.BlockSpec((None, S), lambda i, b, h: (b, 0))

  V = dq_sched.kv_index.shape[-1]
  q_spec = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
  kv_full = pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, lax.div(h, G), 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  qt_spec = pl.BlockSpec((None, bq), lambda i, b, h: (b, i))
  visit_spec = pl.BlockSpec((None, None, V), lambda i, b, h: (b, i, 0))
  count_spec = pl.BlockSpec((None, None, 1), lambda i, b, h: (b, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_k=bk, **common), grid=(T // bq, B, H),
      in_specs=[visit_spec, visit_spec, count_spec, q_spec, kv_full, kv_full, q_spec,
                row_spec, row_spec, qt_spec, qt_spec, qt_spec, kt_full, kt_full, kt_full],
      out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      **_call_kwargs(cfg, "microturn_attention_dq", D),
  )(dq_sched.kv_index, dq_sched.kv_flag, dq_sched.num_visits[..., None], q, k, v, do, lse,
    delta, *q_tok, *k_tok)

  U = dkv_sched.kv_index.shape[-1]
  q_full = pl.BlockSpec((None, T, None, D), lambda j, b, h: (b, 0, h, 0))
  kv_spec = pl.BlockSpec((None, bk, None, D), lambda j, b, h: (b, j, lax.div(h, G), 0))
  dkv_spec = pl.BlockSpec((None, bk, None, D), lambda j, b, h: (b, j, h, 0))
  row_full = pl.BlockSpec((None, None, T), lambda j, b, h: (b, h, 0))
  kt_spec = pl.BlockSpec((None, bk), lambda j, b, h: (b, j))
  visit_spec = pl.BlockSpec((None, None, U), lambda j, b, h: (b, j, 0))
  count_spec = pl.BlockSpec((None, None, 1), lambda j, b, h: (b, j, 0))
  # dK/dV per query head in float32, summed over each GQA group below.
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=bq, **common), grid=(S // bk, B, H),
      in_specs=[visit_spec, visit_spec, count_spec, q_full, kv_spec, kv_spec, q_full,
                row_full, row_full, qt_full, qt_full, qt_full, kt_spec, kt_spec, kt_spec],
      out_specs=[dkv_spec, dkv_spec],
      out_shape=[jax.ShapeDtypeStruct((B, S, H, D), jnp.float32)] * 2,
      **_call_kwargs(cfg, "microturn_attention_dkv", D),
  )(dkv_sched.kv_index, dkv_sched.kv_flag, dkv_sched.num_visits[..., None], q, k, v, do,
    lse, delta, *q_tok, *k_tok)
  group_sum = lambda x: x.reshape(B, S, K, G, D).sum(axis=3).astype(k.dtype)
  return dq, group_sum(dk), group_sum(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, q_tok, k_tok, fwd_sched, dq_sched, dkv_sched):
  del dq_sched, dkv_sched
  return _forward(cfg, q, k, v, q_tok, k_tok, fwd_sched)[0]


def _attention_fwd(cfg, q, k, v, q_tok, k_tok, fwd_sched, dq_sched, dkv_sched):
  o, lse = _forward(cfg, q, k, v, q_tok, k_tok, fwd_sched)
  return o, (q, k, v, q_tok, k_tok, dq_sched, dkv_sched, o, lse)


def _attention_bwd(cfg, res, do):
  q, k, v, q_tok, k_tok, dq_sched, dkv_sched, o, lse = res
  dq, dk, dv = _backward(cfg, q, k, v, q_tok, k_tok, dq_sched, dkv_sched, o, lse, do)
  return dq, dk, dv, None, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------- TPU (Mosaic)
# Same math, TPU-shaped: heads-major [B, H, L, D] tiles, the schedule in SMEM by scalar
# prefetch, and the visit list as the innermost ("arbitrary") grid axis so the pipeline
# prefetches the next visited kv block. Steps past a block's count see flag SKIP and the
# repeated block index, so they issue no DMA and do no work. Query metadata is broadcast to
# 128 lanes and key metadata to 8 sublanes (Mosaic's native tiling) as splash attention does.

_LANES, _SUBLANES = 128, 8


def _tpu_call_kwargs(cfg: _Config, name: str) -> dict:
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  kw = dict(name=name, compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")))
  if cfg.backend == "mosaic_interpret":
    kw["interpret"] = pltpu.InterpretParams()
  return kw


def _lanes(x_BT):
  return jnp.broadcast_to(x_BT[:, :, None], (*x_BT.shape, _LANES))


def _sublanes(x_BS):
  return jnp.broadcast_to(x_BS[:, None, :], (x_BS.shape[0], _SUBLANES, x_BS.shape[1]))


def _tpu_tokens(c_ref, code_ref, doc_ref, width: int | None) -> Tokens:
  """`[bq, width]` query tokens from lane-broadcast refs, or `[1, bk]` key tokens."""
  if width is None:
    return Tokens(c_ref[:1, :], code_ref[:1, :], doc_ref[:1, :])
  tile = lambda x: jnp.tile(x, (1, width // _LANES))
  return Tokens(tile(c_ref[...]), tile(code_ref[...]), tile(doc_ref[...]))


def _lane0(x):
  return jnp.max(x, axis=1, keepdims=True)  # all lanes hold the same value


def _tpu_fwd_kernel(kv_index_ref, kv_flag_ref, count_ref, q_ref, k_ref, v_ref,
                    qc_ref, qcode_ref, qdoc_ref, kc_ref, kcode_ref, kdoc_ref,
                    o_ref, lse_ref, m_scr, l_scr, acc_scr, *, scale, window, precision):
  del count_ref
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  block_k = k_ref.shape[0]

  @pl.when(t == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  flag = kv_flag_ref[b, i, t]

  @pl.when(flag != SKIP)
  def _step():
    q_tok = _tpu_tokens(qc_ref, qcode_ref, qdoc_ref, block_k)
    k_tok = _tpu_tokens(kc_ref, kcode_ref, kdoc_ref, None)
    s = _masked_scores(q_ref[...], k_ref[...], flag, q_tok, k_tok, scale=scale,
                       window=window, precision=precision)
    m_prev, l_prev = _lane0(m_scr[...]), _lane0(l_scr[...])
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next)
    v = v_ref[...]
    acc_scr[...] = alpha * acc_scr[...] + _dot(p.astype(v.dtype), v, precision=precision)
    m_scr[...] = jnp.broadcast_to(m_next, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(alpha * l_prev + jnp.sum(p, axis=1, keepdims=True),
                                  l_scr.shape)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    m, l = _lane0(m_scr[...]), _lane0(l_scr[...])
    empty = m <= 0.5 * MASK_VALUE
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = jnp.where(empty, 0.0, acc_scr[...] / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(jnp.where(empty, jnp.inf, m + jnp.log(l_safe)),
                                    lse_ref.shape)


def _tpu_forward(cfg, q, k, v, q_tok, k_tok, sched):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  (B, T, H, D), S, G = q.shape, k.shape[1], q.shape[2] // k.shape[2]
  bq, bk, V = cfg.block_q, cfg.block_k, sched.kv_index.shape[-1]
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)
  q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, t, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, D),
                         lambda b, h, i, t, idx, *_: (b, lax.div(h, G), idx[b, i, t], 0))
  qt_spec = pl.BlockSpec((None, bq, _LANES), lambda b, h, i, t, *_: (b, i, 0))
  kt_spec = pl.BlockSpec((None, _SUBLANES, bk),
                         lambda b, h, i, t, idx, *_: (b, 0, idx[b, i, t]))
  kernel = functools.partial(_tpu_fwd_kernel, scale=1.0 / math.sqrt(D), window=cfg.window,
                             precision=_precision(q.dtype))
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(B, H, T // bq, V),
          in_specs=[q_spec, kv_spec, kv_spec, qt_spec, qt_spec, qt_spec,
                    kt_spec, kt_spec, kt_spec],
          out_specs=[q_spec, pl.BlockSpec((None, None, bq, _LANES),
                                          lambda b, h, i, t, *_: (b, h, i, 0))],
          scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32),
                          pltpu.VMEM((bq, _LANES), jnp.float32),
                          pltpu.VMEM((bq, D), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((B, H, T, D), q.dtype),
                 jax.ShapeDtypeStruct((B, H, T, _LANES), jnp.float32)],
      **_tpu_call_kwargs(cfg, "microturn_attention_fwd"),
  )(sched.kv_index, sched.kv_flag, sched.num_visits, heads_major(q), heads_major(k),
    heads_major(v), *map(_lanes, q_tok), *map(_sublanes, k_tok))
  return heads_major(o), lse[..., 0]


def _tpu_dq_kernel(kv_index_ref, kv_flag_ref, count_ref, q_ref, k_ref, v_ref, do_ref,
                   lse_ref, delta_ref, qc_ref, qcode_ref, qdoc_ref, kc_ref, kcode_ref,
                   kdoc_ref, dq_ref, dq_scr, *, scale, window, precision):
  del kv_index_ref, count_ref
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  flag = kv_flag_ref[b, i, t]

  @pl.when(flag != SKIP)
  def _step():
    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    q_tok = _tpu_tokens(qc_ref, qcode_ref, qdoc_ref, k.shape[0])
    k_tok = _tpu_tokens(kc_ref, kcode_ref, kdoc_ref, None)
    s = _masked_scores(q_ref[...], k, flag, q_tok, k_tok, scale=scale, window=window,
                       precision=precision)
    p = jnp.exp(s - _lane0(lse_ref[...]))
    ds = p * (_dot(do, v, trans_b=True, precision=precision) - _lane0(delta_ref[...]))
    dq_scr[...] += _dot(ds.astype(k.dtype), k, precision=precision)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(q_index_ref, q_flag_ref, count_ref, q_ref, k_ref, v_ref, do_ref,
                    lse_ref, delta_ref, qc_ref, qcode_ref, qdoc_ref, kc_ref, kcode_ref,
                    kdoc_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, scale, window, precision):
  del q_index_ref, count_ref
  b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  flag = q_flag_ref[b, j, t]

  @pl.when(flag != SKIP)
  def _step():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    q_tok = _tpu_tokens(qc_ref, qcode_ref, qdoc_ref, k.shape[0])
    k_tok = _tpu_tokens(kc_ref, kcode_ref, kdoc_ref, None)
    s = _masked_scores(q, k, flag, q_tok, k_tok, scale=scale, window=window,
                       precision=precision)
    p = jnp.exp(s - _lane0(lse_ref[...]))
    dv_scr[...] += _dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
    ds = p * (_dot(do, v, trans_b=True, precision=precision) - _lane0(delta_ref[...]))
    dk_scr[...] += _dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _tpu_backward(cfg, q, k, v, q_tok, k_tok, dq_sched, dkv_sched, lse, delta, do):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  (B, T, H, D), (S, K), G = q.shape, k.shape[1:3], q.shape[2] // k.shape[2]
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)
  qh, kh, vh, doh = map(heads_major, (q, k, v, do))
  lse_l, delta_l = _lanes(lse.reshape(B * H, T)), _lanes(delta.reshape(B * H, T))
  lse_l, delta_l = lse_l.reshape(B, H, T, _LANES), delta_l.reshape(B, H, T, _LANES)
  q_lanes, k_sublanes = list(map(_lanes, q_tok)), list(map(_sublanes, k_tok))
  common = dict(scale=1.0 / math.sqrt(D), window=cfg.window, precision=_precision(q.dtype))

  # dQ: grid over (b, h, q block, visited kv block).
  q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, t, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, D),
                         lambda b, h, i, t, idx, *_: (b, lax.div(h, G), idx[b, i, t], 0))
  row_spec = pl.BlockSpec((None, None, bq, _LANES), lambda b, h, i, t, *_: (b, h, i, 0))
  qt_spec = pl.BlockSpec((None, bq, _LANES), lambda b, h, i, t, *_: (b, i, 0))
  kt_spec = pl.BlockSpec((None, _SUBLANES, bk),
                         lambda b, h, i, t, idx, *_: (b, 0, idx[b, i, t]))
  dq = pl.pallas_call(
      functools.partial(_tpu_dq_kernel, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(B, H, T // bq, dq_sched.kv_index.shape[-1]),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                    qt_spec, qt_spec, qt_spec, kt_spec, kt_spec, kt_spec],
          out_specs=q_spec, scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((B, H, T, D), q.dtype),
      **_tpu_call_kwargs(cfg, "microturn_attention_dq"),
  )(dq_sched.kv_index, dq_sched.kv_flag, dq_sched.num_visits, qh, kh, vh, doh, lse_l,
    delta_l, *q_lanes, *k_sublanes)

  # dK/dV per query head: grid over (b, h, kv block, visiting q block).
  q_spec = pl.BlockSpec((None, None, bq, D),
                        lambda b, h, j, t, idx, *_: (b, h, idx[b, j, t], 0))
  kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, j, t, *_: (b, lax.div(h, G), j, 0))
  dkv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, j, t, *_: (b, h, j, 0))
  row_spec = pl.BlockSpec((None, None, bq, _LANES),
                          lambda b, h, j, t, idx, *_: (b, h, idx[b, j, t], 0))
  qt_spec = pl.BlockSpec((None, bq, _LANES), lambda b, h, j, t, idx, *_: (b, idx[b, j, t], 0))
  kt_spec = pl.BlockSpec((None, _SUBLANES, bk), lambda b, h, j, t, *_: (b, 0, j))
  dk, dv = pl.pallas_call(
      functools.partial(_tpu_dkv_kernel, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(B, H, S // bk, dkv_sched.kv_index.shape[-1]),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                    qt_spec, qt_spec, qt_spec, kt_spec, kt_spec, kt_spec],
          out_specs=[dkv_spec, dkv_spec],
          scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32)] * 2),
      out_shape=[jax.ShapeDtypeStruct((B, H, S, D), jnp.float32)] * 2,
      **_tpu_call_kwargs(cfg, "microturn_attention_dkv"),
  )(dkv_sched.kv_index, dkv_sched.kv_flag, dkv_sched.num_visits, qh, kh, vh, doh, lse_l,
    delta_l, *q_lanes, *k_sublanes)
  group_sum = lambda x: heads_major(x.reshape(B, K, G, S, D).sum(axis=2)).astype(k.dtype)
  return heads_major(dq), group_sum(dk), group_sum(dv)


# ----------------------------------------------------------------------------- public API


def _backend(interpret: bool) -> str:
  if interpret:
    return "interpret"
  platform = jax.default_backend()
  if platform in ("gpu", "cuda", "rocm"):
    return "triton"
  if platform == "tpu":
    return "mosaic"
  # CPU has no compiled Pallas backend: run the same kernels in interpret mode, so the
  # model's "pallas" attention backend works (slowly) in CPU CI.
  return "interpret"


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _check_inputs(q, k, v, q_meta, kv_meta):
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"expected q [B, T, H, D] and k, v [B, S, K, D] of equal shapes; got "
                     f"q {q.shape}, k {k.shape}, v {v.shape}")
  (B, T, H, D), (S, K) = q.shape, k.shape[1:3]
  if k.shape[0] != B or k.shape[3] != D or H % K:
    raise ValueError(f"k/v {k.shape} do not match q {q.shape}: batch and head_dim must agree "
                     f"and the {H} query heads must be a multiple of the {K} kv heads")
  for name, meta, length in (("q_meta", q_meta, T), ("kv_meta", kv_meta, S)):
    if any(tuple(f.shape) != (B, length) for f in meta):
      raise ValueError(f"{name} fields must be [batch, length] = {(B, length)}; got "
                       f"{[tuple(f.shape) for f in meta]}")


def _prepare(q, k, v, q_meta, kv_meta, window, block_sizes, interpret):
  _check_inputs(q, k, v, q_meta, kv_meta)
  bs = block_sizes or BlockSizes()
  backend = _backend(interpret)
  T, S = q.shape[1], k.shape[1]
  minimum = 128 if backend.startswith("mosaic") else 16  # Mosaic lanes / Triton tl.dot minimum
  fit = lambda blk, n: min(blk, max(_pow2(n), minimum))
  qb_bwd, kb_bwd = bs.bwd
  cfg = _Config(window, fit(bs.block_q, T), fit(bs.block_k, S), fit(qb_bwd, T),
                fit(kb_bwd, S), backend, bs.num_warps, bs.num_stages)
  blocks = (cfg.block_q, cfg.block_k, cfg.block_q_bwd, cfg.block_k_bwd)
  if backend.startswith("mosaic") and any(b % 128 for b in blocks):
    raise ValueError(f"TPU block sizes must be multiples of 128 (lanes); got {bs}")
  if backend == "triton" and any(b < 16 or b & (b - 1) for b in blocks):
    raise ValueError(f"GPU (Triton) block sizes must be powers of two >= 16; got {bs}")
  tq = _round_up(T, math.lcm(cfg.block_q, cfg.block_q_bwd))
  tk = _round_up(S, math.lcm(cfg.block_k, cfg.block_k_bwd))
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  q_meta, kv_meta = _pad_meta(q_meta, tq), _pad_meta(kv_meta, tk)
  return cfg, pad(q, tq), pad(k, tk), pad(v, tk), q_meta, kv_meta


@functools.partial(jax.jit, static_argnames=("window", "block_sizes", "interpret"))
def microturn_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_meta: TokenMeta,
                        kv_meta: TokenMeta, *, window: int | None,
                        block_sizes: BlockSizes | None = None,
                        interpret: bool = False) -> jax.Array:
  """Softmax attention under the micro-turn mask; differentiable in q, k, v.

  Args:
    q: `[B, T, H, D]` queries (already RoPE-rotated), float32 or bfloat16.
    k, v: `[B, S, K, D]` keys and values, H % K == 0 (GQA / MQA when K < H).
    q_meta, kv_meta: `TokenMeta` of the queries / keys, fields `[B, T]` / `[B, S]`.
    window: sliding window in chunks (DESIGN §4 rule 1), None for unbounded (static).
    block_sizes: tiles; lengths are padded with invalid tokens to a multiple of them.
    interpret: run the Pallas kernels in interpret mode. On a CPU backend this is implied.

  Returns:
    `[B, T, H, D]` in q's dtype; rows with no visible key are zero.
  """
  cfg, q_p, k_p, v_p, q_meta, kv_meta = _prepare(q, k, v, q_meta, kv_meta, window,
                                                 block_sizes, interpret)
  flags = functools.partial(_classify, window=window)
  bs = block_sizes or BlockSizes()
  fwd_flags = flags(_q_block_stats(q_meta, cfg.block_q), _k_block_stats(kv_meta, cfg.block_k))
  if (cfg.block_q_bwd, cfg.block_k_bwd) == (cfg.block_q, cfg.block_k):
    bwd_flags = fwd_flags
  else:
    bwd_flags = flags(_q_block_stats(q_meta, cfg.block_q_bwd),
                      _k_block_stats(kv_meta, cfg.block_k_bwd))
  bwd_flags_t = jnp.swapaxes(bwd_flags, 1, 2)
  (fwd, fwd_over), (dq_sched, dq_over), (dkv_sched, dkv_over) = (
      _schedule(f, cfg, bound) for f, bound in ((fwd_flags, bs.max_kv_blocks),
                                                (bwd_flags, bs.max_kv_blocks),
                                                (bwd_flags_t, bs.max_q_blocks)))
  o = _attention(cfg, q_p, k_p, v_p, _encode_q(q_meta), _encode_k(kv_meta), fwd, dq_sched,
                 dkv_sched)
  if bs.max_kv_blocks is not None or bs.max_q_blocks is not None:
    # Poison (NaN) rather than silently drop blocks when a bound was too small.
    o = jnp.where(fwd_over | dq_over | dkv_over, jnp.nan, o).astype(o.dtype)
  return o[:, :q.shape[1]]


def _schedule(block_flag: jax.Array, cfg: _Config, bound: int | None):
  """(visit lists of `block_flag` at the width the backend wants, overflowed flag)."""
  n = block_flag.shape[-1]
  width = n if bound is None else min(bound, n)
  overflow = jnp.any(jnp.sum(block_flag > 0, axis=-1) > width)
  if not cfg.backend.startswith("mosaic"):
    width = _pow2(width)  # Triton blocks are powers of two; a wider list costs nothing
  return _compact(block_flag, width), overflow


@functools.partial(jax.jit, static_argnames=("window", "block_sizes", "interpret"))
def microturn_attention_decode(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                               q_meta: TokenMeta, cache_meta: TokenMeta, *,
                               window: int | None, block_sizes: BlockSizes | None = None,
                               interpret: bool = False) -> jax.Array:
  """Forward-only attention of one chunk of queries against a KV cache (streaming engine).

  The cache is a ring buffer: its chunks may be in any order and slots may be invalid; the
  block schedule is sound for any metadata order, only less tight than for sorted rows.
  The cache must already hold the current chunk's keys (a chunk attends to itself).
  Shapes as in `microturn_attention` with T = tokens of one chunk and S = cache slots.
  """
  cfg, q_p, k_p, v_p, q_meta, cache_meta = _prepare(q, k_cache, v_cache, q_meta, cache_meta,
                                                    window, block_sizes, interpret)
  bound = (block_sizes or BlockSizes()).max_kv_blocks
  sched, overflow = _schedule(_classify(_q_block_stats(q_meta, cfg.block_q),
                                        _k_block_stats(cache_meta, cfg.block_k), window),
                              cfg, bound)
  o, _ = _forward(cfg, q_p, k_p, v_p, _encode_q(q_meta), _encode_k(cache_meta), sched)
  if bound is not None:
    o = jnp.where(overflow, jnp.nan, o).astype(o.dtype)
  return o[:, :q.shape[1]]


def microturn_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                                  q_meta: TokenMeta, kv_meta: TokenMeta, *,
                                  window: int | None) -> jax.Array:
  """Plain-jnp reference: dense DESIGN §4 mask, GQA by repeating kv heads, zero empty rows."""
  _check_inputs(q, k, v, q_meta, kv_meta)
  G = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  mask_B1TS = microturn_mask(q_meta, kv_meta, window)[:, None]
  hi = lax.Precision.HIGHEST
  s_BHTS = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32),
                      precision=hi) / math.sqrt(q.shape[-1])
  s_BHTS = jnp.where(mask_B1TS, s_BHTS, 0.0)  # 0, not -inf: keeps gradients NaN-free
  m_BHT1 = lax.stop_gradient(jnp.max(jnp.where(mask_B1TS, s_BHTS, -jnp.inf), -1,
                                     keepdims=True))
  m_BHT1 = jnp.where(jnp.isfinite(m_BHT1), m_BHT1, 0.0)
  p_BHTS = jnp.where(mask_B1TS, jnp.exp(s_BHTS - m_BHT1), 0.0)
  l_BHT1 = p_BHTS.sum(-1, keepdims=True)
  p_BHTS = p_BHTS / jnp.where(l_BHT1 > 0, l_BHT1, 1.0)
  o = jnp.einsum("bhts,bshd->bthd", p_BHTS, v.astype(jnp.float32), precision=hi)
  return o.astype(q.dtype)
