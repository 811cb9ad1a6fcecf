"""Grouped-query attention under the micro-turn mask, with pluggable backends.

Shapes: B batch, L query length, M key length, H query heads, K kv heads, G = H / K,
D model width, Dh head width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tml_jax.microturn import TokenMeta, microturn_mask
from tml_jax.model.layers import DTYPES, fan_in_init, param, rope


def dense_attention(q_BLHD, k_BMKD, v_BMKD, q_meta: TokenMeta, kv_meta: TokenMeta, *,
                    window: int | None):
  """Reference: materialises the dense boolean mask. Rows with no visible key give zeros."""
  B, L, H, Dh = q_BLHD.shape
  K = k_BMKD.shape[2]
  q_BLKGD = q_BLHD.reshape(B, L, K, H // K, Dh)
  logits = jnp.einsum("blkgd,bmkd->bkglm", q_BLKGD, k_BMKD,
                      preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(Dh))
  mask_B11LM = microturn_mask(q_meta, kv_meta, window)[:, None, None]
  # A finite fill keeps fully masked rows NaN-free; the where() after softmax zeroes them.
  logits = jnp.where(mask_B11LM, logits, -1e30)
  probs = jnp.where(mask_B11LM, jax.nn.softmax(logits, axis=-1), 0.0)
  out = jnp.einsum("bkglm,bmkd->blkgd", probs.astype(v_BMKD.dtype), v_BMKD,
                   preferred_element_type=jnp.float32)
  return out.reshape(B, L, H, Dh).astype(q_BLHD.dtype)


def _pallas_attention(q, k, v, q_meta, kv_meta, *, window):
  from kernels_pallas.microturn_attention import microturn_attention
  return microturn_attention(q, k, v, q_meta, kv_meta, window=window)


ATTENTION_BACKENDS: dict[str, Callable] = {
    "reference": dense_attention,
    "pallas": _pallas_attention,
}


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  backend: str = "reference"
  dtype: str = "float32"
  param_dtype: str = "float32"


class Attention(nnx.Module):

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, H, K, Dh, pd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, \
        DTYPES[cfg.param_dtype]
    self.wq = param(rngs, fan_in_init(D), (D, H, Dh), ("embed", "heads", "head_dim"), pd)
    self.wk = param(rngs, fan_in_init(D), (D, K, Dh), ("embed", "kv_heads", "head_dim"), pd)
    self.wv = param(rngs, fan_in_init(D), (D, K, Dh), ("embed", "kv_heads", "head_dim"), pd)
    self.wo = param(rngs, fan_in_init(H * Dh), (H, Dh, D), ("heads", "head_dim", "embed"), pd)

  def project_qkv(self, x_BLD, positions_BL):
    dt = DTYPES[self.cfg.dtype]
    x = x_BLD.astype(dt)
    q = rope(jnp.einsum("bld,dhk->blhk", x, self.wq[...].astype(dt)), positions_BL,
             self.cfg.rope_theta)
    k = rope(jnp.einsum("bld,dhk->blhk", x, self.wk[...].astype(dt)), positions_BL,
             self.cfg.rope_theta)
    v = jnp.einsum("bld,dhk->blhk", x, self.wv[...].astype(dt))
    return q, k, v

  def output(self, o_BLHD):
    dt = DTYPES[self.cfg.dtype]
    return jnp.einsum("blhk,hkd->bld", o_BLHD.astype(dt), self.wo[...].astype(dt))

  def __call__(self, x_BLD, meta: TokenMeta, positions_BL, *, window: int | None):
    q, k, v = self.project_qkv(x_BLD, positions_BL)
    o = ATTENTION_BACKENDS[self.cfg.backend](q, k, v, meta, meta, window=window)
    return self.output(o)
