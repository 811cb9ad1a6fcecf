"""Grouped-query attention under the micro-turn mask, with pluggable backends and an
optional KV cache (the same layer serves the training row and the streaming micro-turn).

Without a cache, a row attends to itself. With a `LayerCache`, the new tokens' keys and
values are written into the cache at `write_at` first, then the queries attend to the whole
cache under its metadata: the cache's `meta` must already describe the new tokens.

Shapes: B batch, L query length, M key length, H query heads, K kv heads, G = H / K,
D model width, Dh head width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kernels_pallas.platform import target_platform
from tml_jax.config import BATCH_AXES
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


HEAD_AXIS = "tensor"


def per_shard(kernel: Callable, q, k, v, q_meta, kv_meta, *, window, force: bool = False):
  """`kernel` on each device's examples and heads, under the active mesh (jax.set_mesh).

  Pallas kernels (Mosaic on TPU, Triton on GPU) are opaque custom calls that XLA cannot
  partition ("Mosaic kernels cannot be automatically partitioned"): on a mesh of more than
  one device they run inside a shard_map, batch over the batch axes that divide it and heads
  over 'tensor' when it divides both head counts. Attention is independent per example and
  per kv-head group, so no collective is needed. `force`: also on CPU (tests).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or (target_platform() == "cpu" and not force):
    # CPU runs the kernels in interpret mode: plain XLA ops, which XLA partitions itself.
    return kernel(q, k, v, q_meta, kv_meta, window=window)
  axes = dict(mesh.shape)
  B, H, K = q.shape[0], q.shape[2], k.shape[2]
  batch, shards = [], 1
  for a in BATCH_AXES:
    if a in axes and B % (shards * axes[a]) == 0:
      batch.append(a)
      shards *= axes[a]
  tp = axes.get(HEAD_AXIS, 1)
  heads = HEAD_AXIS if tp > 1 and H % tp == 0 and K % tp == 0 else None
  b = tuple(batch) or None
  qkv = P(b, None, heads, None)
  fn = lambda q, k, v, qm, km: kernel(q, k, v, qm, km, window=window)
  specs = (qkv, qkv, qkv, P(b, None), P(b, None))
  args = (q, k, v, q_meta, kv_meta)
  if jax.sharding.AxisType.Explicit in tuple(mesh.axis_types):
    # Under Explicit axes shard_map checks (not converts) input shardings: reshard first.
    args = tuple(jax.reshard(a, s) for a, s in zip(args, specs))
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv)(*args)


def _pallas_attention(q, k, v, q_meta, kv_meta, *, window):
  from kernels_pallas.microturn_attention import microturn_attention
  return per_shard(microturn_attention, q, k, v, q_meta, kv_meta, window=window)


def _pallas_decode(q, k, v, q_meta, kv_meta, *, window):
  # Forward-only entry for a ring cache (its chunks are in ring order, not sorted).
  from kernels_pallas.microturn_attention import microturn_attention_decode
  return per_shard(microturn_attention_decode, q, k, v, q_meta, kv_meta, window=window)


# backend -> (attention of a row over itself, attention of new tokens over a KV cache)
ATTENTION_BACKENDS: dict[str, tuple[Callable, Callable]] = {
    "reference": (dense_attention, dense_attention),
    "pallas": (_pallas_attention, _pallas_decode),
}


class LayerCache(NamedTuple):
  """One layer's view of the streaming KV cache."""
  k: jnp.ndarray        # [B, M, K, Dh]
  v: jnp.ndarray        # [B, M, K, Dh]
  meta: TokenMeta       # [B, M], already describing the tokens about to be written
  write_at: jnp.ndarray  # int32 [], first cache row of the new tokens


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  window: int | None = None      # attention window in chunks (mask rule 1)
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

  def __call__(self, x_BLD, meta: TokenMeta, positions_BL, cache: LayerCache | None = None):
    """Returns (output [B, L, D], the updated cache or None)."""
    q, k, v = self.project_qkv(x_BLD, positions_BL)
    row_attention, cache_attention = ATTENTION_BACKENDS[self.cfg.backend]
    if cache is None:
      return self.output(row_attention(q, k, v, meta, meta, window=self.cfg.window)), None
    at = (0, cache.write_at, 0, 0)
    k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at)
    v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at)
    o = cache_attention(q, k_all, v_all, meta, cache.meta, window=self.cfg.window)
    return self.output(o), cache._replace(k=k_all, v=v_all)
