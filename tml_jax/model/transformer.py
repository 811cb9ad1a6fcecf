"""InteractionModel: early fusion -> decoder blocks under the micro-turn mask -> two heads.

Input batch (numpy or jnp; C chunks, layout slot counts Fu/Fs/P/Ti/To/A, prefix P0):
  user_dmel      int   [B, C, Fu, 80]   dMel bins of what the user said in chunk t
  self_dmel      int   [B, C, Fs, 80]   dMel bins of what the model played in chunk t
  video          uint8 [B, C, P, 4800]  40x40x3 patches of chunk t's frame (optional if P=0)
  text_in        int   [B, C, Ti]       typed text / background results arriving in chunk t
  model_text_in  int   [B, C, To]       teacher-forced inputs: BOS then the chunk's targets
  prefix         int   [B, P0]          system prompt tokens (only when P0 > 0)
  meta           TokenMeta [B, L]       DESIGN §4 metadata of the flat sequence
Outputs: hidden [B, L, D], text logits [B, C, To, V] read at MODEL_TEXT, audio conditions
[B, C, A, D] read at MODEL_AUDIO (the flow head turns them into mel frames of chunk t+1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tml_jax.microturn import ChunkLayout, Segment, TokenMeta
from tml_jax.model.attention import Attention, AttentionConfig
from tml_jax.model.background import BackgroundConfig, BackgroundModel
from tml_jax.model.embed import Embeddings
from tml_jax.model.flow import FlowConfig, FlowHead
from tml_jax.model.layers import DTYPES, RMSNorm, fan_in_init, param
from tml_jax.model.moe import DenseFFN, FFNConfig, MoE, MoEConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  layout: ChunkLayout            # slot counts and the attention window
  d_model: int
  num_layers: int
  attention: AttentionConfig
  ffn: str                      # "moe" | "dense"
  moe: MoEConfig
  dense: FFNConfig
  flow: FlowConfig
  vocab_size: int
  n_mels: int
  dmel_bins: int
  patch_size: int
  frames_per_query: int
  dtype: str
  param_dtype: str
  norm_eps: float = 1e-6
  background: BackgroundConfig | None = None  # config.background (issue 7), None = off

  @property
  def window(self) -> int | None:
    return self.layout.window

  @classmethod
  def from_config(cls, config) -> "ModelConfig":
    from tml_jax.config import validate
    validate(config)
    m, lay = config.model, ChunkLayout.from_config(config.layout)
    fpq = lay.user_audio // lay.model_audio
    return cls(
        layout=lay, d_model=m.d_model, num_layers=m.num_layers,
        attention=AttentionConfig(m.d_model, m.num_heads, m.num_kv_heads, m.head_dim,
                                  m.rope_theta, m.attention_backend, m.dtype, m.param_dtype),
        ffn=m.ffn,
        moe=MoEConfig(m.d_model, m.expert_hidden, m.num_experts, m.top_k,
                      m.shared_expert_hidden, m.moe_impl, m.capacity_factor, m.dtype,
                      m.param_dtype),
        dense=FFNConfig(m.d_model, m.dense_hidden, m.dtype, m.param_dtype),
        flow=FlowConfig(m.d_model, fpq * m.n_mels, m.flow_hidden, m.flow_layers, m.param_dtype),
        vocab_size=m.vocab_size, n_mels=m.n_mels, dmel_bins=m.dmel_bins,
        patch_size=m.patch_size, frames_per_query=fpq, dtype=m.dtype,
        param_dtype=m.param_dtype, norm_eps=m.norm_eps,
        background=BackgroundConfig.from_config(config))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = DTYPES[cfg.param_dtype]
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.attn = Attention(cfg.attention, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.ffn = MoE(cfg.moe, rngs=rngs) if cfg.ffn == "moe" else DenseFFN(cfg.dense, rngs=rngs)

  def __call__(self, x_BLD, meta: TokenMeta, positions_BL, window):
    x = x_BLD + self.attn(self.attn_norm(x_BLD), meta, positions_BL, window=window)
    y, aux = self.ffn(self.ffn_norm(x), meta.valid)
    return x + y, aux


class ModelOutput(NamedTuple):
  hidden: jnp.ndarray        # [B, L, D] after the final norm
  text_logits: jnp.ndarray   # [B, C, To, V] float32
  audio_cond: jnp.ndarray    # [B, C, A, D]
  aux: dict                  # MoE losses averaged over layers


class InteractionModel(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    lay, pd = cfg.layout, DTYPES[cfg.param_dtype]
    self.embed = Embeddings(d_model=cfg.d_model, vocab_size=cfg.vocab_size, n_mels=cfg.n_mels,
                            dmel_bins=cfg.dmel_bins, patch_size=cfg.patch_size,
                            model_audio_slots=lay.model_audio, param_dtype=pd, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.unembed = param(rngs, fan_in_init(cfg.d_model), (cfg.d_model, cfg.vocab_size),
                         ("embed", "vocab"), pd)
    self.flow = FlowHead(cfg.flow, rngs=rngs)
    if cfg.background is not None:  # created last: the other parameters' init is unchanged
      self.background = BackgroundModel(cfg.background, rngs=rngs)

  def embed_chunks(self, batch) -> dict:
    """Per-segment embeddings `[B, C, S, D]` (segment embedding added), ready for `pack`."""
    lay, dt, e = self.cfg.layout, DTYPES[self.cfg.dtype], self.embed
    seg = e.segment[...].astype(dt)
    B, C = batch["text_in"].shape[:2]
    out = {}
    if lay.user_audio:
      out[Segment.USER_AUDIO] = e.dmel(batch["user_dmel"], dt)
    if lay.self_audio:
      out[Segment.SELF_AUDIO] = e.dmel(batch["self_dmel"], dt)
    if lay.video:
      out[Segment.VIDEO] = e.patch(batch["video"], dt)
    if lay.text_in:
      out[Segment.TEXT_IN] = e.tokens(batch["text_in"], dt)
    if lay.model_text:
      out[Segment.MODEL_TEXT] = e.tokens(batch["model_text_in"], dt)
    if lay.model_audio:
      q = e.audio_query[...].astype(dt)
      out[Segment.MODEL_AUDIO] = jnp.broadcast_to(q, (B, C, *q.shape))
    out = {s: x + seg[int(s)].reshape((1,) * (x.ndim - 1) + (-1,)) for s, x in out.items()}
    if lay.prefix:
      out[Segment.PREFIX] = e.tokens(batch["prefix"], dt) + seg[None, None, int(Segment.PREFIX)]
    return out

  def backbone(self, x_BLD, meta: TokenMeta, positions_BL):
    aux_sum = {}
    for block in self.blocks:
      x_BLD, aux = block(x_BLD, meta, positions_BL, self.cfg.window)
      for k, v in aux.items():
        aux_sum[k] = aux_sum.get(k, 0.0) + v / self.cfg.num_layers
    return self.final_norm(x_BLD), aux_sum

  def text_logits(self, h_ND):
    return jnp.einsum("...d,dv->...v", h_ND.astype(jnp.float32),
                      self.unembed[...].astype(jnp.float32))

  def __call__(self, batch) -> ModelOutput:
    lay = self.cfg.layout
    meta = TokenMeta(*(jnp.asarray(f) for f in batch["meta"]))
    x_BLD = lay.pack(self.embed_chunks(batch))
    # Flat index as position: RoPE only sees differences, and the mask hides other documents.
    positions_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1], dtype=jnp.int32),
                                    x_BLD.shape[:2])
    h_BLD, aux = self.backbone(x_BLD, meta, positions_BL)
    logits = self.text_logits(lay.unpack(h_BLD, Segment.MODEL_TEXT))
    return ModelOutput(h_BLD, logits, lay.unpack(h_BLD, Segment.MODEL_AUDIO), aux)


def expert_param_fraction(cfg: ModelConfig) -> float:
  """Share of routed-expert parameters that one token uses."""
  return cfg.moe.top_k / cfg.moe.num_experts if cfg.ffn == "moe" else 1.0


def count_params(cfg: ModelConfig) -> tuple[int, int]:
  """(total, active per token) parameter counts, under `jax.eval_shape` (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: InteractionModel(cfg, rngs=nnx.Rngs(0)))
  total = expert = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(abstract, nnx.Param)):
    n = math.prod(leaf.shape)
    total += n
    names = [getattr(p, "key", getattr(p, "name", "")) for p in path]
    if any(str(k) in ("w_gate", "w_up", "w_down") for k in names) and "shared" not in map(
        str, names) and cfg.ffn == "moe" and "ffn" in map(str, names):
      expert += n
  active = total - expert + round(expert * expert_param_fraction(cfg))
  return total, active
