"""Tile math shared by the Triton and Mosaic micro-turn attention kernels.

Scores of one (q block, kv block) tile, masked from the encoded metadata tiles on PARTIAL
blocks only; float32 products; the static per-call configuration.

Shape legend: bq / bk tokens of a q / kv block, D head dim.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels_pallas.microturn_attention.schedule import FULL, Tokens, visible

# Finite "minus infinity": keeps exp(m_old - m_new) free of inf - inf = NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class Config:
  """Static per-call settings: the tiles after fitting them to the lengths, the backend."""
  window: int | None
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  backend: str  # "triton" | "mosaic" | "interpret" | "mosaic_interpret" (tests only)
  num_warps: int | None
  num_stages: int


def precision(dtype):
  # float32 callers (tests, debugging) want float32 products, not TF32 on GPU.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot(a, b, *, trans_a=False, trans_b=False, precision=None):
  """`a @ b` (optionally transposed operands) accumulated in float32."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def masked_scores(q_QD, k_KD, flag, q_tok: Tokens, k_tok: Tokens, *, scale, window,
                  precision):
  """Scaled scores `[bq, bk]` in float32; masked entries set to MASK_VALUE on PARTIAL."""
  s = dot(q_QD, k_KD, trans_b=True, precision=precision) * scale

  def mask(s, q_tok, k_tok):
    return jnp.where(visible(q_tok, k_tok, window), s, MASK_VALUE)

  # FULL blocks skip the element-wise mask evaluation entirely.
  return lax.cond(flag == FULL, lambda s, *_: s, mask, s, q_tok, k_tok)
