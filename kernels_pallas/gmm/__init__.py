"""Grouped matrix multiplication for dropless MoE: `gmm` (forward) and `tgmm` (weight gradient).

Shapes: m rows (expert-sorted assignments), k contracted features, n output features,
g groups (experts). The rows of `lhs` are consecutive groups: group i owns rows
[offsets[i], offsets[i+1]) with offsets = [0, cumsum(group_sizes)].

  gmm(lhs[m, k], rhs[g, k, n], group_sizes[g]) -> [m, n]
      out[r] = lhs[r] @ rhs[group(r)]; rows past sum(group_sizes) are zero
      (exactly `jax.lax.ragged_dot(lhs, rhs, group_sizes)`).
  tgmm(lhs[m, k], grad[m, n], group_sizes[g]) -> [g, k, n]
      out[i] = lhs[rows of i].T @ grad[rows of i]; empty groups give zeros.

Backends, picked by `backend` (default: from the platform), one file each:
  'triton'      GPU (triton.py): one program per row tile of one group, no atomics.
  'mosaic'      TPU (mosaic.py), megablox-style visits of (group, m-tile) pairs.
  'xla'         The CPU default (tile_scan.py): the Triton tile schedule as an XLA scan,
                exact flops; much faster on CPU than Pallas interpret mode or ragged_dot.
  'ragged_dot'  `jax.lax.ragged_dot` (reference.py), to compare with XLA's own.
schedule.py holds the tile sizes and both tile schedules; api.py the dispatch and the
custom_vjp. `interpret=True` runs the 'triton' kernel (or `backend`'s) through the Pallas
interpreter. Accumulation is float32 everywhere; the output has lhs's dtype.
"""

from kernels_pallas.gmm.api import BACKENDS, gmm, resolve_backend, tgmm
from kernels_pallas.gmm.reference import gmm_reference, tgmm_reference
from kernels_pallas.gmm.schedule import BlockSizes, row_tile_schedule, visit_schedule

__all__ = ["BACKENDS", "BlockSizes", "gmm", "gmm_reference", "resolve_backend",
           "row_tile_schedule", "tgmm", "tgmm_reference", "visit_schedule"]
