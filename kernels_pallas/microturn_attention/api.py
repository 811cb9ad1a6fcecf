"""Dispatch of micro-turn attention: backend choice, padding, schedules, the custom_vjp.

Backends: Triton on GPU, Mosaic on TPU (scalar-prefetched schedule), and interpret mode,
which is also what a CPU backend runs when `interpret=False` (so the model's "pallas"
attention backend works in CPU CI). Both public functions are jitted with `window`,
`block_sizes` and `interpret` static.

Shape legend: B batch, T query length, S key length, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kernels_pallas.microturn_attention import mosaic, tiles, triton
from kernels_pallas.microturn_attention.reference import check_inputs
from kernels_pallas.platform import target_platform
from kernels_pallas.microturn_attention.schedule import (BlockSizes, block_flags,
                                                         bounded_schedule, encode_k, encode_q,
                                                         pad_meta, pow2)
from tml_jax.microturn import TokenMeta


def select_backend(interpret: bool) -> str:
  """"triton" | "mosaic" | "interpret" for this platform (tests patch this function)."""
  if interpret:
    return "interpret"
  platform = target_platform()
  if platform == "gpu":
    return "triton"
  if platform == "tpu":
    return "mosaic"
  # CPU has no compiled Pallas backend: run the same kernels in interpret mode, so the
  # model's "pallas" attention backend works (slowly) in CPU CI.
  return "interpret"


def _is_mosaic(cfg: tiles.Config) -> bool:
  return cfg.backend in ("mosaic", "mosaic_interpret")


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _prepare(q, k, v, q_meta, kv_meta, window, block_sizes, interpret):
  check_inputs(q, k, v, q_meta, kv_meta)
  bs = block_sizes or BlockSizes()
  backend = select_backend(interpret)
  T, S = q.shape[1], k.shape[1]
  minimum = 128 if backend.startswith("mosaic") else 16  # Mosaic lanes / Triton tl.dot minimum
  fit = lambda blk, n: min(blk, max(pow2(n), minimum))
  qb_bwd, kb_bwd = bs.bwd
  cfg = tiles.Config(window, fit(bs.block_q, T), fit(bs.block_k, S), fit(qb_bwd, T),
                     fit(kb_bwd, S), backend, bs.num_warps, bs.num_stages)
  blocks = (cfg.block_q, cfg.block_k, cfg.block_q_bwd, cfg.block_k_bwd)
  if backend.startswith("mosaic") and any(b % 128 for b in blocks):
    raise ValueError(f"TPU block sizes must be multiples of 128 (lanes); got {bs}. Fix: "
                     f"pass BlockSizes with block_q/block_k (and the bwd tiles) = 128, 256, ...")
  if backend == "triton" and any(b < 16 or b & (b - 1) for b in blocks):
    raise ValueError(f"GPU (Triton) block sizes must be powers of two >= 16; got {bs}. Fix: "
                     f"pass BlockSizes with tiles such as 32, 64 or 128")
  tq = _round_up(T, math.lcm(cfg.block_q, cfg.block_q_bwd))
  tk = _round_up(S, math.lcm(cfg.block_k, cfg.block_k_bwd))
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  q_meta, kv_meta = pad_meta(q_meta, tq), pad_meta(kv_meta, tk)
  return cfg, pad(q, tq), pad(k, tk), pad(v, tk), q_meta, kv_meta


def _schedule(block_flag: jax.Array, cfg: tiles.Config, bound: int | None):
  return bounded_schedule(block_flag, bound, pow2_width=not _is_mosaic(cfg))


def _forward(cfg: tiles.Config, q, k, v, q_tok, k_tok, sched):
  return (mosaic if _is_mosaic(cfg) else triton).forward(cfg, q, k, v, q_tok, k_tok, sched)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, q_tok, k_tok, fwd_sched, dq_sched, dkv_sched):
  del dq_sched, dkv_sched
  return _forward(cfg, q, k, v, q_tok, k_tok, fwd_sched)[0]


def _attention_fwd(cfg, q, k, v, q_tok, k_tok, fwd_sched, dq_sched, dkv_sched):
  o, lse = _forward(cfg, q, k, v, q_tok, k_tok, fwd_sched)
  return o, (q, k, v, q_tok, k_tok, dq_sched, dkv_sched, o, lse)


def _attention_bwd(cfg, res, do):
  q, k, v, q_tok, k_tok, dq_sched, dkv_sched, o, lse = res
  delta_BHT = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  backend = mosaic if _is_mosaic(cfg) else triton
  dq, dk, dv = backend.backward(cfg, q, k, v, q_tok, k_tok, dq_sched, dkv_sched, lse,
                                delta_BHT, do)
  return dq, dk, dv, None, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnames=("window", "block_sizes", "interpret"))
def microturn_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_meta: TokenMeta,
                        kv_meta: TokenMeta, *, window: int | None,
                        block_sizes: BlockSizes | None = None,
                        interpret: bool = False) -> jax.Array:
  """Softmax attention under the micro-turn mask; differentiable in q, k, v.

  Args:
    q: `[B, T, H, D]` queries (already RoPE-rotated), float32 or bfloat16.
    k, v: `[B, S, K, D]` keys and values, H % K == 0 (GQA / MQA when K < H).
    q_meta, kv_meta: `TokenMeta` of the queries / keys, fields `[B, T]` / `[B, S]`.
    window: sliding window in chunks (docs/design.md §4 rule 1), None for unbounded (static).
    block_sizes: tiles; lengths are padded with invalid tokens to a multiple of them.
    interpret: run the Pallas kernels in interpret mode. On a CPU backend this is implied.

  Returns:
    `[B, T, H, D]` in q's dtype; rows with no visible key are zero.
  """
  cfg, q_p, k_p, v_p, q_meta, kv_meta = _prepare(q, k, v, q_meta, kv_meta, window,
                                                 block_sizes, interpret)
  bs = block_sizes or BlockSizes()
  fwd_flags = block_flags(q_meta, kv_meta, window, cfg.block_q, cfg.block_k)
  if (cfg.block_q_bwd, cfg.block_k_bwd) == (cfg.block_q, cfg.block_k):
    bwd_flags = fwd_flags
  else:
    bwd_flags = block_flags(q_meta, kv_meta, window, cfg.block_q_bwd, cfg.block_k_bwd)
  bwd_flags_t = jnp.swapaxes(bwd_flags, 1, 2)
  (fwd, fwd_over), (dq_sched, dq_over), (dkv_sched, dkv_over) = (
      _schedule(f, cfg, bound) for f, bound in ((fwd_flags, bs.max_kv_blocks),
                                                (bwd_flags, bs.max_kv_blocks),
                                                (bwd_flags_t, bs.max_q_blocks)))
  o = _attention(cfg, q_p, k_p, v_p, encode_q(q_meta), encode_k(kv_meta), fwd, dq_sched,
                 dkv_sched)
  if bs.max_kv_blocks is not None or bs.max_q_blocks is not None:
    # Poison (NaN) rather than silently drop blocks when a bound was too small.
    o = jnp.where(fwd_over | dq_over | dkv_over, jnp.nan, o).astype(o.dtype)
  return o[:, :q.shape[1]]


@functools.partial(jax.jit, static_argnames=("window", "block_sizes", "interpret"))
def microturn_attention_decode(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                               q_meta: TokenMeta, cache_meta: TokenMeta, *,
                               window: int | None, block_sizes: BlockSizes | None = None,
                               interpret: bool = False) -> jax.Array:
  """Forward-only attention of one chunk of queries against a KV cache (streaming engine).

  The cache is a ring buffer: its chunks may be in any order and slots may be invalid; the
  block schedule is sound for any metadata order, only less tight than for sorted rows.
  The cache must already hold the current chunk's keys (a chunk attends to itself).
  Shapes as in `microturn_attention` with T = tokens of one chunk and S = cache slots.
  """
  cfg, q_p, k_p, v_p, q_meta, cache_meta = _prepare(q, k_cache, v_cache, q_meta, cache_meta,
                                                    window, block_sizes, interpret)
  bound = (block_sizes or BlockSizes()).max_kv_blocks
  flags = block_flags(q_meta, cache_meta, window, cfg.block_q, cfg.block_k)
  sched, overflow = _schedule(flags, cfg, bound)
  o, _ = _forward(cfg, q_p, k_p, v_p, encode_q(q_meta), encode_k(cache_meta), sched)
  if bound is not None:
    o = jnp.where(overflow, jnp.nan, o).astype(o.dtype)
  return o[:, :q.shape[1]]
