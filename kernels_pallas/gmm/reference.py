"""References of the grouped matmul: plain jnp, and XLA's own `lax.ragged_dot`.

`gmm_reference` / `tgmm_reference` compute every group's product on every row and keep
each row's own (g times the flops, float32 HIGHEST): the tests' ground truth.
`gmm_ragged_dot` / `tgmm_ragged_dot` are gmm's backend 'ragged_dot', for comparing with
XLA's grouped matmul.

Shapes: lhs [m, k], rhs [g, k, n], grad [m, n], group_sizes [g].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


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


def gmm_ragged_dot(lhs, rhs, group_sizes, transpose_rhs):
  if transpose_rhs:
    rhs = jnp.swapaxes(rhs, 1, 2)
  return lax.ragged_dot(lhs, rhs, group_sizes,
                        preferred_element_type=jnp.float32).astype(lhs.dtype)


def tgmm_ragged_dot(lhs, grad, group_sizes):
  dims = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                       lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  return lax.ragged_dot_general(lhs, grad, group_sizes, dims,
                                preferred_element_type=jnp.float32).astype(lhs.dtype)
