"""The streaming KV cache: a ring of W chunk-sized slots behind the prefix block.

Every key the micro-turn mask opens to a query of chunk t lies in chunks (t-W, t] or in the
prefix (docs/design.md §4), so W chunk slots plus the prefix hold all of them: chunk t
overwrites the slot of chunk t-W, which no later query may see. The cache carries each
key's `TokenMeta`, so attention applies the very mask the training row uses.

Shapes: Ly layers, M = P + W*K cache rows, K chunk length, Hk kv heads, Dh head width,
D model width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tml_jax.microturn import TokenMeta


class KVCache(NamedTuple):
  k: tuple             # Ly x [1, M, Hk, Dh] (one buffer per layer: written in place)
  v: tuple             # Ly x [1, M, Hk, Dh]
  hidden: jnp.ndarray  # [1, M, D] final-norm hidden states (the background model's context)
  meta: TokenMeta      # [1, M] each; valid=False until a row is written


def cache_len(cfg) -> int:
  return cfg.layout.prefix + cfg.window * cfg.layout.chunk_len


def ring_row(cfg, t):
  """First cache row of chunk t."""
  return cfg.layout.prefix + (t % cfg.window) * cfg.layout.chunk_len


def init_cache(cfg) -> KVCache:
  """An empty cache for a `ModelConfig` with a bounded window."""
  if cfg.window is None:
    raise ValueError("layout.window=None: the streaming engine needs a bounded attention "
                     "window to keep memory constant. Fix: train and serve with a finite "
                     "layout.window (25 chunks = 5 s by default).")
  a, M, dt = cfg.attention, cache_len(cfg), jnp.dtype(cfg.dtype)
  # Separate buffers per field and layer: the step donates the cache, and XLA refuses to
  # donate one buffer twice.
  kv = lambda: tuple(jnp.zeros((1, M, a.num_kv_heads, a.head_dim), dt)
                     for _ in range(cfg.num_layers))
  zeros = lambda: jnp.zeros((1, M), jnp.int32)
  # chunk=-W-1 keeps never-written rows outside every window even if `valid` were ignored.
  meta = TokenMeta(chunk=zeros() - cfg.window - 1, segment=zeros(), slot=zeros(), doc=zeros(),
                   valid=jnp.zeros((1, M), bool))
  return KVCache(kv(), kv(), jnp.zeros((1, M, cfg.d_model), dt), meta)


def write_meta(cache: KVCache, meta: TokenMeta, at) -> KVCache:
  """The cache with rows [at, at + N) of its metadata replaced by `meta` [1, N]."""
  return cache._replace(meta=TokenMeta(*(
      jax.lax.dynamic_update_slice(c, m.astype(c.dtype), (0, at))
      for c, m in zip(cache.meta, meta))))
