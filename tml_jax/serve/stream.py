"""The model side of the engine: parameters, the ring KV cache and one jitted micro-turn.

`InteractionModel.step` (tml_jax/model/transformer.py) is the micro-turn itself, the same
blocks and attention backends as training; this file holds only what serving adds around
it: the jit with the cache donated, the conversation clock `t`, and host-side defaults.

MoE routing is per token only for the dropless implementation ("grouped"): "capacity" drops
tokens depending on the whole row, which one chunk cannot reproduce, so `serving_config`
swaps it for "grouped" (same parameters).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tml_jax.microturn import TokenMeta
from tml_jax.model.cache import KVCache, cache_len, init_cache
from tml_jax.model.moe import resolve_impl
from tml_jax.model.transformer import InteractionModel
from tml_jax.text import tokenizer as tok

__all__ = ["KVCache", "StreamingModel", "cache_len", "init_cache", "serving_config"]


def serving_config(config):
  """A copy of the training config with the dropless MoE (see the module docstring)."""
  config = config.copy_and_resolve_references()
  if resolve_impl(config.model.moe_impl) == "capacity":
    config.model.moe_impl = "grouped"
  return config


class StreamingModel:
  """Parameters, the cache and the jitted step; `step` advances the conversation one chunk."""

  def __init__(self, model: InteractionModel, *, flow_steps: int,
               speak_threshold: float = 0.5, delegate_threshold: float = 1.0):
    self.cfg = model.cfg
    # The background model's compact history (model.background.pool_chunk): one vector per
    # chunk for the last `history_chunks` chunks, a host-side ring of fixed size.
    bg = getattr(model, "background", None)
    self.history_chunks = bg.cfg.history_chunks if bg is not None else 0
    if model.cfg.ffn == "moe" and resolve_impl(model.cfg.moe.impl) == "capacity":
      raise ValueError(f"model.moe_impl={model.cfg.moe.impl!r} drops tokens per row, which "
                       "incremental decoding cannot reproduce. Fix: build the model from "
                       "serve.stream.serving_config(config) (dropless 'grouped').")
    self.graphdef, state = nnx.split(model)
    # Restored checkpoints carry the trainer's mesh shardings; the step's outputs would then
    # differ in sharding from a fresh cache and force a second compile mid-conversation.
    self.state = jax.device_put(state, jax.devices()[0])
    self.flow_steps, self.speak_threshold = flow_steps, float(speak_threshold)
    self.delegate_threshold = float(delegate_threshold)
    self._step = jax.jit(self._pure_step, static_argnames=("with_prefix",), donate_argnums=(1,))
    self.reset()

  def _pure_step(self, state, cache, obs, t, forced_T, rng, temperature, speak_threshold,
                 delegate_threshold, *, with_prefix):
    model = nnx.merge(self.graphdef, state)
    return model.step(cache, obs, t, forced_T, rng, temperature, flow_steps=self.flow_steps,
                      with_prefix=with_prefix, speak_threshold=speak_threshold,
                      delegate_threshold=delegate_threshold)

  def reset(self):
    self.cache = init_cache(self.cfg)
    self.t = 0
    H = self.history_chunks
    self.history = np.zeros((H, self.cfg.d_model), np.float32)
    self.history_chunk = np.full((H,), -1, np.int32)

  def fork(self) -> "StreamingModel":
    """Another conversation on the same parameters and compiled step, with its own cache
    and clock (a server's sessions): nothing is copied or compiled again."""
    other = copy.copy(self)
    other.reset()
    return other

  def step(self, obs: dict, *, forced_T=None, rng=None, temperature: float = 0.0,
           speak_threshold: float | None = None) -> dict:
    """One chunk. speak_threshold: this chunk's gate threshold (a traced argument, so a
    session may change it every chunk without a compile); default the model's own."""
    lay = self.cfg.layout
    forced_T = np.full((lay.model_text,), -1, np.int32) if forced_T is None else np.asarray(
        forced_T, np.int32)
    rng = jax.random.key(self.t) if rng is None else rng
    with_prefix = bool(lay.prefix) and self.t == 0
    if lay.prefix and "prefix" not in obs:  # embed_chunks wants it; only chunk 0 reads it
      obs = dict(obs, prefix=np.full((1, lay.prefix), tok.PAD, np.int32))
    self.cache, out = self._step(self.state, self.cache, obs, jnp.int32(self.t),
                                 jnp.asarray(forced_T), rng, jnp.float32(temperature),
                                 jnp.float32(self.speak_threshold if speak_threshold is None
                                             else speak_threshold),
                                 jnp.float32(self.delegate_threshold), with_prefix=with_prefix)
    if self.history_chunks:
      slot = self.t % self.history_chunks
      self.history[slot] = np.asarray(out["pooled"], np.float32)
      self.history_chunk[slot] = self.t
    self.t += 1
    return out

  def context(self):
    """(hidden [1, M, D], meta, history [1, H, D], history_chunk [1, H]) after the last
    chunk, for the background model: the visible context and the pooled history (H =
    history_chunks, possibly 0). Copies, so the next step's donation does not invalidate
    them."""
    return (jnp.copy(self.cache.hidden), TokenMeta(*(jnp.copy(f) for f in self.cache.meta)),
            jnp.asarray(self.history[None]), jnp.asarray(self.history_chunk[None]))

  def cache_nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self.cache))

  def history_nbytes(self) -> int:
    """Bytes of the pooled history (fixed: the ring holds `history_chunks` vectors)."""
    return self.history.nbytes + self.history_chunk.nbytes
