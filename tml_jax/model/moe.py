"""Feed-forward layers: a dense SwiGLU FFN and a top-k Mixture-of-Experts FFN.

The MoE has three interchangeable expert computations, identical when no token is dropped:
  einsum  GShard-style one-hot dispatch with a per-row capacity (drops overflow tokens)
  ragged  dropless: sort assignments by expert, `jax.lax.ragged_dot` per projection
  pallas  dropless: the same sort, our grouped matmul kernel (kernels_pallas.gmm)

Shapes: B batch, L length, T = B*L tokens, D model width, F expert hidden, E experts,
k experts per token, A = T*k assignments, C capacity per expert and row.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas import routing
from tml_jax.model import moe_parallel
from tml_jax.model.layers import DTYPES, fan_in_init, param


@dataclasses.dataclass(frozen=True)
class FFNConfig:
  d_model: int
  hidden: int
  dtype: str = "float32"
  param_dtype: str = "float32"


class DenseFFN(nnx.Module):
  """SwiGLU."""

  def __init__(self, cfg: FFNConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, F, pd = cfg.d_model, cfg.hidden, DTYPES[cfg.param_dtype]
    self.w_gate = param(rngs, fan_in_init(D), (D, F), ("embed", "mlp"), pd)
    self.w_up = param(rngs, fan_in_init(D), (D, F), ("embed", "mlp"), pd)
    self.w_down = param(rngs, fan_in_init(F), (F, D), ("mlp", "embed"), pd)

  def __call__(self, x_BLD, valid_BL=None):
    del valid_BL
    dt = DTYPES[self.cfg.dtype]
    x = x_BLD.astype(dt)
    h = jax.nn.silu(x @ self.w_gate[...].astype(dt)) * (x @ self.w_up[...].astype(dt))
    return h @ self.w_down[...].astype(dt), {}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  d_model: int
  hidden: int
  num_experts: int
  top_k: int
  shared_hidden: int = 0
  impl: str = "ragged"
  capacity_factor: float = 1.25
  dtype: str = "float32"
  param_dtype: str = "float32"


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


def swiglu_experts_grouped(x_AD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, matmul):
  """The expert FFN on expert-sorted rows, with `matmul(lhs, rhs, group_sizes)` grouped."""
  h = jax.nn.silu(matmul(x_AD, w_gate_EDF, group_sizes_E)) * matmul(x_AD, w_up_EDF,
                                                                    group_sizes_E)
  return matmul(h.astype(x_AD.dtype), w_down_EFD, group_sizes_E)


def _ragged_dot(lhs, rhs, group_sizes):
  return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)


def _pallas_gmm(lhs, rhs, group_sizes):
  from kernels_pallas.gmm import gmm
  return gmm(lhs, rhs, group_sizes)


GROUPED_MATMULS = {"ragged": _ragged_dot, "pallas": _pallas_gmm}


def capacity(tokens_per_row: int, cfg: MoEConfig) -> int:
  return max(1, math.ceil(cfg.capacity_factor * tokens_per_row * cfg.top_k / cfg.num_experts))


def einsum_dispatch(x_BLD, weights_BLk, ids_BLk, valid_BL, experts_fn, cfg: MoEConfig):
  """GShard-style capacity dispatch with one group per batch row; overflow is dropped.

  Priority inside an expert: first choices of all tokens, then second choices, ... (so a
  token's top-1 is kept before anyone's top-2), token order within a choice level. The
  expert FFN runs as one einsum over a dense [E, B*C, D] buffer. Tokens move in and out of
  the buffer by index (scatter/gather), not by GShard's one-hot [B, L, E, C] einsum: same
  result, but O(B*L*k*D) instead of O(B*L*E*C*D) work, which dominates on a CPU.
  Note: with capacity, whether a token is dropped depends on later tokens of its row.
  """
  B, L, D = x_BLD.shape
  E, k = cfg.num_experts, cfg.top_k
  C = capacity(L, cfg)
  onehot_BkLE = jnp.swapaxes(jax.nn.one_hot(ids_BLk, E, dtype=jnp.int32), 1, 2)
  onehot_BkLE = onehot_BkLE * valid_BL[:, None, :, None].astype(jnp.int32)
  position_BkLE = (jnp.cumsum(onehot_BkLE.reshape(B, k * L, E), axis=1) - 1).reshape(B, k, L, E)
  position_BLk = jnp.swapaxes(jnp.sum(position_BkLE * onehot_BkLE, axis=-1), 1, 2)
  keep_BLk = (position_BLk < C) & valid_BL[..., None]
  # Flat slot in the [E, B, C] buffer; dropped assignments go to a scratch row at the end.
  b_idx = jnp.arange(B, dtype=jnp.int32)[:, None, None]
  slot_BLk = jnp.where(keep_BLk, (ids_BLk * B + b_idx) * C + position_BLk, E * B * C)
  x_BLkD = jnp.broadcast_to(x_BLD[:, :, None, :], (B, L, k, D))
  buf = jnp.zeros((E * B * C + 1, D), x_BLD.dtype).at[slot_BLk.reshape(-1)].set(
      x_BLkD.reshape(-1, D), mode="drop")
  y_ND = experts_fn(buf[:-1].reshape(E, B * C, D)).reshape(E * B * C, D)
  y_ND = jnp.concatenate([y_ND, jnp.zeros((1, D), y_ND.dtype)], axis=0)
  gate_BLk = (weights_BLk * keep_BLk).astype(jnp.float32)
  y = jnp.einsum("blkd,blk->bld", y_ND[slot_BLk].astype(jnp.float32), gate_BLk)
  dropped = jnp.sum(onehot_BkLE) - jnp.sum(keep_BLk)
  return y.astype(x_BLD.dtype), dropped


class MoE(nnx.Module):

  def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
    if cfg.impl not in ("einsum", *GROUPED_MATMULS):
      raise ValueError(f"model.moe_impl={cfg.impl!r}: use 'einsum', 'ragged' or 'pallas'")
    self.cfg = cfg
    D, F, E, pd = cfg.d_model, cfg.hidden, cfg.num_experts, DTYPES[cfg.param_dtype]
    # The router stays float32: top-k on bf16 logits flips near-ties between steps.
    self.router = param(rngs, fan_in_init(D), (D, E), ("embed", None), jnp.float32)
    self.w_gate = param(rngs, fan_in_init(D), (E, D, F), ("expert", "embed", "expert_mlp"), pd)
    self.w_up = param(rngs, fan_in_init(D), (E, D, F), ("expert", "embed", "expert_mlp"), pd)
    self.w_down = param(rngs, fan_in_init(F), (E, F, D), ("expert", "expert_mlp", "embed"), pd)
    self.shared = (DenseFFN(FFNConfig(D, cfg.shared_hidden, cfg.dtype, cfg.param_dtype),
                            rngs=rngs) if cfg.shared_hidden else None)

  def route(self, x_BLD):
    logits = jnp.einsum("bld,de->ble", x_BLD.astype(jnp.float32), self.router[...])
    w, ids, probs = routing.top_k_routing(logits.reshape(-1, logits.shape[-1]),
                                          self.cfg.top_k)
    B, L = x_BLD.shape[:2]
    return logits, w.reshape(B, L, -1), ids.reshape(B, L, -1), probs

  def expert_weights(self):
    dt = DTYPES[self.cfg.dtype]
    return tuple(w[...].astype(dt) for w in (self.w_gate, self.w_up, self.w_down))

  def __call__(self, x_BLD, valid_BL):
    cfg = self.cfg
    B, L, D = x_BLD.shape
    x = x_BLD.astype(DTYPES[cfg.dtype])
    logits_BLE, weights_BLk, ids_BLk, probs_TE = self.route(x)
    valid_T = valid_BL.reshape(-1)
    aux = {"balance": balance_loss(probs_TE, ids_BLk.reshape(B * L, -1), valid_T),
           "z": z_loss(logits_BLE.reshape(B * L, -1), valid_T)}
    wg, wu, wd = self.expert_weights()
    if cfg.impl == "einsum":
      def experts(x_ENd):
        h = jax.nn.silu(jnp.einsum("end,edf->enf", x_ENd, wg)) * jnp.einsum(
            "end,edf->enf", x_ENd, wu)
        return jnp.einsum("enf,efd->end", h, wd)
      y, dropped = einsum_dispatch(x, weights_BLk, ids_BLk, valid_BL, experts, cfg)
      aux["dropped_fraction"] = dropped / jnp.maximum(jnp.sum(valid_T) * cfg.top_k, 1)
    else:
      ids_Tk = ids_BLk.reshape(B * L, -1)
      if moe_parallel.expert_parallel_size() > 1:
        # Experts sharded over the mesh's 'expert' axis: all-to-all token dispatch.
        y = moe_parallel.expert_parallel_moe(
            x.reshape(B * L, D), weights_BLk.reshape(B * L, -1), ids_Tk, wg, wu, wd,
            matmul=cfg.impl).reshape(B, L, D)
      else:
        order_A, sizes_E, inverse_A = routing.sort_by_expert(ids_Tk, cfg.num_experts)
        x_AD = routing.permute(x.reshape(B * L, D), order_A, cfg.top_k)
        y_AD = swiglu_experts_grouped(x_AD, wg, wu, wd, sizes_E, GROUPED_MATMULS[cfg.impl])
        y = routing.combine(y_AD, inverse_A, weights_BLk.reshape(B * L, -1)).reshape(B, L, D)
    if self.shared is not None:
      y = y + self.shared(x)[0]
    return y, aux
