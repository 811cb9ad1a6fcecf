"""Grouped matmul kernels for GPU (Triton); Pallas interpret mode runs them on any backend.

A precomputed schedule (`row_tile_schedule`) maps every gmm program to (group, first row,
end row): each group's rows are cut into block_m tiles starting at the group's own first
row, so a tile multiplies by one expert's weights and every output row is written by
exactly one program (no read-modify-write, no atomics). Rows past sum(group_sizes) form
one extra "tail group" whose tiles store zeros. Edge windows are clamped back inside the
array and masked, so no load or store is ever out of bounds (this also keeps interpret
mode exact: it clamps out-of-range dynamic slices instead of masking them).

Shapes: lhs [m, k], rhs [g, k, n] (or [g, n, k] with transpose_rhs), grad [m, n];
tm / tk / tn tile sizes.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.gmm.schedule import (BlockSizes, dot_precision, group_offsets, out_struct,
                                         pad_to, pow2_tile, row_tile_schedule)


def _gmm_kernel(group_ref, start_ref, end_ref, lhs_ref, rhs_ref, out_ref, *,
                num_groups, tm, tk, tn, transpose_rhs, precision):
  from jax.experimental.pallas import triton as plgpu
  m, k = lhs_ref.shape
  n = out_ref.shape[1]
  t, j = pl.program_id(0), pl.program_id(1)
  grp, start, end = group_ref[t], start_ref[t], end_ref[t]
  # Clamp the windows back inside the array; the masks drop the rows/cols they re-cover.
  row0 = jnp.minimum(start, m - tm)
  rows = row0 + jnp.arange(tm, dtype=jnp.int32)
  row_mask = (rows >= start) & (rows < end)
  col0 = jnp.minimum(j * tn, n - tn)
  col_mask = (col0 + jnp.arange(tn, dtype=jnp.int32)) >= j * tn
  out_mask = row_mask[:, None] & col_mask[None, :]
  out_window = out_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)]

  @pl.when(grp < num_groups)
  def _matmul():
    def body(i, acc):
      k0 = jnp.minimum(i * tk, k - tk)
      k_mask = (k0 + jnp.arange(tk, dtype=jnp.int32)) >= i * tk
      # Masking lhs alone suffices: a zero lhs entry zeroes its whole rank-1 term.
      a = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)],
                     mask=row_mask[:, None] & k_mask[None, :], other=0)
      if transpose_rhs:
        b = plgpu.load(rhs_ref.at[grp, pl.ds(col0, tn), pl.ds(k0, tk)])
      else:
        b = plgpu.load(rhs_ref.at[grp, pl.ds(k0, tk), pl.ds(col0, tn)])
      return acc + plgpu.dot(a, b, trans_b=transpose_rhs, precision=precision)

    acc = lax.fori_loop(0, pl.cdiv(k, tk), body, jnp.zeros((tm, tn), jnp.float32))
    plgpu.store(out_window, acc.astype(out_ref.dtype), mask=out_mask)

  @pl.when(grp == num_groups)
  def _tail_rows_are_zero():
    plgpu.store(out_window, jnp.zeros((tm, tn), out_ref.dtype), mask=out_mask)


def gmm(lhs, rhs, group_sizes, bs: BlockSizes, interpret, transpose_rhs):
  """One program per (tile of `row_tile_schedule`, n-tile); tiny operands padded to 16."""
  from jax.experimental.pallas import triton as plgpu
  m, k = lhs.shape
  g = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  # Triton's dot wants every tile dim >= 16: pad tiny operands (zeros are exact).
  mp, kp, np_ = max(m, 16), max(k, 16), max(n, 16)
  lhs_p = pad_to(pad_to(lhs, 0, mp), 1, kp)
  rhs_p = pad_to(pad_to(rhs, 1, np_ if transpose_rhs else kp), 2,
                 kp if transpose_rhs else np_)
  tm, tk, tn = pow2_tile(bs.block_m, mp), pow2_tile(bs.block_k, kp), pow2_tile(bs.block_n, np_)
  grp, start, end = row_tile_schedule(group_sizes, mp, tm)
  kernel = functools.partial(_gmm_kernel, num_groups=g, tm=tm, tk=tk, tn=tn,
                             transpose_rhs=transpose_rhs, precision=dot_precision(lhs.dtype))
  out = pl.pallas_call(
      kernel,
      out_shape=out_struct((mp, np_), lhs.dtype, lhs_p),
      grid=(grp.shape[0], pl.cdiv(np_, tn)),
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name="gmm",
  )(grp, start, end, lhs_p, rhs_p)
  return out[:m, :n]


def _tgmm_kernel(offsets_ref, lhs_ref, grad_ref, out_ref, *, tm, tk, tn, precision):
  from jax.experimental.pallas import triton as plgpu
  m, k = lhs_ref.shape
  n = grad_ref.shape[1]
  gi, ki, ni = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = offsets_ref[gi], offsets_ref[gi + 1]
  k0 = jnp.minimum(ki * tk, k - tk)
  n0 = jnp.minimum(ni * tn, n - tn)

  def body(i, acc):
    r = start + i * tm
    row0 = jnp.minimum(r, m - tm)
    rows = row0 + jnp.arange(tm, dtype=jnp.int32)
    rmask = (rows >= r) & (rows < end)
    a = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)],
                   mask=jnp.broadcast_to(rmask[:, None], (tm, tk)), other=0)
    b = plgpu.load(grad_ref.at[pl.ds(row0, tm), pl.ds(n0, tn)],
                   mask=jnp.broadcast_to(rmask[:, None], (tm, tn)), other=0)
    return acc + plgpu.dot(a, b, trans_a=True, precision=precision)

  # Dynamic trip count: an empty group runs no step and stores zeros. lax.div, not //,
  # because Triton lowers floor division of signed scalars poorly (sizes are >= 0 anyway).
  steps = lax.div(end - start + tm - 1, tm)
  acc = lax.fori_loop(0, steps, body, jnp.zeros((tk, tn), jnp.float32))
  keep = (((k0 + jnp.arange(tk, dtype=jnp.int32)) >= ki * tk)[:, None]
          & ((n0 + jnp.arange(tn, dtype=jnp.int32)) >= ni * tn)[None, :])
  plgpu.store(out_ref.at[gi, pl.ds(k0, tk), pl.ds(n0, tn)], acc.astype(out_ref.dtype),
              mask=keep)


def tgmm(lhs, grad, group_sizes, bs: BlockSizes, interpret):
  """One program per (group, k-tile, n-tile), looping over the group's rows.

  Skewed routing makes one group's programs long; fine while g * tiles_k * tiles_n fills
  the GPU (8 experts x 2048/64 x 1408/128 = 2816 programs).
  """
  from jax.experimental.pallas import triton as plgpu
  m, k = lhs.shape
  n = grad.shape[1]
  g = group_sizes.shape[0]
  mp, kp, np_ = max(m, 16), max(k, 16), max(n, 16)
  lhs_p = pad_to(pad_to(lhs, 0, mp), 1, kp)
  grad_p = pad_to(pad_to(grad, 0, mp), 1, np_)
  tm, tk, tn = pow2_tile(bs.block_m, mp), pow2_tile(bs.block_k, kp), pow2_tile(bs.block_n, np_)
  kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn,
                             precision=dot_precision(lhs.dtype))
  out = pl.pallas_call(
      kernel,
      out_shape=out_struct((g, kp, np_), lhs.dtype, lhs_p),
      grid=(g, pl.cdiv(kp, tk), pl.cdiv(np_, tn)),
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name="tgmm",
  )(group_offsets(group_sizes, mp), lhs_p, grad_p)
  return out[:, :k, :n]

