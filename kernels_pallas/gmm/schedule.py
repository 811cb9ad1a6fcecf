"""Tiling metadata of the grouped matmul: tile sizes, row offsets, the two tile schedules.

Shapes: m rows (expert-sorted), k contracted, n output features, g groups; group i owns rows
[offsets[i], offsets[i+1]) with offsets = [0, cumsum(group_sizes)].
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from kernels_pallas.platform import out_struct  # noqa: F401 (the kernels import it from here)


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


def cdiv(a, b):
  return (a + b - 1) // b


def pow2_tile(block: int, dim: int) -> int:
  """Largest power of two <= min(block, dim): the window then always fits inside the array."""
  t = 1 << (min(block, dim).bit_length() - 1)
  return max(t, 16)


def pad_to(x, axis, size):
  if x.shape[axis] >= size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def group_offsets(group_sizes, m):
  """[0, cumsum(group_sizes)] clipped to m (ragged_dot ignores rows past m)."""
  ends = jnp.minimum(jnp.cumsum(group_sizes), m).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])


def dot_precision(dtype):
  # float32 experts are the debugging/reference configuration: keep them exact (no TF32).
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def row_tile_schedule(group_sizes, m: int, tm: int):
  """Program t -> (group, first row, end row): the Triton kernel's and the CPU scan's.

  Group i (and the tail group g = rows past the last group) is cut into cdiv(size, tm)
  tiles starting at its own first row, so a tile multiplies by one expert's weights and
  every row is written by exactly one tile. Sum over g+1 groups of cdiv(size, tm) is at
  most cdiv(m, tm) + g, the static grid size; programs past the real count get group g+1
  and do nothing.
  """
  g = group_sizes.shape[0]
  offs = group_offsets(group_sizes, m)
  ends_x = jnp.concatenate([offs[1:], jnp.array([m], jnp.int32)])
  starts_x = offs
  tiles_x = cdiv(ends_x - starts_x, tm)
  tile_ends = jnp.cumsum(tiles_x)
  t = jnp.arange(cdiv(m, tm) + g, dtype=jnp.int32)
  grp = jnp.searchsorted(tile_ends, t, side="right").astype(jnp.int32)
  live = grp <= g
  grp_c = jnp.minimum(grp, g)
  start = starts_x[grp_c] + (t - (tile_ends - tiles_x)[grp_c]) * tm
  end = jnp.minimum(start + tm, ends_x[grp_c])
  return grp, jnp.where(live, start, 0), jnp.where(live, end, 0)


def visit_schedule(offs, tm: int, tiles_m: int, *, visit_empty: bool):
  """(group, m-tile) visits in group order, for groups given by offs[G+1]: the Mosaic one.

  Group i visits tiles start//tm .. (end-1)//tm; an empty group visits one tile when
  `visit_empty` (tgmm must still write its zero gradient). The total is at most
  tiles_m + G - 1, the static grid size; the padding visits repeat the last real one and
  are switched off by `v < num_visits` inside the kernel.
  """
  G = offs.shape[0] - 1
  sizes = offs[1:] - offs[:-1]
  first = jnp.minimum(offs[:-1] // tm, tiles_m - 1)
  last = (offs[1:] - 1) // tm
  visits = jnp.where(sizes > 0, last - first + 1, 1 if visit_empty else 0)
  visit_ends = jnp.cumsum(visits)
  num_visits = visit_ends[-1]
  v = jnp.minimum(jnp.arange(tiles_m + G - 1, dtype=jnp.int32), num_visits - 1)
  grp = jnp.searchsorted(visit_ends, v, side="right").astype(jnp.int32)
  tile = first[grp] + v - (visit_ends - visits)[grp]
  return grp, tile.astype(jnp.int32), num_visits.reshape(1).astype(jnp.int32)
