"""MoE routing: top-k gating, permutation metadata (tokens sorted by expert) and combine.

Shapes: T tokens, E experts, k experts per token, A = T * k assignments, D features.

Decision (issue 6): no Pallas kernel for any routing step; they stay plain jnp.

Measured (`python benchmarks/moe.py --cpu`, tiny config: T = 8*800 tokens, E = 8, k = 2,
D = 256, float32, forward only, 2-core shared CPU, 2026-11-22): top_k_routing 0.9 ms,
sort_by_expert 0.6 ms, permute 1.2 ms, combine 2.8 ms; together 0.5% of the MoE layer's
forward+backward (~1.1 s with moe_impl='pallas'). Nothing to win on CPU.

GPU, by arithmetic (H100, bf16, D = 2048, 64k tokens, top-8, F = 1408): top-k over [T, E]
and the argsort of A = T*k int32 keys (a radix sort) take tens of microseconds. permute and
combine each move A*D*2 bytes = 2.1 GB, ~1 ms at ~3 TB/s, against ~15 ms for the three
expert matmuls (9 TFLOP): ~10% of the forward at top-8, ~3% at top-2. A standalone Pallas
gather cannot beat XLA's (both run at bandwidth); what is left to win is fusion: gathering
lhs rows inside the first gmm (row indices as a kernel input) removes one write and one read
of [A, D]. That is a gmm feature to add when the GPU benchmark shows it, not a routing kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_routing(logits_TE, k: int):
  """Softmax router; returns (weights_Tk renormalised to sum 1, expert ids_Tk, probs_TE)."""
  probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
  weights_Tk, ids_Tk = jax.lax.top_k(probs_TE, k)
  weights_Tk = weights_Tk / jnp.sum(weights_Tk, axis=-1, keepdims=True)
  return weights_Tk, ids_Tk.astype(jnp.int32), probs_TE


def sort_by_expert(ids_Tk, num_experts: int):
  """Permutation metadata.

  Returns (order_A, group_sizes_E, inverse_A): assignment `order_A[i]` (flat index t*k + j)
  is the i-th in expert-sorted order (stable, so tokens keep their order inside an expert);
  `inverse_A` undoes it: `sorted[inverse_A] == unsorted`.
  """
  flat_A = ids_Tk.reshape(-1)
  order_A = jnp.argsort(flat_A, stable=True).astype(jnp.int32)
  group_sizes_E = jnp.bincount(flat_A, length=num_experts).astype(jnp.int32)
  inverse_A = jnp.zeros_like(order_A).at[order_A].set(
      jnp.arange(order_A.shape[0], dtype=jnp.int32))
  return order_A, group_sizes_E, inverse_A


def permute(x_TD, order_A, k: int):
  """Rows of x in expert-sorted assignment order: `[A, D]`."""
  return jnp.take(x_TD, order_A // k, axis=0)


def combine(y_AD, inverse_A, weights_Tk):
  """Unpermute expert outputs and take the routing-weighted sum over each token's k."""
  T, k = weights_Tk.shape
  y_TkD = jnp.take(y_AD, inverse_A, axis=0).reshape(T, k, -1)
  return jnp.einsum("tkd,tk->td", y_TkD.astype(jnp.float32),
                    weights_Tk.astype(jnp.float32)).astype(y_AD.dtype)
