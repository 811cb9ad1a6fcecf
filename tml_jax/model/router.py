"""MoE routing: top-k gating, the auxiliary losses, permutation metadata and combine.

Shapes: B batch, L length, T tokens, E experts, k experts per token, A = T * k
assignments, D features.

No Pallas kernel for any routing step; they stay plain jnp. Measured
(`python benchmarks/moe.py --cpu`, tiny config: T = 8*800 tokens, E = 8, k = 2, D = 256,
float32, forward only, 2-core shared CPU, 2026-11-22): top_k_routing 0.9 ms, sort_by_expert
0.6 ms, permute 1.2 ms, combine 2.8 ms; together 0.5% of the MoE layer's forward+backward
(~1.1 s with the grouped impl). Nothing to win on CPU.

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


def route(x_BLD, w_router_DE, k: int):
  """(logits_BLE, weights_BLk, ids_BLk, probs_TE) of a float32 softmax router.

  The router stays float32: top-k on bf16 logits flips near-ties between steps.
  """
  B, L, _ = x_BLD.shape
  logits_BLE = jnp.einsum("bld,de->ble", x_BLD.astype(jnp.float32),
                          w_router_DE.astype(jnp.float32))
  w_Tk, ids_Tk, probs_TE = top_k_routing(logits_BLE.reshape(B * L, -1), k)
  return logits_BLE, w_Tk.reshape(B, L, k), ids_Tk.reshape(B, L, k), probs_TE


def top_k_routing(logits_TE, k: int):
  """Softmax router; returns (weights_Tk renormalised to sum 1, expert ids_Tk, probs_TE)."""
  probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
  weights_Tk, ids_Tk = jax.lax.top_k(probs_TE, k)
  weights_Tk = weights_Tk / jnp.sum(weights_Tk, axis=-1, keepdims=True)
  return weights_Tk, ids_Tk.astype(jnp.int32), probs_TE


def balance_loss(probs_TE, ids_Tk, valid_T):
  """Switch-style load balancing: E * sum_e f_e * P_e over valid tokens (1.0 when uniform).

  f_e is the fraction of the T*k assignments sent to e; P_e the mean router probability.
  """
  T, E = probs_TE.shape
  w_T = valid_T.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w_T), 1.0)
  counts_E = jnp.sum(jax.nn.one_hot(ids_Tk, E, dtype=jnp.float32) * w_T[:, None, None], (0, 1))
  f_E = counts_E / (n * ids_Tk.shape[1])
  p_E = jnp.sum(probs_TE * w_T[:, None], 0) / n
  return E * jnp.sum(f_E * p_E)


def z_loss(logits_TE, valid_T):
  """Router z-loss (ST-MoE): mean squared log-partition, keeps router logits small."""
  w_T = valid_T.astype(jnp.float32)
  lse_T = jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)
  return jnp.sum(lse_T ** 2 * w_T) / jnp.maximum(jnp.sum(w_T), 1.0)


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
