"""Small building blocks shared by the model files.

Parameters carry their logical axis names in the `logical_axes` metadata field;
`tml_jax.train.sharding` maps them to mesh axes with the config's one rule table. We keep the names
in our own field instead of `nnx.with_partitioning` because flax 0.12 shards such variables
eagerly at creation and then demands a mesh even for a CPU unit test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def param(rngs: nnx.Rngs, init, shape, axes: tuple, dtype) -> nnx.Param:
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes))


def fan_in_init(fan_in: int, scale: float = 1.0):
  """Truncated normal with std scale/sqrt(fan_in): keeps activations O(1) at init."""
  return jax.nn.initializers.truncated_normal(stddev=scale / fan_in ** 0.5)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",), param_dtype)

  def __call__(self, x):
    # Normalise in float32 whatever the compute dtype: bf16 sums of squares lose the tail.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (y * scale).astype(x.dtype)


def rope(x_BLHD, positions_BL, theta: float):
  """Rotary position embedding (rotate-half form) applied in float32."""
  half = x_BLHD.shape[-1] // 2
  freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BLF = positions_BL.astype(jnp.float32)[..., None] * freq_F[None, None]
  sin, cos = jnp.sin(angle_BLF)[:, :, None, :], jnp.cos(angle_BLF)[:, :, None, :]
  x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHD.dtype)
