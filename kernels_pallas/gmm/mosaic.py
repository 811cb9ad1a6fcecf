"""Grouped matmul kernels for TPU (Mosaic), megablox-style.

m-tiles aligned to block_m, and a visit list of (group, m-tile) pairs (`visit_schedule`) in
scalar-prefetch memory; a tile shared by two groups is visited once per group
(consecutively, so the output block stays in VMEM) and each visit stores only its group's
rows.

Shapes: lhs [m, k], rhs [g, k, n] (or [g, n, k] with transpose_rhs), grad [m, n];
tm / tk / tn tile sizes, mp / kp / np_ padded sizes.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.gmm.schedule import (BlockSizes, cdiv, dot_precision, group_offsets,
                                         out_struct, pad_to, visit_schedule)


def _tiles(bs: BlockSizes, m, k, n):
  """Mosaic blocks: multiples of 16 rows (bf16 packs 16 sublanes) / 128 lanes, or the whole
  (small) dimension."""
  tm = min(bs.block_m, cdiv(m, 16) * 16)
  tk = k if k <= bs.block_k else bs.block_k
  tn = n if n <= bs.block_n else bs.block_n
  return tm, tk, tn


def gmm(lhs, rhs, group_sizes, bs: BlockSizes, interpret, transpose_rhs):
  """Grid (n-tile, visit, k-step); the tail rows past sum(group_sizes) store zeros."""
  from jax.experimental.pallas import tpu as pltpu
  m, k = lhs.shape
  g = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, tk, tn = _tiles(bs, m, k, n)
  mp, kp, np_ = cdiv(m, tm) * tm, cdiv(k, tk) * tk, cdiv(n, tn) * tn
  lhs_p = pad_to(pad_to(lhs, 0, mp), 1, kp)
  rhs_p = pad_to(pad_to(rhs, 1, np_ if transpose_rhs else kp), 2,
                 kp if transpose_rhs else np_)
  # The tail (rows past sum(group_sizes)) is group g: its visits store zeros.
  offsets = jnp.concatenate([group_offsets(group_sizes, mp), jnp.array([mp], jnp.int32)])
  tiles_m, tiles_k = mp // tm, kp // tk
  vgroup, vtile, nvis = visit_schedule(offsets, tm, tiles_m, visit_empty=False)
  contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def kernel(offsets_ref, vgroup_ref, vtile_ref, nvis_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
    v, kk = pl.program_id(1), pl.program_id(2)
    grp = vgroup_ref[v]
    live = v < nvis_ref[0]

    @pl.when(kk == 0)
    def _zero():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live & (grp < g))
    def _accumulate():
      acc_ref[...] += lax.dot_general(lhs_ref[...], rhs_ref[...], contract,
                                      preferred_element_type=jnp.float32,
                                      precision=dot_precision(lhs.dtype))

    @pl.when(live & (kk == tiles_k - 1))
    def _store_own_rows():
      rows = vtile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
      mine = (rows >= offsets_ref[grp]) & (rows < offsets_ref[grp + 1])
      out_ref[...] = jnp.where(mine, acc_ref[...],
                               out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)

  def lhs_map(ni, v, kk, offsets, vgroup, vtile, nvis):
    return vtile[v], kk

  def rhs_map(ni, v, kk, offsets, vgroup, vtile, nvis):
    e = jnp.minimum(vgroup[v], g - 1)
    return (e, ni, kk) if transpose_rhs else (e, kk, ni)

  def out_map(ni, v, kk, offsets, vgroup, vtile, nvis):
    return vtile[v], ni

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  out = pl.pallas_call(
      kernel,
      out_shape=out_struct((mp, np_), lhs.dtype, lhs_p),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(np_ // tn, vgroup.shape[0], tiles_k),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="gmm",
  )(offsets, vgroup, vtile, nvis, lhs_p, rhs_p)
  return out[:m, :n]


def tgmm(lhs, grad, group_sizes, bs: BlockSizes, interpret):
  """Grid (k-tile, n-tile, visit); every group, empty ones too, writes its [tk, tn] block."""
  from jax.experimental.pallas import tpu as pltpu
  m, k = lhs.shape
  n = grad.shape[1]
  g = group_sizes.shape[0]
  tm, tk, tn = _tiles(bs, m, k, n)
  mp, kp, np_ = cdiv(m, tm) * tm, cdiv(k, tk) * tk, cdiv(n, tn) * tn
  lhs_p = pad_to(pad_to(lhs, 0, mp), 1, kp)
  grad_p = pad_to(pad_to(grad, 0, mp), 1, np_)
  offsets = group_offsets(group_sizes, mp)
  vgroup, vtile, nvis = visit_schedule(offsets, tm, mp // tm, visit_empty=True)
  num_grid_visits = vgroup.shape[0]

  def kernel(offsets_ref, vgroup_ref, vtile_ref, nvis_ref, lhs_ref, grad_ref, out_ref, acc_ref):
    v = pl.program_id(2)
    grp = vgroup_ref[v]
    first = (v == 0) | (vgroup_ref[jnp.maximum(v - 1, 0)] != grp)
    last = (v == num_grid_visits - 1) | (
        vgroup_ref[jnp.minimum(v + 1, num_grid_visits - 1)] != grp)
    start, end = offsets_ref[grp], offsets_ref[grp + 1]

    @pl.when(first)
    def _zero():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((v < nvis_ref[0]) & (end > start))
    def _accumulate():
      rows = vtile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
      mine = (rows >= start) & (rows < end)
      # Select in float32: older TPUs have no bf16 VPU.
      a = jnp.where(mine, lhs_ref[...].astype(jnp.float32), 0).astype(lhs_ref.dtype)
      b = jnp.where(mine, grad_ref[...].astype(jnp.float32), 0).astype(grad_ref.dtype)
      acc_ref[...] += lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32,
                                      precision=dot_precision(lhs.dtype))

    @pl.when(last)
    def _store():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  out = pl.pallas_call(
      kernel,
      out_shape=out_struct((g, kp, np_), lhs.dtype, lhs_p),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(kp // tk, np_ // tn, num_grid_visits),
          in_specs=[pl.BlockSpec((tm, tk), lambda ki, ni, v, o, vg, vt, nv: (vt[v], ki)),
                    pl.BlockSpec((tm, tn), lambda ki, ni, v, o, vg, vt, nv: (vt[v], ni))],
          out_specs=pl.BlockSpec((None, tk, tn),
                                 lambda ki, ni, v, o, vg, vt, nv: (vg[v], ki, ni)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="tgmm",
  )(offsets, vgroup, vtile, nvis, lhs_p, grad_p)
  return out[:, :k, :n]
