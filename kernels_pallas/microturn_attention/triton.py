"""Micro-turn attention kernels for GPU (Triton) and for Pallas interpret mode.

One kernel body per pass (forward, dQ, dK/dV): the grid runs over (block, batch, head) and
a dynamic-length loop walks that block's visit list from the schedule, so a block costs
only the tiles it visits and the lists need no bound. Interpret mode runs these same
kernels, and so does a CPU backend (so the model's "pallas" attention backend works in
CPU CI).

Numerics: float32 accumulation, logsumexp saved for the backward pass (FlashAttention-2),
rows without any visible key produce zeros (output and gradients) instead of NaN.

Shape legend: B batch, T query length, S key length, H query heads, K kv heads, G = H // K,
D head dim, V / U visits per q / kv block (padded).
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.microturn_attention import tiles
from kernels_pallas.microturn_attention.schedule import BlockSchedule, Tokens
from kernels_pallas.microturn_attention.tiles import MASK_VALUE
from kernels_pallas.platform import out_struct


def _load_tokens(c_ref, code_ref, doc_ref, sl, axis: int) -> Tokens:
  expand = lambda x: jnp.expand_dims(x, axis)
  return Tokens(expand(c_ref[sl]), expand(code_ref[sl]), expand(doc_ref[sl]))


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
    s = tiles.masked_scores(q, k_ref[sl, :], kv_flag_ref[t], q_tok, k_tok, scale=scale,
                             window=window, precision=precision)
    m_next = jnp.maximum(m_prev, s.max(axis=-1))
    alpha = jnp.exp(m_prev - m_next)
    # A row that has seen only masked entries has m_next == MASK_VALUE and p == 1 here; the
    # first visible key rescales that garbage by exp(MASK_VALUE - s) == 0, and a row that
    # never sees one is zeroed below.
    p = jnp.exp(s - m_next[:, None])
    v = v_ref[sl, :]
    acc = alpha[:, None] * acc + tiles.dot(p.astype(v.dtype), v, precision=precision)
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
    s = tiles.masked_scores(q, k, kv_flag_ref[t], q_tok, k_tok, scale=scale, window=window,
                             precision=precision)
    p = jnp.exp(s - lse[:, None])
    dp = tiles.dot(do, v, trans_b=True, precision=precision)
    ds = p * (dp - delta[:, None])
    return dq + tiles.dot(ds.astype(k.dtype), k, precision=precision)

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
    s = tiles.masked_scores(q, k, q_flag_ref[t], q_tok, k_tok, scale=scale, window=window,
                             precision=precision)
    p = jnp.exp(s - lse_ref[sl][:, None])
    dv = dv + tiles.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
    dp = tiles.dot(do, v, trans_b=True, precision=precision)
    ds = p * (dp - delta_ref[sl][:, None])
    return dk + tiles.dot(ds.astype(q.dtype), q, trans_a=True, precision=precision), dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, count_ref[0], body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)



def _call_kwargs(cfg: tiles.Config, name: str, head_dim: int) -> dict:
  if cfg.backend == "interpret":
    return dict(interpret=True, name=name)
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  num_warps = cfg.num_warps or (4 if head_dim <= 64 else 8)
  return dict(name=name, compiler_params=plgpu.CompilerParams(
      num_warps=num_warps, num_stages=cfg.num_stages))


def forward(cfg: tiles.Config, q, k, v, q_tok: Tokens, k_tok: Tokens, sched: BlockSchedule):
  """(o `[B, T, H, D]`, lse `[B, H, T]`); grid (q block, batch, head), kv whole per program."""
  (B, T, H, D), S, G = q.shape, k.shape[1], q.shape[2] // k.shape[2]
  bq, bk, V = cfg.block_q, cfg.block_k, sched.kv_index.shape[-1]
  q_spec = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, lax.div(h, G), 0))
  qt_spec = pl.BlockSpec((None, bq), lambda i, b, h: (b, i))
  kt_spec = pl.BlockSpec((None, S), lambda i, b, h: (b, 0))
  visit_spec = pl.BlockSpec((None, None, V), lambda i, b, h: (b, i, 0))
  count_spec = pl.BlockSpec((None, None, 1), lambda i, b, h: (b, i, 0))
  kernel = functools.partial(_fwd_kernel, scale=1.0 / math.sqrt(D), window=cfg.window,
                             block_k=bk, precision=tiles.precision(q.dtype))
  return pl.pallas_call(
      kernel, grid=(T // bq, B, H),
      in_specs=[visit_spec, visit_spec, count_spec, q_spec, kv_spec, kv_spec,
                qt_spec, qt_spec, qt_spec, kt_spec, kt_spec, kt_spec],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[out_struct(q.shape, q.dtype, q),
                 out_struct((B, H, T), jnp.float32, q)],
      **_call_kwargs(cfg, "microturn_attention_fwd", D),
  )(sched.kv_index, sched.kv_flag, sched.num_visits[..., None], q, k, v, *q_tok, *k_tok)


def backward(cfg: tiles.Config, q, k, v, q_tok, k_tok, dq_sched, dkv_sched, lse, delta, do):
  """(dq, dk, dv): a dQ kernel over q blocks and a dK/dV kernel over kv blocks."""
  (B, T, H, D), (S, K), G = q.shape, k.shape[1:3], q.shape[2] // k.shape[2]
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  common = dict(scale=1.0 / math.sqrt(D), window=cfg.window,
                precision=tiles.precision(q.dtype))
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
      out_specs=q_spec, out_shape=out_struct(q.shape, q.dtype, q),
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
      out_shape=[out_struct((B, S, H, D), jnp.float32, q)] * 2,
      **_call_kwargs(cfg, "microturn_attention_dkv", D),
  )(dkv_sched.kv_index, dkv_sched.kv_flag, dkv_sched.num_visits[..., None], q, k, v, do,
    lse, delta, *q_tok, *k_tok)
  group_sum = lambda x: x.reshape(B, S, K, G, D).sum(axis=3).astype(k.dtype)
  return dq, group_sum(dk), group_sum(dv)

