"""The platform the kernels are built for: the local backend, or the target of an
ahead-of-time compilation.

Tracing for a TPU topology from a CPU host (`python -m tml_jax.plan`) must pick the Mosaic
kernels although `jax.default_backend()` is "cpu": the plan wraps its lowering in
`compile_for("tpu")`, and every backend choice in the kernels and the model asks
`target_platform()` instead of the local backend.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("tml_jax_target_platform",
                                                                     default=None)
PLATFORMS = ("cpu", "gpu", "tpu")


def target_platform() -> str:
  """"cpu" | "gpu" | "tpu": what the code being traced will run on."""
  target = _TARGET.get()
  if target is not None:
    return target
  platform = jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm") else platform


@contextlib.contextmanager
def compile_for(platform: str):
  """Trace (and lower) for `platform` inside the block, whatever the local backend is."""
  if platform not in PLATFORMS:
    raise ValueError(f"compile_for({platform!r}): use one of {PLATFORMS}")
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def varying_axes(a) -> frozenset:
  """The shard_map mesh axes `a` varies over (empty outside shard_map)."""
  aval = jax.typeof(a)
  if hasattr(aval, "vma"):  # jax < 0.11 spelling
    return frozenset(aval.vma)
  return frozenset(getattr(getattr(aval, "manual_axis_type", None), "varying", ()))


def out_struct(shape, dtype, like):
  """A pallas_call out_shape varying over the same shard_map axes as `like`: inside a
  shard_map with check_vma, Pallas needs every output's manual axis type."""
  mat = getattr(jax.typeof(like), "manual_axis_type", None)
  if mat is None:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
