"""MoE routing: top-k gating, permutation metadata (tokens sorted by expert) and combine.

Shapes: T tokens, E experts, k experts per token, A = T * k assignments, D features.

These are plain jnp: sorting and gathers are memory-bound and XLA already emits them at
bandwidth; see benchmarks/moe.py for the measurement behind that choice.
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
