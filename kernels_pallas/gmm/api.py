"""Dispatch of the grouped matmul: backend choice, the custom_vjp, shard_map typing.

d lhs = gmm(grad, rhs^T) and d rhs = tgmm(lhs, grad), tied by `jax.custom_vjp`.

Shapes: lhs [m, k], rhs [g, k, n], grad [m, n], group_sizes [g].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.gmm import mosaic, reference, tile_scan, triton
from kernels_pallas.gmm.schedule import BlockSizes
from kernels_pallas.platform import target_platform, varying_axes

BACKENDS = ("triton", "mosaic", "xla", "ragged_dot")


def resolve_backend(backend: str | None, interpret: bool) -> str:
  """`backend`, checked; None: GPU triton, TPU mosaic, CPU xla (triton when interpreting)."""
  if backend is not None:
    if backend not in BACKENDS:
      raise ValueError(f"gmm backend={backend!r}: use one of {BACKENDS} or None (auto)")
    return backend
  platform = target_platform()
  if platform == "gpu":
    return "triton"
  if platform == "tpu":
    return "mosaic"
  return "triton" if interpret else "xla"


def _forward(lhs, rhs, group_sizes, backend, block_sizes, interpret, transpose_rhs=False):
  if backend == "ragged_dot":
    return reference.gmm_ragged_dot(lhs, rhs, group_sizes, transpose_rhs)
  bs = block_sizes or BlockSizes.get_default(backend)
  if backend == "xla":
    return tile_scan.gmm(lhs, rhs, group_sizes, bs, transpose_rhs)
  kernels = triton if backend == "triton" else mosaic
  return kernels.gmm(lhs, rhs, group_sizes, bs, interpret, transpose_rhs)


def _transposed(lhs, grad, group_sizes, backend, block_sizes, interpret):
  if backend == "ragged_dot":
    return reference.tgmm_ragged_dot(lhs, grad, group_sizes)
  bs = block_sizes or BlockSizes.get_default(backend)
  if backend == "xla":
    return tile_scan.tgmm(lhs, grad, group_sizes, bs)
  kernels = triton if backend == "triton" else mosaic
  return kernels.tgmm(lhs, grad, group_sizes, bs, interpret)


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


def _vary_alike(x, y, group_sizes):
  """Inside shard_map: make x and y vary over the union of the three inputs' mesh axes.

  A custom_vjp must return cotangents typed like its inputs; when the weights are the same
  on every 'data' shard but the rows differ, d rhs varies over 'data'. Casting rhs to
  varying first lets autodiff insert the psum that transposes that cast (as it does for
  lax.ragged_dot). Outside shard_map every vma is empty and this is a no-op.
  """
  vmas = [varying_axes(a) for a in (x, y, group_sizes)]
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
  backend: one of `BACKENDS` or None (GPU -> triton, TPU -> mosaic, CPU -> xla, or triton
  when interpret=True); see the package docstring for what each is.
  """
  _check(lhs, rhs, group_sizes, 3, "gmm")
  if lhs.shape[1] != rhs.shape[1] or group_sizes.shape[0] != rhs.shape[0]:
    raise ValueError(f"gmm: lhs {lhs.shape}, rhs {rhs.shape} and group_sizes "
                     f"{group_sizes.shape} disagree (need lhs [m, k], rhs [g, k, n], sizes [g])")
  if lhs.shape[0] == 0:
    return jnp.zeros((0, rhs.shape[2]), lhs.dtype)
  lhs, rhs = _vary_alike(lhs, rhs.astype(lhs.dtype), group_sizes)
  return _gmm(lhs, rhs, group_sizes.astype(jnp.int32),
              resolve_backend(backend, interpret), block_sizes, interpret)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *,
         block_sizes: BlockSizes | None = None, interpret: bool = False,
         backend: str | None = None) -> jax.Array:
  """Per-group `lhs[rows].T @ grad[rows]`: `[m, k], [m, n] -> [g, k, n]` (gmm's weight grad)."""
  _check(lhs, grad, group_sizes, 2, "tgmm")
  if lhs.shape[0] != grad.shape[0]:
    raise ValueError(f"tgmm: lhs {lhs.shape} and grad {grad.shape} need the same rows")
  lhs, grad = _vary_alike(lhs, grad.astype(lhs.dtype), group_sizes)
  return _transposed(lhs, grad, group_sizes.astype(jnp.int32),
                     resolve_backend(backend, interpret), block_sizes, interpret)
