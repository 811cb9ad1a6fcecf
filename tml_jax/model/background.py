"""BackgroundModel (docs/design.md §5): a small decoder that reads the interaction model's context.

When the interaction model emits DELEGATE in chunk t, the background model gets the final
hidden states of everything that chunk could see (chunks (t-W, t] and the prefix) and, for
the conversation before that window, a compact history: one vector per chunk, the mean final
hidden state of the chunk's observation tokens (`pool_history`, `microturn.pooled_tokens`),
for the last `history_chunks` chunks (the horizon, minutes). It writes

    TOOL name:args SEP  RESULT tool output SEP  answer EOT

where the `RESULT ... SEP` part is inserted by the tool runner (teacher-forced and never a
target in training). The answer enters the interaction sequence as TEXT_IN (`RESULT answer`,
the format of the corpus' background results) when it is really finished.

Each layer: causal self-attention over its own text (RoPE), cross-attention to the projected
context, SwiGLU. Every context entry gets learned embeddings of where it sits (`ContextPos`):
its age in chunks before the delegating chunk (the window's W ages, then one for the pooled
history), its segment and its slot inside the chunk. The interaction model's hidden states do
not carry their position (RoPE acts in attention only), so without them a call's args could
be read as a bag of bytes at best, never in order. The context is not
stop-gradiented, so the background loss also trains the interaction model's representations.
Its targets are built by tml_jax.data.background_targets, its loss lives in
tml_jax.train.losses.

Shapes: B batch, N delegations per row, T text length, L context length, D background width,
Dc interaction width, H heads, Dh head width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tml_jax.microturn import Segment, TokenMeta, context_mask, history_mask, pooled_tokens
from tml_jax.model.layers import DTYPES, RMSNorm, fan_in_init, param, rope
from tml_jax.model.moe import DenseFFN, FFNConfig
from tml_jax.text import tokenizer as tok


@dataclasses.dataclass(frozen=True)
class BackgroundConfig:
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  head_dim: int = 32
  hidden: int = 512
  max_len: int = 128
  context_dim: int = 256
  vocab_size: int = tok.VOCAB_SIZE
  param_dtype: str = "float32"
  history_chunks: int = 0  # horizon of the pooled history beyond the window; 0: none
  window: int = 64  # ages the context embeds (layout.window; older entries share the last)

  @classmethod
  def from_config(cls, config) -> "BackgroundConfig | None":
    b = config.get("background")
    if b is None or not b.get("enabled", False):
      return None
    return cls(d_model=b.d_model, num_layers=b.num_layers, num_heads=b.num_heads,
               head_dim=b.head_dim, hidden=b.hidden, max_len=b.max_len,
               context_dim=config.model.d_model, vocab_size=config.model.vocab_size,
               param_dtype=config.model.param_dtype,
               history_chunks=int(b.get("history_chunks", 0)),
               window=int(config.layout.window or 64))


def pool_chunk(h_BND, meta: TokenMeta):
  """`[B, D]` float32: the history vector of one chunk's tokens (the streaming engine's)."""
  w = pooled_tokens(meta).astype(jnp.float32)
  return (jnp.einsum("bn,bnd->bd", w, h_BND.astype(jnp.float32))
          / jnp.maximum(w.sum(-1), 1.0)[:, None])


def pool_history(h_BLD, meta: TokenMeta, num_chunks: int):
  """(`[B, C, D]` float32 history vectors of chunks 0..C-1 of a training row, `[B, C]` their
  chunk index or -1 where the chunk has no observation): `pool_chunk` of each chunk."""
  w = pooled_tokens(meta).astype(jnp.float32)
  chunks = jnp.arange(num_chunks)
  onehot_BLC = (jnp.asarray(meta.chunk)[..., None] == chunks[None, None]) * w[..., None]
  n_BC = onehot_BLC.sum(1)
  pooled = (jnp.einsum("blc,bld->bcd", onehot_BLC, h_BLD.astype(jnp.float32))
            / jnp.maximum(n_BC, 1.0)[..., None])
  return pooled, jnp.where(n_BC > 0, chunks[None], -1).astype(jnp.int32)


MAX_SLOT = 64  # slots inside a chunk the context tells apart (later ones share the last)
HISTORY_SEGMENT = len(Segment)  # the segment id of a pooled history vector


class ContextPos(NamedTuple):
  """Where each context entry sits, for the background model's position embeddings."""
  age: jnp.ndarray      # int32 [B, N, L]: chunks before the delegating chunk, clipped
  segment: jnp.ndarray  # int32 [B, L]: the token's Segment, HISTORY_SEGMENT for history
  slot: jnp.ndarray     # int32 [B, L]: its slot in the chunk, clipped to MAX_SLOT - 1


def read_context(cfg: BackgroundConfig, hidden_BLD, meta: TokenMeta, chunk_BN, window,
                 history_BHD, history_chunk_BH):
  """(context [B, L(+H), D], mask [B, N, L(+H)], positions `ContextPos`) that delegations
  made in chunks `chunk_BN` read, in training and in serving alike: the tokens' hidden
  states under `context_mask`, then (history_chunks > 0) the history vectors under
  `history_mask`. A history vector's age is the last bucket, `cfg.window`."""
  ctx, mask = hidden_BLD, context_mask(meta, chunk_BN, window)
  c = jnp.asarray(chunk_BN)[:, :, None]
  age = jnp.clip(c - jnp.asarray(meta.chunk)[:, None, :], 0, cfg.window - 1)
  seg = jnp.asarray(meta.segment).astype(jnp.int32)
  slot = jnp.clip(jnp.asarray(meta.slot), 0, MAX_SLOT - 1).astype(jnp.int32)
  if cfg.history_chunks > 0:
    ctx = jnp.concatenate([ctx.astype(jnp.float32), history_BHD.astype(jnp.float32)], axis=1)
    mask = jnp.concatenate(
        [mask, history_mask(chunk_BN, history_chunk_BH, window, cfg.history_chunks)], axis=-1)
    B, Hn = history_chunk_BH.shape
    age = jnp.concatenate([age, jnp.full((B, c.shape[1], Hn), cfg.window, age.dtype)], -1)
    seg = jnp.concatenate([seg, jnp.full((B, Hn), HISTORY_SEGMENT, jnp.int32)], -1)
    slot = jnp.concatenate([slot, jnp.zeros((B, Hn), jnp.int32)], -1)
  return ctx, mask, ContextPos(age.astype(jnp.int32), seg, slot)


def _attend(q_BNTHD, k_BNSHD, v_BNSHD, mask_BNTS):
  logits = jnp.einsum("bnthd,bnshd->bnhts", q_BNTHD, k_BNSHD) / jnp.sqrt(
      jnp.float32(q_BNTHD.shape[-1]))
  m = mask_BNTS[:, :, None]
  probs = jnp.where(m, jax.nn.softmax(jnp.where(m, logits, -1e30), axis=-1), 0.0)
  return jnp.einsum("bnhts,bnshd->bnthd", probs, v_BNSHD)


class BackgroundLayer(nnx.Module):

  def __init__(self, cfg: BackgroundConfig, *, rngs: nnx.Rngs):
    D, H, Dh, pd = cfg.d_model, cfg.num_heads, cfg.head_dim, DTYPES[cfg.param_dtype]
    proj = lambda: param(rngs, fan_in_init(D), (D, H, Dh), ("embed", "heads", "head_dim"), pd)
    out = lambda: param(rngs, fan_in_init(H * Dh), (H, Dh, D), ("heads", "head_dim", "embed"),
                        pd)
    self.self_norm = RMSNorm(D, param_dtype=pd, rngs=rngs)
    self.sq, self.sk, self.sv, self.so = proj(), proj(), proj(), out()
    self.cross_norm = RMSNorm(D, param_dtype=pd, rngs=rngs)
    self.cq, self.ck, self.cv, self.co = proj(), proj(), proj(), out()
    self.mlp_norm = RMSNorm(D, param_dtype=pd, rngs=rngs)
    # Named `mlp`, not `ffn`: count_params treats w_gate/w_up/w_down under `ffn` as experts.
    self.mlp = DenseFFN(FFNConfig(D, cfg.hidden, "float32", cfg.param_dtype), rngs=rngs)

  def context_kv(self, ctx_BNLD):
    f = lambda w: jnp.einsum("bnld,dhk->bnlhk", ctx_BNLD, w[...].astype(jnp.float32))
    return f(self.ck), f(self.cv)

  def __call__(self, x_BNTD, ctx_kv, ctx_mask_BNL, positions_T):
    B, N, T, D = x_BNTD.shape
    f32 = lambda w: w[...].astype(jnp.float32)
    h = self.self_norm(x_BNTD).reshape(B * N, T, D)
    pos = jnp.broadcast_to(positions_T[None], (B * N, T))
    q = rope(jnp.einsum("btd,dhk->bthk", h, f32(self.sq)), pos, 10_000.0)
    k = rope(jnp.einsum("btd,dhk->bthk", h, f32(self.sk)), pos, 10_000.0)
    v = jnp.einsum("btd,dhk->bthk", h, f32(self.sv))
    causal = jnp.tril(jnp.ones((T, T), bool))[None, None]
    split = lambda a: a.reshape(B, N, *a.shape[1:])
    o = _attend(split(q), split(k), split(v), jnp.broadcast_to(causal, (B, N, T, T)))
    x = x_BNTD + jnp.einsum("bnthk,hkd->bntd", o, f32(self.so))

    h = self.cross_norm(x)
    q = jnp.einsum("bntd,dhk->bnthk", h, f32(self.cq))
    k_BNLHK, v_BNLHK = ctx_kv
    L = k_BNLHK.shape[2]
    mask = jnp.broadcast_to(ctx_mask_BNL[:, :, None, :], (B, N, T, L))
    o = _attend(q, k_BNLHK, v_BNLHK, mask)
    x = x + jnp.einsum("bnthk,hkd->bntd", o, f32(self.co))
    y, _ = self.mlp(self.mlp_norm(x))
    return x + y


class BackgroundModel(nnx.Module):

  def __init__(self, cfg: BackgroundConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = DTYPES[cfg.param_dtype]
    self.ctx_norm = RMSNorm(cfg.context_dim, param_dtype=pd, rngs=rngs)
    self.ctx_proj = param(rngs, fan_in_init(cfg.context_dim), (cfg.context_dim, cfg.d_model),
                          (None, "embed"), pd)
    pos_init = jax.nn.initializers.normal(0.5)
    self.ctx_age = param(rngs, pos_init, (cfg.window + 1, cfg.d_model), (None, "embed"), pd)
    self.ctx_segment = param(rngs, pos_init, (HISTORY_SEGMENT + 1, cfg.d_model),
                             (None, "embed"), pd)
    self.ctx_slot = param(rngs, pos_init, (MAX_SLOT, cfg.d_model), (None, "embed"), pd)
    self.embed = param(rngs, jax.nn.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model),
                       ("vocab", "embed"), pd)
    self.layers = nnx.List([BackgroundLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, param_dtype=pd, rngs=rngs)
    self.unembed = param(rngs, fan_in_init(cfg.d_model), (cfg.d_model, cfg.vocab_size),
                         ("embed", "vocab"), pd)

  def encode_context(self, ctx_BLDc, pos: ContextPos):
    """Per-layer cross-attention keys/values [B, N, L, H, Dh] of the interaction model's
    hidden states, each placed by its position embeddings (per delegation: its age)."""
    f32 = lambda w: w[...].astype(jnp.float32)
    c = self.ctx_norm(ctx_BLDc.astype(jnp.float32)) @ f32(self.ctx_proj)
    c = c + jnp.take(f32(self.ctx_segment), pos.segment, axis=0) + jnp.take(
        f32(self.ctx_slot), pos.slot, axis=0)
    c_BNLD = c[:, None] + jnp.take(f32(self.ctx_age), pos.age, axis=0)
    return [layer.context_kv(c_BNLD) for layer in self.layers]

  def decode(self, tokens_BNT, ctx_kvs, ctx_mask_BNL):
    """Logits [B, N, T, V] of the next token at every position (teacher forcing)."""
    T = tokens_BNT.shape[-1]
    x = jnp.take(self.embed[...].astype(jnp.float32), tokens_BNT, axis=0)
    positions = jnp.arange(T, dtype=jnp.int32)
    for layer, kv in zip(self.layers, ctx_kvs):
      x = layer(x, kv, ctx_mask_BNL, positions)
    return self.final_norm(x) @ self.unembed[...].astype(jnp.float32)

  def __call__(self, tokens_BNT, ctx_BLDc, ctx_mask_BNL, pos: ContextPos):
    return self.decode(tokens_BNT, self.encode_context(ctx_BLDc, pos), ctx_mask_BNL)
