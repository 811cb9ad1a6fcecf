"""The top-k Mixture-of-Experts FFN and its two implementations (`model.moe_impl`).

  capacity  capacity-factor dispatch (GShard): every expert takes at most C tokens per row,
            C = capacity_factor * L * k / E; assignments over capacity are dropped.
  grouped   dropless: assignments sorted by expert, one grouped matmul per projection
            (`experts.grouped_matmul`: the Pallas gmm kernel on GPU and TPU, gmm's XLA tile
            scan on CPU); with a mesh 'expert' axis > 1, expert-parallel (moe_parallel.py).
The two agree exactly when nothing is dropped. `resolve_impl` maps the names used before
(still in old configs and checkpoints) to these.

Shapes: B batch, L length, T = B*L tokens, D model width, F expert hidden, E experts,
k experts per token, A = T*k assignments, C capacity per expert and row.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from tml_jax.model import moe_parallel, router
from tml_jax.model.experts import DenseFFN, FFNConfig, expert_params, grouped_swiglu, swiglu
from tml_jax.model.layers import DTYPES, fan_in_init, param
from tml_jax.model.router import balance_loss, z_loss

__all__ = ["MOE_IMPLS", "DenseFFN", "FFNConfig", "MoE", "MoEConfig", "balance_loss",
           "capacity_dispatch", "dropless_moe", "expert_capacity", "resolve_impl", "z_loss"]

MOE_IMPLS = ("capacity", "grouped")
_DEPRECATED_IMPLS = {"einsum": "capacity", "ragged": "grouped", "ragged_dot": "grouped",
                     "pallas": "grouped"}


def resolve_impl(name: str) -> str:
  """The canonical `model.moe_impl` for `name`: 'capacity' or 'grouped'.

  Deprecated: 'einsum' (-> 'capacity') and 'ragged', 'ragged_dot', 'pallas' (-> 'grouped'),
  accepted for configs and checkpoints written before the rename.
  """
  if name in MOE_IMPLS:
    return name
  if name in _DEPRECATED_IMPLS:
    return _DEPRECATED_IMPLS[name]
  raise ValueError(f"model.moe_impl={name!r} is not a MoE implementation. Fix: use "
                   "'capacity' (capacity-factor dispatch, drops tokens over capacity) or "
                   "'grouped' (dropless grouped matmul)")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  d_model: int
  hidden: int
  num_experts: int
  top_k: int
  shared_hidden: int = 0
  impl: str = "grouped"  # canonical after __post_init__ (see `resolve_impl`)
  capacity_factor: float = 1.25
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Expert-parallel dispatch in this many sequential token chunks per device (exact; each
  # chunk's exchange buffers are 1/n the size, at n times the collectives).
  token_chunks: int = 1

  def __post_init__(self):
    object.__setattr__(self, "impl", resolve_impl(self.impl))


def expert_capacity(tokens_per_row: int, cfg: MoEConfig) -> int:
  return max(1, math.ceil(cfg.capacity_factor * tokens_per_row * cfg.top_k / cfg.num_experts))


def capacity_dispatch(x_BLD, weights_BLk, ids_BLk, valid_BL, experts_fn, cfg: MoEConfig):
  """GShard-style capacity dispatch with one group per batch row; overflow is dropped.

  Priority inside an expert: first choices of all tokens, then second choices, ... (so a
  token's top-1 is kept before anyone's top-2), token order within a choice level. The
  expert FFN runs as one batched matmul over a dense [E, B*C, D] buffer. Tokens move in
  and out of the buffer by index (scatter/gather), not by GShard's one-hot [B, L, E, C]
  einsum: same result, but O(B*L*k*D) instead of O(B*L*E*C*D) work, which dominates on
  a CPU. Note: with capacity, whether a token is dropped depends on later tokens of its row.
  """
  B, L, D = x_BLD.shape
  E, k = cfg.num_experts, cfg.top_k
  C = expert_capacity(L, cfg)
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


def dropless_moe(x_TD, weights_Tk, ids_Tk, w_gate_EDF, w_up_EDF, w_down_EFD, *,
                 token_chunks: int = 1):
  """Σ_j weights[t, j] · expert_{ids[t, j]}(x[t]) by grouped matmuls, nothing dropped."""
  if moe_parallel.expert_parallel_size() > 1 or moe_parallel.kernel_needs_shard_map():
    # Experts sharded over the mesh's 'expert' axis: all-to-all token dispatch. (Also with
    # expert=1 on an accelerator mesh: the Pallas gmm cannot be partitioned by XLA.)
    return moe_parallel.expert_parallel_moe(x_TD, weights_Tk, ids_Tk, w_gate_EDF, w_up_EDF,
                                            w_down_EFD, token_chunks=token_chunks)
  order_A, sizes_E, inverse_A = router.sort_by_expert(ids_Tk, w_gate_EDF.shape[0])
  x_AD = router.permute(x_TD, order_A, ids_Tk.shape[1])
  y_AD = grouped_swiglu(x_AD, w_gate_EDF, w_up_EDF, w_down_EFD, sizes_E)
  return router.combine(y_AD, inverse_A, weights_Tk)


class MoE(nnx.Module):

  def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, E, pd = cfg.d_model, cfg.num_experts, DTYPES[cfg.param_dtype]
    # The router stays float32: top-k on bf16 logits flips near-ties between steps.
    self.router = param(rngs, fan_in_init(D), (D, E), ("embed", None), jnp.float32)
    self.w_gate, self.w_up, self.w_down = expert_params(rngs, D, cfg.hidden, E, pd)
    self.shared = (DenseFFN(FFNConfig(D, cfg.shared_hidden, cfg.dtype, cfg.param_dtype),
                            rngs=rngs) if cfg.shared_hidden else None)

  def route(self, x_BLD):
    """(logits_BLE, weights_BLk, ids_BLk, probs_TE); see `router.route`."""
    return router.route(x_BLD, self.router[...], self.cfg.top_k)

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
    if cfg.impl == "capacity":
      experts = lambda x_END: swiglu(x_END, wg, wu, wd)  # batched over E
      y, dropped = capacity_dispatch(x, weights_BLk, ids_BLk, valid_BL, experts, cfg)
      aux["dropped_fraction"] = dropped / jnp.maximum(jnp.sum(valid_T) * cfg.top_k, 1)
    else:
      y = dropless_moe(x.reshape(B * L, D), weights_BLk.reshape(B * L, -1),
                       ids_BLk.reshape(B * L, -1), wg, wu, wd,
                       token_chunks=cfg.token_chunks).reshape(B, L, D)
    if self.shared is not None:
      y = y + self.shared(x)[0]
    return y, aux
