"""The SwiGLU feed-forward: one function, used dense and as a group of experts.

`swiglu` computes (silu(x W_gate) * (x W_up)) W_down with whatever product it is given:
  a plain matmul        `DenseFFN` (the dense model's FFN and the MoE's shared expert)
  a batched matmul      the capacity dispatch's [E, N, D] expert buffer (moe.py)
  a grouped matmul      expert-sorted rows of the dropless MoE, on one device (moe.py) or
                        expert-parallel (moe_parallel.py): `grouped_swiglu`
The expert weights (`expert_params`) are created here too, so both MoE files share them.

Shapes: D model width, F hidden, E experts, N rows per expert, A expert-sorted rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas.gmm import gmm
from tml_jax.model.layers import DTYPES, fan_in_init, param


def swiglu(x, w_gate, w_up, w_down, matmul=jnp.matmul):
  """SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"); `matmul(rows, weights)`."""
  h = jax.nn.silu(matmul(x, w_gate)) * matmul(x, w_up)
  return matmul(h.astype(x.dtype), w_down)


@dataclasses.dataclass(frozen=True)
class FFNConfig:
  d_model: int
  hidden: int
  dtype: str = "float32"
  param_dtype: str = "float32"


class DenseFFN(nnx.Module):
  """A dense SwiGLU FFN; returns (y, {}) like the MoE (which returns its aux losses)."""

  def __init__(self, cfg: FFNConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, F, pd = cfg.d_model, cfg.hidden, DTYPES[cfg.param_dtype]
    self.w_gate = param(rngs, fan_in_init(D), (D, F), ("embed", "mlp"), pd)
    self.w_up = param(rngs, fan_in_init(D), (D, F), ("embed", "mlp"), pd)
    self.w_down = param(rngs, fan_in_init(F), (F, D), ("mlp", "embed"), pd)

  def __call__(self, x_BLD, valid_BL=None):
    del valid_BL
    dt = DTYPES[self.cfg.dtype]
    w = lambda p: p[...].astype(dt)
    return swiglu(x_BLD.astype(dt), w(self.w_gate), w(self.w_up), w(self.w_down)), {}


def expert_params(rngs: nnx.Rngs, d_model: int, hidden: int, num_experts: int, param_dtype):
  """(w_gate `[E, D, F]`, w_up `[E, D, F]`, w_down `[E, F, D]`), E sharded over 'expert'."""
  D, F, E = d_model, hidden, num_experts
  return (param(rngs, fan_in_init(D), (E, D, F), ("expert", "embed", "expert_mlp"), param_dtype),
          param(rngs, fan_in_init(D), (E, D, F), ("expert", "embed", "expert_mlp"), param_dtype),
          param(rngs, fan_in_init(F), (E, F, D), ("expert", "expert_mlp", "embed"), param_dtype))


def grouped_matmul(lhs_AD, rhs_EDF, group_sizes_E):
  """The dropless MoE's grouped matmul: `kernels_pallas.gmm` with the platform's backend.

  GPU: the Triton kernel. TPU: the Mosaic kernel. CPU: gmm's XLA tile scan (exact flops;
  XLA:CPU runs `lax.ragged_dot` as E masked dense products, ~7x slower for the tiny config,
  and Pallas interpret mode is for testing kernels): benchmarks/moe.py.
  """
  return gmm(lhs_AD, rhs_EDF, group_sizes_E)


def grouped_swiglu(x_AD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, matmul=None):
  """The expert FFN on expert-sorted rows (group i = rows of expert i).

  matmul: a grouped matmul `(lhs [A, D], rhs [E, D, F], group_sizes [E]) -> [A, F]`;
  None: `grouped_matmul` (looked up at call time, so tests can swap it).
  """
  mm = matmul or grouped_matmul
  return swiglu(x_AD, w_gate_EDF, w_up_EDF, w_down_EFD, lambda a, w: mm(a, w, group_sizes_E))
