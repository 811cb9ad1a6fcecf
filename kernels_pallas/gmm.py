"""Grouped matrix multiplication for dropless MoE: `gmm` (forward) and `tgmm` (weight gradient).

Shapes: m rows (expert-sorted assignments), k contracted features, n output features,
g groups (experts). The rows of `lhs` are consecutive groups: group i owns rows
[offsets[i], offsets[i+1]) with offsets = [0, cumsum(group_sizes)].

  gmm(lhs[m, k], rhs[g, k, n], group_sizes[g]) -> [m, n]
      out[r] = lhs[r] @ rhs[group(r)]; rows past sum(group_sizes) are zero
      (exactly `jax.lax.ragged_dot(lhs, rhs, group_sizes)`).
  tgmm(lhs[m, k], grad[m, n], group_sizes[g]) -> [g, k, n]
      out[i] = lhs[rows of i].T @ grad[rows of i]; empty groups give zeros.

d lhs = gmm(grad, rhs^T) and d rhs = tgmm(lhs, grad), tied by `jax.custom_vjp`.

Implementations, picked by `backend` (default: from the platform):
  'triton'  GPU. A precomputed schedule maps every program to (group, first row, end row):
            each group's rows are cut into block_m tiles starting at the group's own first
            row, so a tile multiplies by one expert's weights and every output row is
            written by exactly one program (no read-modify-write, no atomics). Rows past
            sum(group_sizes) form one extra "tail group" whose tiles store zeros. Edge
            windows are clamped back inside the array and masked, so no load or store is
            ever out of bounds (this also keeps interpret mode exact: it clamps
            out-of-range dynamic slices instead of masking them).
  'mosaic'  TPU, megablox-style: m-tiles aligned to block_m, a visit list of (group, m-tile)
            pairs in scalar-prefetch memory; a tile shared by two groups is visited once per
            group (consecutively, so the output block stays in VMEM) and each visit stores
            only its group's rows.
  'xla'     The CPU default: the 'triton' tile schedule as an XLA `lax.scan`, one dense
            [block_m, k] x [k, n] dot per tile. Not Pallas: interpret mode runs a kernel
            grid as an XLA while loop of tiny dynamic slices (~30x slower than this) and is
            for testing kernels. And not `jax.lax.ragged_dot`: XLA:CPU expands it into one
            masked dense product per group, g times the flops (~10x slower than this scan
            for 8 experts). Same numbers as ragged_dot up to float32 summation order.
  'ragged_dot'  `jax.lax.ragged_dot` / `ragged_dot_general`, for bit-parity with
            moe_impl='ragged'.
`interpret=True` runs the 'triton' kernel (or `backend`'s) through the Pallas interpreter.
Accumulation is float32 everywhere; the output has lhs's dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

BACKENDS = ("triton", "mosaic", "xla", "ragged_dot")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. Triton needs powers of two >= 16; Mosaic multiples of (8, 128)."""
  block_m: int = 64
  block_k: int = 64
  block_n: int = 128
  num_warps: int = 4  # Triton only
  num_stages: int = 3  # Triton only

  @classmethod
  def get_default(cls, backend: str) -> "BlockSizes":
    if backend == "mosaic":  # untuned: VMEM ~4 MiB double-buffered in bf16
      return cls(block_m=256, block_k=512, block_n=512)
    if backend == "xla":  # rows per scan step on CPU; k and n are whole
      return cls(block_m=256)
    # Untuned starting point for H100/A100 bf16: a 64x128 tile with k-step 64 keeps 3
    # stages of operands (~72 KiB) in shared memory.
    return cls(block_m=64, block_k=64, block_n=128, num_warps=4, num_stages=3)


# --------------------------------------------------------------------------- references


def _row_groups(group_sizes, m):
  """Group id of every row; rows past sum(group_sizes) get g (out of range)."""
  ends = jnp.cumsum(group_sizes)
  return jnp.searchsorted(ends, jnp.arange(m, dtype=group_sizes.dtype), side="right")


def gmm_reference(lhs, rhs, group_sizes):
  """Plain jnp: every group's product on every row, keep each row's own (g times the flops)."""
  onehot_mg = jax.nn.one_hot(_row_groups(group_sizes, lhs.shape[0]), rhs.shape[0],
                             dtype=jnp.float32)
  y_gmn = jnp.einsum("mk,gkn->gmn", lhs.astype(jnp.float32), rhs.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST)
  return jnp.einsum("gmn,mg->mn", y_gmn, onehot_mg,
                    precision=lax.Precision.HIGHEST).astype(lhs.dtype)


def tgmm_reference(lhs, grad, group_sizes):
  onehot_mg = jax.nn.one_hot(_row_groups(group_sizes, lhs.shape[0]), group_sizes.shape[0],
                             dtype=jnp.float32)
  return jnp.einsum("mg,mk,mn->gkn", onehot_mg, lhs.astype(jnp.float32),
                    grad.astype(jnp.float32),
                    precision=lax.Precision.HIGHEST).astype(lhs.dtype)


# --------------------------------------------------------------------------- helpers


def _out_struct(shape, dtype, like):
  """An out_shape that varies over the same shard_map axes as `like` (check_vma needs it)."""
  mat = getattr(jax.typeof(like), "manual_axis_type", None)
  if mat is None:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def _cdiv(a, b):
  return (a + b - 1) // b


def _pow2_tile(block: int, dim: int) -> int:
  """Largest power of two <= min(block, dim): the window then always fits inside the array."""
  t = 1 << (min(block, dim).bit_length() - 1)
  return max(t, 16)


def _pad_to(x, axis, size):
  if x.shape[axis] >= size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _offsets(group_sizes, m):
  """[0, cumsum(group_sizes)] clipped to m (ragged_dot ignores rows past m)."""
  ends = jnp.minimum(jnp.cumsum(group_sizes), m).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])


# --------------------------------------------------------------------------- GPU (Triton)


def _row_tile_schedule(group_sizes, m: int, tm: int):
  """Program t -> (group, first row, end row) for the Triton gmm.

  Group i (and the tail group g = rows past the last group) is cut into cdiv(size, tm)
  tiles starting at its own first row. Sum over g+1 groups of cdiv(size, tm) is at most
  cdiv(m, tm) + g, the static grid size; programs past the real count get group g+1 and
  do nothing.
  """
  g = group_sizes.shape[0]
  offsets = _offsets(group_sizes, m)
  ends_x = jnp.concatenate([offsets[1:], jnp.array([m], jnp.int32)])
  starts_x = offsets
  tiles_x = _cdiv(ends_x - starts_x, tm)
  tile_ends = jnp.cumsum(tiles_x)
  t = jnp.arange(_cdiv(m, tm) + g, dtype=jnp.int32)
  grp = jnp.searchsorted(tile_ends, t, side="right").astype(jnp.int32)
  live = grp <= g
  grp_c = jnp.minimum(grp, g)
  start = starts_x[grp_c] + (t - (tile_ends - tiles_x)[grp_c]) * tm
  end = jnp.minimum(start + tm, ends_x[grp_c])
  return grp, jnp.where(live, start, 0), jnp.where(live, end, 0)


def _gmm_triton_kernel(group_ref, start_ref, end_ref, lhs_ref, rhs_ref, out_ref, *,
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


def _gmm_triton(lhs, rhs, group_sizes, bs: BlockSizes, interpret, transpose_rhs):
  from jax.experimental.pallas import triton as plgpu
  m, k = lhs.shape
  g = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  # Triton's dot wants every tile dim >= 16: pad tiny operands (zeros are exact).
  mp, kp, np_ = max(m, 16), max(k, 16), max(n, 16)
  lhs_p = _pad_to(_pad_to(lhs, 0, mp), 1, kp)
  rhs_p = _pad_to(_pad_to(rhs, 1, np_ if transpose_rhs else kp), 2,
                  kp if transpose_rhs else np_)
  tm, tk, tn = _pow2_tile(bs.block_m, mp), _pow2_tile(bs.block_k, kp), _pow2_tile(bs.block_n, np_)
  grp, start, end = _row_tile_schedule(group_sizes, mp, tm)
  kernel = functools.partial(_gmm_triton_kernel, num_groups=g, tm=tm, tk=tk, tn=tn,
                             transpose_rhs=transpose_rhs, precision=_dot_precision(lhs.dtype))
  out = pl.pallas_call(
      kernel,
      out_shape=_out_struct((mp, np_), lhs.dtype, lhs_p),
      grid=(grp.shape[0], pl.cdiv(np_, tn)),
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name="gmm",
  )(grp, start, end, lhs_p, rhs_p)
  return out[:m, :n]


def _tgmm_triton_kernel(offsets_ref, lhs_ref, grad_ref, out_ref, *, tm, tk, tn, precision):
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


def _tgmm_triton(lhs, grad, group_sizes, bs: BlockSizes, interpret):
  """One program per (group, k-tile, n-tile), looping over the group's rows.

  Skewed routing makes one group's programs long; fine while g * tiles_k * tiles_n fills
  the GPU (8 experts x 2048/64 x 1408/128 = 2816 programs).
  """
  from jax.experimental.pallas import triton as plgpu
  m, k = lhs.shape
  n = grad.shape[1]
  g = group_sizes.shape[0]
  mp, kp, np_ = max(m, 16), max(k, 16), max(n, 16)
  lhs_p = _pad_to(_pad_to(lhs, 0, mp), 1, kp)
  grad_p = _pad_to(_pad_to(grad, 0, mp), 1, np_)
  tm, tk, tn = _pow2_tile(bs.block_m, mp), _pow2_tile(bs.block_k, kp), _pow2_tile(bs.block_n, np_)
  kernel = functools.partial(_tgmm_triton_kernel, tm=tm, tk=tk, tn=tn,
                             precision=_dot_precision(lhs.dtype))
  out = pl.pallas_call(
      kernel,
      out_shape=_out_struct((g, kp, np_), lhs.dtype, lhs_p),
      grid=(g, pl.cdiv(kp, tk), pl.cdiv(np_, tn)),
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name="tgmm",
  )(_offsets(group_sizes, mp), lhs_p, grad_p)
  return out[:, :k, :n]


def _dot_precision(dtype):
  # float32 experts are the debugging/reference configuration: keep them exact (no TF32).
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# --------------------------------------------------------------------------- TPU (Mosaic)


def _visit_schedule(offsets, tm: int, tiles_m: int, *, visit_empty: bool):
  """(group, m-tile) visits in group order, for groups given by offsets[G+1].

  Group i visits tiles start//tm .. (end-1)//tm; an empty group visits one tile when
  `visit_empty` (tgmm must still write its zero gradient). The total is at most
  tiles_m + G - 1, the static grid size; the padding visits repeat the last real one and
  are switched off by `v < num_visits` inside the kernel.
  """
  G = offsets.shape[0] - 1
  sizes = offsets[1:] - offsets[:-1]
  first = jnp.minimum(offsets[:-1] // tm, tiles_m - 1)
  last = (offsets[1:] - 1) // tm
  visits = jnp.where(sizes > 0, last - first + 1, 1 if visit_empty else 0)
  visit_ends = jnp.cumsum(visits)
  num_visits = visit_ends[-1]
  v = jnp.minimum(jnp.arange(tiles_m + G - 1, dtype=jnp.int32), num_visits - 1)
  grp = jnp.searchsorted(visit_ends, v, side="right").astype(jnp.int32)
  tile = first[grp] + v - (visit_ends - visits)[grp]
  return grp, tile.astype(jnp.int32), num_visits.reshape(1).astype(jnp.int32)


def _mosaic_tiles(bs: BlockSizes, m, k, n):
  """Mosaic blocks: multiples of 16 rows (bf16 packs 16 sublanes) / 128 lanes, or the whole
  (small) dimension."""
  tm = min(bs.block_m, _cdiv(m, 16) * 16)
  tk = k if k <= bs.block_k else bs.block_k
  tn = n if n <= bs.block_n else bs.block_n
  return tm, tk, tn


def _gmm_mosaic(lhs, rhs, group_sizes, bs: BlockSizes, interpret, transpose_rhs):
  from jax.experimental.pallas import tpu as pltpu
  m, k = lhs.shape
  g = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, tk, tn = _mosaic_tiles(bs, m, k, n)
  mp, kp, np_ = _cdiv(m, tm) * tm, _cdiv(k, tk) * tk, _cdiv(n, tn) * tn
  lhs_p = _pad_to(_pad_to(lhs, 0, mp), 1, kp)
  rhs_p = _pad_to(_pad_to(rhs, 1, np_ if transpose_rhs else kp), 2,
                  kp if transpose_rhs else np_)
  # The tail (rows past sum(group_sizes)) is group g: its visits store zeros.
  offsets = jnp.concatenate([_offsets(group_sizes, mp), jnp.array([mp], jnp.int32)])
  tiles_m, tiles_k = mp // tm, kp // tk
  vgroup, vtile, nvis = _visit_schedule(offsets, tm, tiles_m, visit_empty=False)
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
                                      precision=_dot_precision(lhs.dtype))

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
      out_shape=_out_struct((mp, np_), lhs.dtype, lhs_p),
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


def _tgmm_mosaic(lhs, grad, group_sizes, bs: BlockSizes, interpret):
  from jax.experimental.pallas import tpu as pltpu
  m, k = lhs.shape
  n = grad.shape[1]
  g = group_sizes.shape[0]
  tm, tk, tn = _mosaic_tiles(bs, m, k, n)
  mp, kp, np_ = _cdiv(m, tm) * tm, _cdiv(k, tk) * tk, _cdiv(n, tn) * tn
  lhs_p = _pad_to(_pad_to(lhs, 0, mp), 1, kp)
  grad_p = _pad_to(_pad_to(grad, 0, mp), 1, np_)
  offsets = _offsets(group_sizes, mp)
  vgroup, vtile, nvis = _visit_schedule(offsets, tm, mp // tm, visit_empty=True)
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
                                      precision=_dot_precision(lhs.dtype))

    @pl.when(last)
    def _store():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  out = pl.pallas_call(
      kernel,
      out_shape=_out_struct((g, kp, np_), lhs.dtype, lhs_p),
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


# --------------------------------------------------------------------------- XLA (CPU)


def _zeros_like_all(shape, dtype, *xs):
  """Zeros that vary over the same shard_map axes as xs (cond/scan need matching types)."""
  return sum(jnp.zeros_like(x, shape=shape, dtype=dtype) for x in xs)


def _gmm_xla(lhs, rhs, group_sizes, bs: BlockSizes, transpose_rhs):
  """The Triton schedule as an XLA scan: one [tm, k] x [k, n] dot per tile, exact flops.

  XLA:CPU expands `ragged_dot` into one masked dense product per group (g times the
  flops: 11x slower than this at m=12800, k=256, n=768, g=8 on our 2-core CPU).
  """
  m, k = lhs.shape
  g = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm = min(bs.block_m, m)
  grp, start, end = _row_tile_schedule(group_sizes, m, tm)
  contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def tile(out, sched):
    gi, s, e = sched
    row0 = jnp.minimum(s, m - tm)
    rows = row0 + jnp.arange(tm, dtype=jnp.int32)
    mine = ((rows >= s) & (rows < e))[:, None]
    a = lax.dynamic_slice_in_dim(lhs, row0, tm, 0)
    y = lax.cond(gi < g,  # the tail group (gi == g) and unused tiles store zeros
                 lambda: lax.dot_general(a, rhs[jnp.minimum(gi, g - 1)], contract,
                                         preferred_element_type=jnp.float32),
                 lambda: _zeros_like_all((tm, n), jnp.float32, lhs, rhs))
    old = lax.dynamic_slice_in_dim(out, row0, tm, 0)
    new = jnp.where(mine, y.astype(out.dtype), old)
    return lax.dynamic_update_slice_in_dim(out, new, row0, 0), None

  out, _ = lax.scan(tile, _zeros_like_all((m, n), lhs.dtype, lhs, rhs), (grp, start, end))
  return out


def _tgmm_xla(lhs, grad, group_sizes, bs: BlockSizes):
  m, k = lhs.shape
  n = grad.shape[1]
  g = group_sizes.shape[0]
  tm = min(bs.block_m, m)
  grp, start, end = _row_tile_schedule(group_sizes, m, tm)

  def tile(out, sched):
    gi, s, e = sched
    row0 = jnp.minimum(s, m - tm)
    rows = row0 + jnp.arange(tm, dtype=jnp.int32)
    mine = ((rows >= s) & (rows < e))[:, None]
    a = jnp.where(mine, lax.dynamic_slice_in_dim(lhs, row0, tm, 0), 0)
    b = jnp.where(mine, lax.dynamic_slice_in_dim(grad, row0, tm, 0), 0)
    gc = jnp.minimum(gi, g - 1)
    upd = lax.cond(gi < g,
                   lambda: lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32),
                   lambda: _zeros_like_all((k, n), jnp.float32, lhs, grad))
    return out.at[gc].add(upd), None

  out, _ = lax.scan(tile, _zeros_like_all((g, k, n), jnp.float32, lhs, grad),
                    (grp, start, end))
  return out.astype(lhs.dtype)


def _gmm_ragged_dot(lhs, rhs, group_sizes, transpose_rhs):
  if transpose_rhs:
    rhs = jnp.swapaxes(rhs, 1, 2)
  return lax.ragged_dot(lhs, rhs, group_sizes,
                        preferred_element_type=jnp.float32).astype(lhs.dtype)


def _tgmm_ragged_dot(lhs, grad, group_sizes):
  dims = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                       lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  return lax.ragged_dot_general(lhs, grad, group_sizes, dims,
                                preferred_element_type=jnp.float32).astype(lhs.dtype)


# --------------------------------------------------------------------------- public API


def _resolve_backend(backend: str | None, interpret: bool) -> str:
  if backend is not None:
    if backend not in BACKENDS:
      raise ValueError(f"gmm backend={backend!r}: use one of {BACKENDS} or None (auto)")
    return backend
  platform = jax.default_backend()
  if platform == "gpu":
    return "triton"
  if platform == "tpu":
    return "mosaic"
  return "triton" if interpret else "xla"


def _forward(lhs, rhs, group_sizes, backend, block_sizes, interpret, transpose_rhs=False):
  if backend == "ragged_dot":
    return _gmm_ragged_dot(lhs, rhs, group_sizes, transpose_rhs)
  bs = block_sizes or BlockSizes.get_default(backend)
  if backend == "xla":
    return _gmm_xla(lhs, rhs, group_sizes, bs, transpose_rhs)
  fn = _gmm_triton if backend == "triton" else _gmm_mosaic
  return fn(lhs, rhs, group_sizes, bs, interpret, transpose_rhs)


def _transposed(lhs, grad, group_sizes, backend, block_sizes, interpret):
  if backend == "ragged_dot":
    return _tgmm_ragged_dot(lhs, grad, group_sizes)
  bs = block_sizes or BlockSizes.get_default(backend)
  if backend == "xla":
    return _tgmm_xla(lhs, grad, group_sizes, bs)
  fn = _tgmm_triton if backend == "triton" else _tgmm_mosaic
  return fn(lhs, grad, group_sizes, bs, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, backend, block_sizes, interpret):
  return _forward(lhs, rhs, group_sizes, backend, block_sizes, interpret)


def _gmm_fwd(lhs, rhs, group_sizes, backend, block_sizes, interpret):
  out = _forward(lhs, rhs, group_sizes, backend, block_sizes, interpret)
  return out, (lhs, rhs, group_sizes)


def _gmm_bwd(backend, block_sizes, interpret, residuals, grad):
  lhs, rhs, group_sizes = residuals
  grad = grad.astype(lhs.dtype)
  d_lhs = _forward(grad, rhs, group_sizes, backend, block_sizes, interpret, transpose_rhs=True)
  d_rhs = _transposed(lhs, grad, group_sizes, backend, block_sizes, interpret)
  return d_lhs, d_rhs.astype(rhs.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _varying_axes(a) -> frozenset:
  aval = jax.typeof(a)
  if hasattr(aval, "vma"):  # jax < 0.11 spelling
    return frozenset(aval.vma)
  mat = getattr(aval, "manual_axis_type", None)
  return frozenset(getattr(mat, "varying", ()))


def _vary_alike(x, y, group_sizes):
  """Inside shard_map: make x and y vary over the union of the three inputs' mesh axes.

  A custom_vjp must return cotangents typed like its inputs; when the weights are the same
  on every 'data' shard but the rows differ, d rhs varies over 'data'. Casting rhs to
  varying first lets autodiff insert the psum that transposes that cast (as it does for
  lax.ragged_dot). Outside shard_map every vma is empty and this is a no-op.
  """
  vmas = [_varying_axes(a) for a in (x, y, group_sizes)]
  union = frozenset().union(*vmas)
  cast = lambda a, v: a if v == union else lax.pcast(a, tuple(sorted(union - v)), to="varying")
  return cast(x, vmas[0]), cast(y, vmas[1])


def _check(lhs, rhs_or_grad, group_sizes, rhs_ndim, name):
  if lhs.ndim != 2 or rhs_or_grad.ndim != rhs_ndim or group_sizes.ndim != 1:
    second = "rhs [g, k, n]" if rhs_ndim == 3 else "grad [m, n]"
    raise ValueError(f"{name}: expected lhs [m, k], {second} and group_sizes [g]; got "
                     f"{lhs.shape}, {rhs_or_grad.shape}, {group_sizes.shape}")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"{name}: group_sizes must be integers, got {group_sizes.dtype}")


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        block_sizes: BlockSizes | None = None, interpret: bool = False,
        backend: str | None = None) -> jax.Array:
  """Grouped matmul `[m, k] x [g, k, n] -> [m, n]`, semantics of `jax.lax.ragged_dot`.

  Differentiable in lhs and rhs (float32 or bfloat16; the output has lhs's dtype).
  backend: 'triton' | 'mosaic' | 'xla' | None (GPU -> triton, TPU -> mosaic,
  CPU -> xla, or triton when interpret=True).
  """
  _check(lhs, rhs, group_sizes, 3, "gmm")
  if lhs.shape[1] != rhs.shape[1] or group_sizes.shape[0] != rhs.shape[0]:
    raise ValueError(f"gmm: lhs {lhs.shape}, rhs {rhs.shape} and group_sizes "
                     f"{group_sizes.shape} disagree (need lhs [m, k], rhs [g, k, n], sizes [g])")
  if lhs.shape[0] == 0:
    return jnp.zeros((0, rhs.shape[2]), lhs.dtype)
  lhs, rhs = _vary_alike(lhs, rhs.astype(lhs.dtype), group_sizes)
  return _gmm(lhs, rhs, group_sizes.astype(jnp.int32),
              _resolve_backend(backend, interpret), block_sizes, interpret)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *,
         block_sizes: BlockSizes | None = None, interpret: bool = False,
         backend: str | None = None) -> jax.Array:
  """Per-group `lhs[rows].T @ grad[rows]`: `[m, k], [m, n] -> [g, k, n]` (gmm's weight grad)."""
  _check(lhs, grad, group_sizes, 2, "tgmm")
  if lhs.shape[0] != grad.shape[0]:
    raise ValueError(f"tgmm: lhs {lhs.shape} and grad {grad.shape} need the same rows")
  lhs, grad = _vary_alike(lhs, grad.astype(lhs.dtype), group_sizes)
  return _transposed(lhs, grad, group_sizes.astype(jnp.int32),
                     _resolve_backend(backend, interpret), block_sizes, interpret)
