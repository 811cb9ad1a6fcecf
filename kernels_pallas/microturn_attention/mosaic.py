"""Micro-turn attention kernels for TPU (Mosaic), and Pallas' TPU interpreter in tests.

Same math as the Triton kernels, TPU-shaped: heads-major [B, H, L, D] tiles, the schedule in
SMEM by scalar prefetch, and the visit list as the innermost ("arbitrary") grid axis so the
pipeline prefetches the next visited kv block. Steps past a block's count see flag SKIP and
the repeated block index, so they issue no DMA and do no work; the width of that axis is
the schedule's bound (`BlockSizes.max_kv_blocks` / `max_q_blocks`). Query metadata is
broadcast to 128 lanes and key metadata to 8 sublanes (Mosaic's native tiling) as splash
attention does.

Shape legend: B batch, T query length, S key length, H query heads, K kv heads, G = H // K,
D head dim, V visits per block (padded).
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.microturn_attention import tiles
from kernels_pallas.microturn_attention.schedule import SKIP, Tokens
from kernels_pallas.microturn_attention.tiles import MASK_VALUE
from kernels_pallas.platform import out_struct

_LANES, _SUBLANES = 128, 8


def _call_kwargs(cfg: tiles.Config, name: str) -> dict:
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


def _tokens(c_ref, code_ref, doc_ref, width: int | None) -> Tokens:
  """`[bq, width]` query tokens from lane-broadcast refs, or `[1, bk]` key tokens."""
  if width is None:
    return Tokens(c_ref[:1, :], code_ref[:1, :], doc_ref[:1, :])
  tile = lambda x: jnp.tile(x, (1, width // _LANES))
  return Tokens(tile(c_ref[...]), tile(code_ref[...]), tile(doc_ref[...]))


def _lane0(x):
  return jnp.max(x, axis=1, keepdims=True)  # all lanes hold the same value


def _fwd_kernel(kv_index_ref, kv_flag_ref, count_ref, q_ref, k_ref, v_ref,
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
    q_tok = _tokens(qc_ref, qcode_ref, qdoc_ref, block_k)
    k_tok = _tokens(kc_ref, kcode_ref, kdoc_ref, None)
    s = tiles.masked_scores(q_ref[...], k_ref[...], flag, q_tok, k_tok, scale=scale,
                             window=window, precision=precision)
    m_prev, l_prev = _lane0(m_scr[...]), _lane0(l_scr[...])
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next)
    v = v_ref[...]
    acc_scr[...] = alpha * acc_scr[...] + tiles.dot(p.astype(v.dtype), v, precision=precision)
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


def forward(cfg: tiles.Config, q, k, v, q_tok: Tokens, k_tok: Tokens, sched):
  """(o `[B, T, H, D]`, lse `[B, H, T]`); grid (batch, head, q block, visit)."""
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
  kernel = functools.partial(_fwd_kernel, scale=1.0 / math.sqrt(D), window=cfg.window,
                             precision=tiles.precision(q.dtype))
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
      out_shape=[out_struct((B, H, T, D), q.dtype, q),
                 out_struct((B, H, T, _LANES), jnp.float32, q)],
      **_call_kwargs(cfg, "microturn_attention_fwd"),
  )(sched.kv_index, sched.kv_flag, sched.num_visits, heads_major(q), heads_major(k),
    heads_major(v), *map(_lanes, q_tok), *map(_sublanes, k_tok))
  return heads_major(o), lse[..., 0]


def _dq_kernel(kv_index_ref, kv_flag_ref, count_ref, q_ref, k_ref, v_ref, do_ref,
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
    q_tok = _tokens(qc_ref, qcode_ref, qdoc_ref, k.shape[0])
    k_tok = _tokens(kc_ref, kcode_ref, kdoc_ref, None)
    s = tiles.masked_scores(q_ref[...], k, flag, q_tok, k_tok, scale=scale, window=window,
                             precision=precision)
    p = jnp.exp(s - _lane0(lse_ref[...]))
    ds = p * (tiles.dot(do, v, trans_b=True, precision=precision) - _lane0(delta_ref[...]))
    dq_scr[...] += tiles.dot(ds.astype(k.dtype), k, precision=precision)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_index_ref, q_flag_ref, count_ref, q_ref, k_ref, v_ref, do_ref,
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
    q_tok = _tokens(qc_ref, qcode_ref, qdoc_ref, k.shape[0])
    k_tok = _tokens(kc_ref, kcode_ref, kdoc_ref, None)
    s = tiles.masked_scores(q, k, flag, q_tok, k_tok, scale=scale, window=window,
                             precision=precision)
    p = jnp.exp(s - _lane0(lse_ref[...]))
    dv_scr[...] += tiles.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
    ds = p * (tiles.dot(do, v, trans_b=True, precision=precision) - _lane0(delta_ref[...]))
    dk_scr[...] += tiles.dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(cfg: tiles.Config, q, k, v, q_tok, k_tok, dq_sched, dkv_sched, lse, delta, do):
  """(dq, dk, dv); dK/dV per query head in float32, summed over each GQA group at the end."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  (B, T, H, D), (S, K), G = q.shape, k.shape[1:3], q.shape[2] // k.shape[2]
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)
  qh, kh, vh, doh = map(heads_major, (q, k, v, do))
  lse_l, delta_l = _lanes(lse.reshape(B * H, T)), _lanes(delta.reshape(B * H, T))
  lse_l, delta_l = lse_l.reshape(B, H, T, _LANES), delta_l.reshape(B, H, T, _LANES)
  q_lanes, k_sublanes = list(map(_lanes, q_tok)), list(map(_sublanes, k_tok))
  common = dict(scale=1.0 / math.sqrt(D), window=cfg.window,
                precision=tiles.precision(q.dtype))

  # dQ: grid over (b, h, q block, visited kv block).
  q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, t, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, D),
                         lambda b, h, i, t, idx, *_: (b, lax.div(h, G), idx[b, i, t], 0))
  row_spec = pl.BlockSpec((None, None, bq, _LANES), lambda b, h, i, t, *_: (b, h, i, 0))
  qt_spec = pl.BlockSpec((None, bq, _LANES), lambda b, h, i, t, *_: (b, i, 0))
  kt_spec = pl.BlockSpec((None, _SUBLANES, bk),
                         lambda b, h, i, t, idx, *_: (b, 0, idx[b, i, t]))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(B, H, T // bq, dq_sched.kv_index.shape[-1]),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                    qt_spec, qt_spec, qt_spec, kt_spec, kt_spec, kt_spec],
          out_specs=q_spec, scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)]),
      out_shape=out_struct((B, H, T, D), q.dtype, q),
      **_call_kwargs(cfg, "microturn_attention_dq"),
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
      functools.partial(_dkv_kernel, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(B, H, S // bk, dkv_sched.kv_index.shape[-1]),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                    qt_spec, qt_spec, qt_spec, kt_spec, kt_spec, kt_spec],
          out_specs=[dkv_spec, dkv_spec],
          scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32)] * 2),
      out_shape=[out_struct((B, H, S, D), jnp.float32, q)] * 2,
      **_call_kwargs(cfg, "microturn_attention_dkv"),
  )(dkv_sched.kv_index, dkv_sched.kv_flag, dkv_sched.num_visits, qh, kh, vh, doh, lse_l,
    delta_l, *q_lanes, *k_sublanes)
  group_sum = lambda x: heads_major(x.reshape(B, K, G, S, D).sum(axis=2)).astype(k.dtype)
  return heads_major(dq), group_sum(dk), group_sum(dv)
