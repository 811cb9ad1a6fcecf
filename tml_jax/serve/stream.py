"""Incremental decoding of the InteractionModel: a ring KV cache and one jitted chunk step.

The training forward pass sees a whole row of chunks at once; serving sees one chunk at a time.
Both must compute the same function (tests/test_engine.py checks it), which holds because:
  * every key the micro-turn mask opens to a query of chunk t lies in chunks (t-W, t] or the
    prefix (DESIGN §4), so a ring of W chunk-sized slots plus the prefix block holds all of
    them; chunk t overwrites the slot of chunk t-W, which no later query may see;
  * RoPE positions are the training row's flat index, prefix + t*chunk_len + slot (RoPE only
    sees differences, so the absolute offset of a training crop does not matter);
  * the cache carries each key's TokenMeta, so `dense_attention` applies the very same mask;
  * MoE routing is per token only for the dropless implementations ('ragged', 'pallas'):
    'einsum' with a capacity drops tokens depending on the whole row, which one chunk cannot
    reproduce. `serving_config` therefore swaps 'einsum' for 'pallas' (same parameters; its
    grouped matmul also runs on a CPU, ~3x faster than 'ragged' there for the tiny model).

Order inside a chunk step: the observations (prefill, one pass), then the MODEL_TEXT slots
one at a time (slot 0 reads BOS, slot j the token predicted at j-1), then the MODEL_AUDIO
queries in one pass and the flow head's Euler steps. All of it is one jitted function with
fixed shapes, so a micro-turn is one dispatch.

Shapes: Ly layers, M = P + W*K cache length, K chunk length, Hk kv heads, Dh head width,
D model width, To text slots, A audio queries, V vocabulary, F dMel frames per chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tml_jax.microturn import CHUNK_SEGMENTS, Segment, TokenMeta
from tml_jax.model.attention import dense_attention
from tml_jax.model.flow import denormalize_mel
from tml_jax.model.transformer import InteractionModel, ModelConfig
from tml_jax.text import tokenizer as tok


class KVCache(NamedTuple):
  k: jnp.ndarray        # [Ly, 1, M, Hk, Dh]
  v: jnp.ndarray        # [Ly, 1, M, Hk, Dh]
  hidden: jnp.ndarray   # [1, M, D] final-norm hidden states (the background model's context)
  meta: TokenMeta       # [1, M] each; valid=False until a slot is written


def cache_len(cfg: ModelConfig) -> int:
  return cfg.layout.prefix + cfg.window * cfg.layout.chunk_len


def init_cache(cfg: ModelConfig) -> KVCache:
  if cfg.window is None:
    raise ValueError("layout.window=None: the streaming engine needs a bounded attention "
                     "window to keep memory constant. Fix: train and serve with a finite "
                     "layout.window (25 chunks = 5 s by default).")
  a, M, dt = cfg.attention, cache_len(cfg), jnp.dtype(cfg.dtype)
  # Separate buffers per field: the step donates the cache, and XLA refuses to donate one
  # buffer twice.
  kv = lambda: jnp.zeros((cfg.num_layers, 1, M, a.num_kv_heads, a.head_dim), dt)
  zeros = lambda: jnp.zeros((1, M), jnp.int32)
  # chunk=-W-1 keeps never-written slots outside every window even if `valid` were ignored.
  meta = TokenMeta(chunk=zeros() - cfg.window - 1, segment=zeros(), slot=zeros(), doc=zeros(),
                   valid=jnp.zeros((1, M), bool))
  return KVCache(kv(), kv(), jnp.zeros((1, M, cfg.d_model), dt), meta)


def serving_config(config):
  """A copy of the training config with the dropless MoE (see the module docstring)."""
  config = config.copy_and_resolve_references()
  if config.model.moe_impl == "einsum":
    config.model.moe_impl = "pallas"
  return config


def _chunk_meta(cfg: ModelConfig, t, video_valid) -> TokenMeta:
  lay = cfg.layout
  seg_K = np.concatenate([np.full(lay.slots(s), int(s), np.int32) for s in CHUNK_SEGMENTS])
  K = lay.chunk_len
  valid = jnp.where(jnp.asarray(seg_K == int(Segment.VIDEO)), video_valid, True)
  return TokenMeta(chunk=jnp.full((1, K), t, jnp.int32), segment=jnp.asarray(seg_K)[None],
                   slot=jnp.arange(K, dtype=jnp.int32)[None], doc=jnp.zeros((1, K), jnp.int32),
                   valid=valid[None])


def _write_meta(cache_meta: TokenMeta, meta: TokenMeta, at) -> TokenMeta:
  return TokenMeta(*(jax.lax.dynamic_update_slice(c, m.astype(c.dtype), (0, at))
                     for c, m in zip(cache_meta, meta)))


def forward_tokens(model: InteractionModel, cache: KVCache, x_BND, positions_BN,
                   q_meta: TokenMeta, write_at):
  """Runs N new tokens through every layer, writing their keys/values (and final hidden
  states) into the cache at [write_at, write_at + N). The cache meta must already hold them."""
  k_all, v_all = cache.k, cache.v
  x = x_BND
  for i, block in enumerate(model.blocks):
    h = block.attn_norm(x)
    q, k, v = block.attn.project_qkv(h, positions_BN)
    at = (i, 0, write_at, 0, 0)
    k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
    v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
    o = dense_attention(q, k_all[i], v_all[i], q_meta, cache.meta, window=model.cfg.window)
    x = x + block.attn.output(o)
    y, _ = block.ffn(block.ffn_norm(x), q_meta.valid)
    x = x + y
  h = model.final_norm(x)
  hidden = jax.lax.dynamic_update_slice(cache.hidden, h.astype(cache.hidden.dtype),
                                        (0, write_at, 0))
  return KVCache(k_all, v_all, hidden, cache.meta), h


def _sample(logits_V, rng, temperature):
  greedy = jnp.argmax(logits_V, -1).astype(jnp.int32)
  sampled = jax.random.categorical(rng, logits_V / jnp.maximum(temperature, 1e-6)).astype(
      jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def chunk_step(model: InteractionModel, cache: KVCache, obs: dict, t, forced_T, rng,
               temperature, *, flow_steps: int, with_prefix: bool):
  """One micro-turn. obs: user_dmel/self_dmel [1, 1, F, 80], video [1, 1, Pv, 4800],
  video_valid bool [], text_in [1, 1, Ti] (+ prefix [1, P] when with_prefix).
  forced_T: int32 [To], the input token of each text slot, or -1 to feed the model's own
  previous prediction (slot 0 reads BOS unless forced). Returns (cache, outputs)."""
  cfg, lay = model.cfg, model.cfg.layout
  K, P, W = lay.chunk_len, lay.prefix, cfg.window
  base = P + (t % W) * K            # ring slot of chunk t
  pos0 = P + t * K                  # flat training position of the chunk's first token
  meta_K = _chunk_meta(cfg, t, obs["video_valid"])
  cache = cache._replace(meta=_write_meta(cache.meta, meta_K, base))

  batch = dict(obs, model_text_in=jnp.full((1, 1, lay.model_text), tok.BOS, jnp.int32))
  emb = model.embed_chunks(batch)
  n_obs = lay.offset(Segment.MODEL_TEXT)
  x = jnp.concatenate([emb[s][:, 0] for s in CHUNK_SEGMENTS[:4] if lay.slots(s)], axis=1)
  positions = pos0 + jnp.arange(n_obs, dtype=jnp.int32)[None]
  q_meta, write_at = meta_K.slice(0, n_obs), base
  if with_prefix:  # chunk 0 only: prefix tokens see chunk 0's observations (mask rule 2)
    pre_meta = TokenMeta(chunk=jnp.zeros((1, P), jnp.int32),
                         segment=jnp.full((1, P), int(Segment.PREFIX), jnp.int32),
                         slot=jnp.arange(P, dtype=jnp.int32)[None],
                         doc=jnp.zeros((1, P), jnp.int32), valid=jnp.ones((1, P), bool))
    cache = cache._replace(meta=_write_meta(cache.meta, pre_meta, 0))
    x = jnp.concatenate([emb[Segment.PREFIX], x], axis=1)
    positions = jnp.concatenate([jnp.arange(P, dtype=jnp.int32)[None], positions], axis=1)
    q_meta, write_at = pre_meta.concat(q_meta), 0
  cache, _ = forward_tokens(model, cache, x, positions, q_meta, write_at)

  # Text slots, autoregressive. After EOT the training inputs are EOT then PAD (pipeline
  # FIFO), so a free-running decode feeds the same and reports PAD for the remaining slots.
  seg = model.embed.segment[...]
  table = model.embed.text[...]
  off_T = lay.offset(Segment.MODEL_TEXT)
  To, V = lay.model_text, cfg.vocab_size
  rngs = jax.random.split(rng, To + 1)

  def text_slot(j, carry):
    cache, prev, done, tokens, logits = carry
    inp = jnp.where(j == 0, tok.BOS, prev)
    inp = jnp.where(forced_T[j] >= 0, forced_T[j], inp)
    x = (jnp.take(table, inp, axis=0) + seg[int(Segment.MODEL_TEXT)]).astype(
        cache.hidden.dtype)[None, None]
    slot = off_T + j
    cache, h = forward_tokens(model, cache, x, jnp.reshape(pos0 + slot, (1, 1)),
                              meta_K.slice(0, 1)._replace(
                                  segment=jnp.full((1, 1), int(Segment.MODEL_TEXT), jnp.int32),
                                  slot=jnp.reshape(slot, (1, 1)).astype(jnp.int32),
                                  valid=jnp.ones((1, 1), bool)),
                              base + slot)
    lg = model.text_logits(h)[0, 0]
    pred = jnp.where(done, tok.PAD, _sample(lg, rngs[j], temperature))
    done = done | (pred == tok.EOT)
    return (cache, pred, done, tokens.at[j].set(pred), logits.at[j].set(lg))

  init = (cache, jnp.int32(tok.BOS), jnp.bool_(False), jnp.full((To,), tok.PAD, jnp.int32),
          jnp.zeros((To, V), jnp.float32))
  cache, _, _, tokens, logits = jax.lax.fori_loop(0, To, text_slot, init)

  A, off_A = lay.model_audio, lay.offset(Segment.MODEL_AUDIO)
  q = (model.embed.audio_query[...] + seg[None, int(Segment.MODEL_AUDIO)]).astype(
      cache.hidden.dtype)
  cache, audio_cond = forward_tokens(model, cache, q[None],
                                     pos0 + off_A + jnp.arange(A, dtype=jnp.int32)[None],
                                     meta_K.slice(off_A, off_A + A), base + off_A)
  x = model.flow.sample(audio_cond[0], rngs[-1], flow_steps)       # [A, fpq*80]
  mel_FM = denormalize_mel(x).reshape(-1, cfg.n_mels)
  return cache, dict(tokens=tokens, logits=logits, audio_cond=audio_cond[0], mel=mel_FM)


class StreamingModel:
  """The model side of the engine: parameters, the cache and the jitted step."""

  def __init__(self, model: InteractionModel, *, flow_steps: int):
    self.cfg = model.cfg
    if model.cfg.ffn == "moe" and model.cfg.moe.impl == "einsum":
      raise ValueError("model.moe_impl='einsum' drops tokens per row, which incremental "
                       "decoding cannot reproduce. Fix: build the model from "
                       "serve.stream.serving_config(config) (dropless 'pallas').")
    self.graphdef, state = nnx.split(model)
    # Restored checkpoints carry the trainer's mesh shardings; the step's outputs would then
    # differ in sharding from a fresh cache and force a second compile mid-conversation.
    self.state = jax.device_put(state, jax.devices()[0])
    self.flow_steps = flow_steps
    self._step = jax.jit(self._pure_step, static_argnames=("with_prefix",), donate_argnums=(1,))
    self.reset()

  def _pure_step(self, state, cache, obs, t, forced_T, rng, temperature, *, with_prefix):
    model = nnx.merge(self.graphdef, state)
    return chunk_step(model, cache, obs, t, forced_T, rng, temperature,
                      flow_steps=self.flow_steps, with_prefix=with_prefix)

  def reset(self):
    self.cache = init_cache(self.cfg)
    self.t = 0

  def step(self, obs: dict, *, forced_T=None, rng=None, temperature: float = 0.0) -> dict:
    lay = self.cfg.layout
    forced_T = np.full((lay.model_text,), -1, np.int32) if forced_T is None else np.asarray(
        forced_T, np.int32)
    rng = jax.random.key(self.t) if rng is None else rng
    with_prefix = bool(lay.prefix) and self.t == 0
    if lay.prefix and "prefix" not in obs:  # embed_chunks wants it; only chunk 0 reads it
      obs = dict(obs, prefix=np.full((1, lay.prefix), tok.PAD, np.int32))
    self.cache, out = self._step(self.state, self.cache, obs, jnp.int32(self.t),
                                 jnp.asarray(forced_T), rng, jnp.float32(temperature),
                                 with_prefix=with_prefix)
    self.t += 1
    return out

  def context(self):
    """(hidden [1, M, D], meta) of the visible context after the last chunk (for the
    background model). Copies, so the next step's donation does not invalidate them."""
    return jnp.copy(self.cache.hidden), TokenMeta(*(jnp.copy(f) for f in self.cache.meta))

  def cache_nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self.cache))
