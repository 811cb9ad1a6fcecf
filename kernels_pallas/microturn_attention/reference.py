"""The shape contract of micro-turn attention and its plain-jnp reference.

Shape legend: B batch, T query length, S key length, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from tml_jax.microturn import TokenMeta, microturn_mask


def check_inputs(q, k, v, q_meta: TokenMeta, kv_meta: TokenMeta) -> None:
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"expected q [B, T, H, D] and k, v [B, S, K, D] of equal shapes; got "
                     f"q {q.shape}, k {k.shape}, v {v.shape}")
  (B, T, H, D), (S, K) = q.shape, k.shape[1:3]
  if k.shape[0] != B or k.shape[3] != D or H % K:
    raise ValueError(f"k/v {k.shape} do not match q {q.shape}: batch and head_dim must agree "
                     f"and the {H} query heads must be a multiple of the {K} kv heads")
  for name, meta, length in (("q_meta", q_meta, T), ("kv_meta", kv_meta, S)):
    if any(tuple(f.shape) != (B, length) for f in meta):
      raise ValueError(f"{name} fields must be [batch, length] = {(B, length)}; got "
                       f"{[tuple(f.shape) for f in meta]}")


def microturn_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                                  q_meta: TokenMeta, kv_meta: TokenMeta, *,
                                  window: int | None) -> jax.Array:
  """Dense docs/design.md §4 mask, GQA by repeating kv heads, zero rows with no visible key."""
  check_inputs(q, k, v, q_meta, kv_meta)
  G = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  mask_B1TS = microturn_mask(q_meta, kv_meta, window)[:, None]
  hi = lax.Precision.HIGHEST
  s_BHTS = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32),
                      precision=hi) / math.sqrt(q.shape[-1])
  s_BHTS = jnp.where(mask_B1TS, s_BHTS, 0.0)  # 0, not -inf: keeps gradients NaN-free
  m_BHT1 = lax.stop_gradient(jnp.max(jnp.where(mask_B1TS, s_BHTS, -jnp.inf), -1,
                                     keepdims=True))
  m_BHT1 = jnp.where(jnp.isfinite(m_BHT1), m_BHT1, 0.0)
  p_BHTS = jnp.where(mask_B1TS, jnp.exp(s_BHTS - m_BHT1), 0.0)
  l_BHT1 = p_BHTS.sum(-1, keepdims=True)
  p_BHTS = p_BHTS / jnp.where(l_BHT1 > 0, l_BHT1, 1.0)
  o = jnp.einsum("bhts,bshd->bthd", p_BHTS, v.astype(jnp.float32), precision=hi)
  return o.astype(q.dtype)
