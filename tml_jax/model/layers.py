"""Small building blocks shared by the model files.

Parameters carry their logical axis names in the `logical_axes` metadata field;
`tml_jax.train.sharding` maps them to mesh axes with the config's one rule table. We keep the names
in our own field instead of `nnx.with_partitioning` because flax 0.12 shards such variables
eagerly at creation and then demands a mesh even for a CPU unit test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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


def rope_turns_F(half: int, theta: float) -> np.ndarray:
  """Each frequency's rotation per position in fixed-point turns: uint32, 2**32 = one turn."""
  freq = theta ** (-np.arange(half, dtype=np.float64) / half) / (2 * np.pi)
  return np.round(freq * 2.0**32).astype(np.uint32)


def rope(x_BLHD, positions_BL, theta: float):
  """Rotary position embedding (rotate-half form) applied in float32.

  Angles are computed exactly in integers: position * (turns per position as a uint32
  fixed-point fraction of a turn), wrapping mod 2**32 = mod one full turn. So every position,
  however large (a streaming session's position grows without bound and int32 wraps after
  ~4e4 hours at 50 tokens per chunk, consistently mod 2**32), gets an angle as precise as
  position 0's, and q.k depends only on the position difference. A float32 `position * freq`
  loses that after about an hour of streaming (its ulp at 1e6 is 0.06 rad). The fixed point
  changes each frequency by < 5e-6 relative, far below what training can tell apart.
  """
  half = x_BLHD.shape[-1] // 2
  turns_F = jnp.asarray(rope_turns_F(half, theta))
  turns_BLF = positions_BL.astype(jnp.uint32)[..., None] * turns_F[None, None]  # wraps: exact
  angle_BLF = turns_BLF.astype(jnp.float32) * np.float32(2 * np.pi / 2.0**32)
  sin, cos = jnp.sin(angle_BLF)[:, :, None, :], jnp.cos(angle_BLF)[:, :, None, :]
  x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHD.dtype)
