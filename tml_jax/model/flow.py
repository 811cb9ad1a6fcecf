"""Flow-matching audio head: hidden state of a MODEL_AUDIO query -> mel frames.

Conditional flow matching with the straight (rectified) path x_t = (1 - t) x0 + t x1 from
noise x0 ~ N(0, I) to data x1; the head predicts the velocity x1 - x0 with an MLP whose
residual blocks are modulated by the condition (adaptive norm, as in DiT). Sampling
integrates the ODE with a few Euler steps.
Shapes: N rows (any leading dims), D condition width, M = frames_per_query * n_mels, W width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tml_jax.model.layers import DTYPES, fan_in_init, param

# dMel log10 values live in [-7, 2]; the flow works on a roughly unit-scale copy.
MEL_CENTER, MEL_SCALE = -2.5, 2.25


def normalize_mel(log_mel):
  return (log_mel - MEL_CENTER) / MEL_SCALE


def denormalize_mel(x):
  return jnp.clip(x * MEL_SCALE + MEL_CENTER, -7.0, 2.0)


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  cond_dim: int
  out_dim: int
  width: int = 256
  num_layers: int = 3
  param_dtype: str = "float32"


def _layer_norm(x):
  x = x.astype(jnp.float32)
  return (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)


def time_features(t_N, dim: int):
  """Sinusoidal features of the flow time t in [0, 1]."""
  half = dim // 2
  freq = jnp.exp(-jnp.log(1000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angle = t_N[..., None].astype(jnp.float32) * 1000.0 * freq.reshape((1,) * t_N.ndim + (-1,))
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


class FlowHead(nnx.Module):

  def __init__(self, cfg: FlowConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    W, pd, zeros = cfg.width, DTYPES[cfg.param_dtype], jax.nn.initializers.zeros
    self.w_cond = param(rngs, fan_in_init(cfg.cond_dim), (cfg.cond_dim, W), ("embed", None), pd)
    self.w_time = param(rngs, fan_in_init(W), (W, W), (None, None), pd)
    self.w_in = param(rngs, fan_in_init(cfg.out_dim), (cfg.out_dim, W), ("mel", None), pd)
    # Modulation starts at zero so every block starts as the identity (adaLN-zero).
    self.w_mod = nnx.List([param(rngs, zeros, (W, 3 * W), (None, None), pd)
                           for _ in range(cfg.num_layers + 1)])
    self.w1 = nnx.List([param(rngs, fan_in_init(W), (W, 2 * W), (None, None), pd)
                        for _ in range(cfg.num_layers)])
    self.w2 = nnx.List([param(rngs, fan_in_init(2 * W), (2 * W, W), (None, None), pd)
                        for _ in range(cfg.num_layers)])
    self.w_out = param(rngs, zeros, (W, cfg.out_dim), (None, "mel"), pd)

  def __call__(self, cond_ND, x_NM, t_N):
    """Velocity field v(x_t, t | cond), all float32."""
    f32 = lambda p: p[...].astype(jnp.float32)
    c = cond_ND.astype(jnp.float32) @ f32(self.w_cond)
    c = jax.nn.silu(c + time_features(t_N, self.cfg.width) @ f32(self.w_time))
    h = x_NM.astype(jnp.float32) @ f32(self.w_in)
    for i in range(self.cfg.num_layers):
      shift, scale, gate = jnp.split(c @ f32(self.w_mod[i]), 3, axis=-1)
      y = _layer_norm(h) * (1 + scale) + shift
      h = h + gate * (jax.nn.silu(y @ f32(self.w1[i])) @ f32(self.w2[i]))
    shift, scale, _ = jnp.split(c @ f32(self.w_mod[-1]), 3, axis=-1)
    return (_layer_norm(h) * (1 + scale) + shift) @ f32(self.w_out)

  def sample(self, cond_ND, rng, num_steps: int):
    """Euler integration of the learned ODE from noise (t=0) to data (t=1)."""
    x = jax.random.normal(rng, (*cond_ND.shape[:-1], self.cfg.out_dim), jnp.float32)
    dt = 1.0 / num_steps
    for i in range(num_steps):
      t = jnp.full(cond_ND.shape[:-1], i * dt, jnp.float32)
      x = x + dt * self(cond_ND, x, t)
    return x
