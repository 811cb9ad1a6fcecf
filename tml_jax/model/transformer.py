"""InteractionModel: early fusion -> decoder blocks under the micro-turn mask -> two heads.

Input batch (numpy or jnp; C chunks, layout slot counts Fu/Fs/P/Ti/To/A, prefix P0):
  user_dmel      int   [B, C, Fu, 80]   dMel bins of what the user said in chunk t
  self_dmel      int   [B, C, Fs, 80]   dMel bins of what the model played in chunk t
  video          uint8 [B, C, P, 4800]  40x40x3 patches of chunk t's frame (optional if P=0)
  text_in        int   [B, C, Ti]       typed text / background results arriving in chunk t
  model_text_in  int   [B, C, To]       teacher-forced inputs: BOS then the chunk's targets
  prefix         int   [B, P0]          system prompt tokens (only when P0 > 0)
  meta           TokenMeta [B, L]       docs/design.md §4 metadata of the flat sequence
Outputs: hidden [B, L, D], text logits [B, C, To, V] read at MODEL_TEXT, audio conditions
[B, C, A, D] read at MODEL_AUDIO (the flow head turns them into mel frames of chunk t+1).

`InteractionModel.step` is the same function one chunk at a time against a ring KV cache
(`tml_jax.model.cache`); tests/test_engine.py checks that both agree, the ring wrapping.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tml_jax.audio.constants import LOG_MIN
from tml_jax.microturn import CHUNK_SEGMENTS, ChunkLayout, Segment, TokenMeta
from tml_jax.model import cache as kv_cache
from tml_jax.model.attention import Attention, AttentionConfig, LayerCache
from tml_jax.model.background import BackgroundConfig, BackgroundModel, pool_chunk
from tml_jax.model.embed import Embeddings
from tml_jax.model.flow import FlowConfig, FlowHead, denormalize_mel
from tml_jax.model.layers import DTYPES, RMSNorm, fan_in_init, param
from tml_jax.model.experts import DenseFFN, FFNConfig
from tml_jax.model.moe import MoE, MoEConfig
from tml_jax.text import tokenizer as tok


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
  background: BackgroundConfig | None = None  # config.background, None = off
  # A binary head: does the model speak in chunk t+1? (read at MODEL_TEXT slot 0). Without
  # it the decision is only "the first byte of a word beats EOT" in the text softmax.
  speak_gate: bool = False
  # The gate also reads the mean final hidden state of the chunk's USER_AUDIO tokens: a
  # direct path from what was just heard (how the user's last words ended) to the decision,
  # instead of one that slot 0's attention must first learn to route.
  speak_gate_audio: bool = False
  # SELF_AUDIO tokens carry a learned "my voice plays in this chunk" vector (batch or obs
  # "self_speaking" [B, C] bool): in training the corpus' model channel, in serving the
  # gate's own decision one chunk earlier, so the two match exactly. What the model hears
  # of itself does not: clean speech in training, its vocoded guess when serving, and a
  # gate that only recognises the former stops as soon as it starts.
  self_speaking: bool = False
  # Rematerialisation of each block in the training forward pass (REMAT_POLICIES); the
  # cached micro-turn step keeps nothing for a backward pass and ignores it.
  remat: str = "none"
  # Run the blocks as one lax.scan over their stacked parameters (training forward and the
  # cached step): XLA compiles one block instead of num_layers, which is what makes a
  # 48-layer program compile in minutes and fit a host's memory. The parameters stay one
  # tree per block (checkpoints are the same); the stack is a per-step copy.
  scan_layers: bool = False

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
                                  m.rope_theta, lay.window, m.attention_backend, m.dtype,
                                  m.param_dtype),
        ffn=m.ffn,
        moe=MoEConfig(m.d_model, m.expert_hidden, m.num_experts, m.top_k,
                      m.shared_expert_hidden, m.moe_impl, m.capacity_factor, m.dtype,
                      m.param_dtype, int(m.get("moe_token_chunks", 1))),
        dense=FFNConfig(m.d_model, m.dense_hidden, m.dtype, m.param_dtype),
        flow=FlowConfig(m.d_model, fpq * m.n_mels, m.flow_hidden, m.flow_layers, m.param_dtype),
        vocab_size=m.vocab_size, n_mels=m.n_mels, dmel_bins=m.dmel_bins,
        patch_size=m.patch_size, frames_per_query=fpq, dtype=m.dtype,
        param_dtype=m.param_dtype, norm_eps=m.norm_eps,
        background=BackgroundConfig.from_config(config),
        # Configs saved before the gate existed have no key: those models have no gate.
        speak_gate=bool(m.get("speak_gate", False)),
        speak_gate_audio=bool(m.get("speak_gate", False) and m.get("speak_gate_audio", False)),
        self_speaking=bool(m.get("self_speaking", False)),
        remat=m.get("remat", "none"),
        scan_layers=bool(m.get("scan_layers", False)))


# model.remat -> what a block keeps for the backward pass (jax.checkpoint policies).
#   none  everything (fastest; activation memory grows with layers x tokens)
#   dots  the outputs of matmuls against weights (no batch dimension): the attention
#         scores, norms and activations are recomputed
#   full  only each block's input: the whole block is recomputed (about 1/3 more FLOPs)
REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = DTYPES[cfg.param_dtype]
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.attn = Attention(cfg.attention, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.ffn = MoE(cfg.moe, rngs=rngs) if cfg.ffn == "moe" else DenseFFN(cfg.dense, rngs=rngs)

  def __call__(self, x_BLD, meta: TokenMeta, positions_BL, cache: LayerCache | None = None):
    """Returns (x, MoE aux losses, the updated layer cache or None)."""
    a, cache = self.attn(self.attn_norm(x_BLD), meta, positions_BL, cache)
    x = x_BLD + a
    y, aux = self.ffn(self.ffn_norm(x), meta.valid)
    return x + y, aux, cache


class ModelOutput(NamedTuple):
  hidden: jnp.ndarray        # [B, L, D] after the final norm
  text_logits: jnp.ndarray   # [B, C, To, V] float32
  audio_cond: jnp.ndarray    # [B, C, A, D]
  aux: dict                  # MoE losses averaged over layers
  speak_logits: jnp.ndarray | None = None  # [B, C] float32: speak in chunk t+1 (gate only)


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
    if cfg.speak_gate:
      self.speak_w = param(rngs, jax.nn.initializers.zeros, (cfg.d_model,), ("embed",), pd)
      # Start silent-leaning (P = 0.27): an untrained model should not fill the room.
      self.speak_b = param(rngs, jax.nn.initializers.constant(-1.0), (1,), ("norm",), pd)
    if cfg.speak_gate and cfg.speak_gate_audio:
      self.speak_wa = param(rngs, jax.nn.initializers.zeros, (cfg.d_model,), ("embed",), pd)
    if cfg.self_speaking:
      self.speaking = param(rngs, jax.nn.initializers.zeros, (cfg.d_model,), ("embed",), pd)

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
      if self.cfg.self_speaking:
        flag = jnp.asarray(batch["self_speaking"]).astype(dt)[..., None, None]  # [B, C, 1, 1]
        out[Segment.SELF_AUDIO] = out[Segment.SELF_AUDIO] + flag * self.speaking[...].astype(
            dt)[None, None, None]
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

  def _stacked_blocks(self):
    """(graphdef of one block, every block's state stacked on a leading layer axis)."""
    graphdef, first = nnx.split(self.blocks[0])
    states = [first] + [nnx.split(b)[1] for b in list(self.blocks)[1:]]
    return graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states)

  def backbone(self, x_BLD, meta: TokenMeta, positions_BL):
    if self.cfg.scan_layers:
      graphdef, stacked = self._stacked_blocks()

      def body(x, state):
        y, aux, _ = nnx.merge(graphdef, state)(x, meta, positions_BL)
        return y, aux

      if self.cfg.remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat])
      x_BLD, aux_L = jax.lax.scan(body, x_BLD, stacked)
      return self.final_norm(x_BLD), {k: jnp.mean(v) for k, v in aux_L.items()}
    aux_sum = {}
    run = lambda block, x, meta, positions: block(x, meta, positions)[:2]
    if self.cfg.remat != "none":
      run = nnx.remat(run, policy=REMAT_POLICIES[self.cfg.remat])
    for block in self.blocks:
      x_BLD, aux = run(block, x_BLD, meta, positions_BL)
      for k, v in aux.items():
        aux_sum[k] = aux_sum.get(k, 0.0) + v / self.cfg.num_layers
    return self.final_norm(x_BLD), aux_sum

  def extend(self, cache: kv_cache.KVCache, x_BND, positions_BN, meta: TokenMeta, write_at):
    """Runs N new tokens through every block against the cache, writing their keys, values
    and final hidden states at rows [write_at, write_at + N). `cache.meta` must already
    describe them. Returns (cache, hidden [B, N, D])."""
    if self.cfg.scan_layers:
      graphdef, stacked = self._stacked_blocks()

      def body(x, layer):
        state, k, v = layer
        y, _, lc = nnx.merge(graphdef, state)(x, meta, positions_BN,
                                              LayerCache(k, v, cache.meta, write_at))
        return y, (lc.k, lc.v)

      x_BND, (k_L, v_L) = jax.lax.scan(body, x_BND, (stacked, jnp.stack(cache.k),
                                                      jnp.stack(cache.v)))
      ks, vs = list(k_L), list(v_L)
    else:
      ks, vs = [], []
      for block, k, v in zip(self.blocks, cache.k, cache.v):
        x_BND, _, lc = block(x_BND, meta, positions_BN, LayerCache(k, v, cache.meta, write_at))
        ks.append(lc.k)
        vs.append(lc.v)
    h = self.final_norm(x_BND)
    hidden = jax.lax.dynamic_update_slice(cache.hidden, h.astype(cache.hidden.dtype),
                                          (0, write_at, 0))
    return kv_cache.KVCache(tuple(ks), tuple(vs), hidden, cache.meta), h

  def speak_logits(self, h_ND, heard_ND=None):
    """Logit of "I speak in the next chunk" from MODEL_TEXT slot 0's hidden state (and,
    with speak_gate_audio, `heard_ND`: the mean hidden state of the chunk's USER_AUDIO)."""
    logit = (jnp.einsum("...d,d->...", h_ND.astype(jnp.float32),
                        self.speak_w[...].astype(jnp.float32))
             + self.speak_b[...].astype(jnp.float32)[0])
    if self.cfg.speak_gate_audio:
      logit = logit + jnp.einsum("...d,d->...", heard_ND.astype(jnp.float32),
                                 self.speak_wa[...].astype(jnp.float32))
    return logit

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
    h_text = lay.unpack(h_BLD, Segment.MODEL_TEXT)
    speak = None
    if self.cfg.speak_gate:
      heard = (lay.unpack(h_BLD, Segment.USER_AUDIO).astype(jnp.float32).mean(2)
               if self.cfg.speak_gate_audio else None)
      speak = self.speak_logits(h_text[:, :, 0], heard)
    return ModelOutput(h_BLD, self.text_logits(h_text), lay.unpack(h_BLD, Segment.MODEL_AUDIO),
                       aux, speak)


  # ------------------------------------------------------------------ one micro-turn
  def step(self, cache: kv_cache.KVCache, obs: dict, t, forced_T, rng, temperature, *,
           flow_steps: int, with_prefix: bool, speak_threshold=0.5, delegate_threshold=1.0):
    """One micro-turn against the ring cache; the training forward pass, one chunk at a time.

    obs: user_dmel/self_dmel [1, 1, F, 80], video [1, 1, Pv, 4800], video_valid bool [],
    text_in [1, 1, Ti] (+ prefix [1, P] when with_prefix, chunk 0 only). forced_T: int32
    [To], the input token of each text slot, or -1 to feed the model's own previous
    prediction (slot 0 reads BOS unless forced). RoPE positions are the training row's flat
    index P + t*K + slot (RoPE sees only differences, so a training crop's offset does not
    matter). Order: the observations in one pass, the MODEL_TEXT slots one at a time, then
    the MODEL_AUDIO queries in one pass and the flow head's Euler steps.
    With the speak gate, P(speak) below `speak_threshold` makes the chunk silent: text EOT
    at slot 0 (then PAD) and the silence floor as mel; the cache still holds the chunk.
    A text slot whose P(DELEGATE) reaches `delegate_threshold` emits DELEGATE (once per
    chunk, and only where the gate lets the chunk speak): a rare token's decision rule, as
    the gate is speech's (1: plain decoding).
    Returns (cache, dict(tokens [To], logits [To, V], audio_cond [A, D], mel [F, 80],
    p_speak [] (1 without a gate), p_delegate []: slot 0's P(DELEGATE), pooled [D]: the
    chunk's history vector for the background model, model.background.pool_chunk)).
    """
    lay = self.cfg.layout
    K, P = lay.chunk_len, lay.prefix
    base = kv_cache.ring_row(self.cfg, t)
    pos0 = P + t * K
    meta_K = lay.chunk_token_meta(t, obs["video_valid"])
    cache = kv_cache.write_meta(cache, meta_K, base)

    emb = self.embed_chunks(dict(obs, model_text_in=jnp.full((1, 1, lay.model_text), tok.BOS,
                                                             jnp.int32)))
    n_obs = lay.offset(Segment.MODEL_TEXT)
    x = jnp.concatenate([emb[s][:, 0] for s in CHUNK_SEGMENTS[:4] if lay.slots(s)], axis=1)
    positions = pos0 + jnp.arange(n_obs, dtype=jnp.int32)[None]
    q_meta, write_at = meta_K.slice(0, n_obs), base
    if with_prefix:  # prefix tokens see chunk 0's observations (mask rule 2)
      pre_meta = lay.prefix_meta()
      cache = kv_cache.write_meta(cache, pre_meta, 0)
      x = jnp.concatenate([emb[Segment.PREFIX], x], axis=1)
      positions = jnp.concatenate([jnp.arange(P, dtype=jnp.int32)[None], positions], axis=1)
      q_meta, write_at = pre_meta.concat(q_meta), 0
    cache, h_obs = self.extend(cache, x, positions, q_meta, write_at)
    heard = None
    if self.cfg.speak_gate_audio:  # USER_AUDIO comes first among the observations
      skip = P if with_prefix else 0
      heard = h_obs[:, skip:skip + lay.user_audio].astype(jnp.float32).mean(1)[0]
    cache, tokens, logits, p_speak = self._decode_text(cache, meta_K, base, pos0, forced_T,
                                                       rng, temperature, speak_threshold,
                                                       heard, delegate_threshold)
    p_delegate = jax.nn.softmax(logits[0].astype(jnp.float32))[tok.DELEGATE]
    A, off_A = lay.model_audio, lay.offset(Segment.MODEL_AUDIO)
    cache, cond = self.extend(cache, emb[Segment.MODEL_AUDIO][:, 0],
                              pos0 + off_A + jnp.arange(A, dtype=jnp.int32)[None],
                              meta_K.slice(off_A, off_A + A), base + off_A)
    x = self.flow.sample(cond[0], jax.random.fold_in(rng, lay.model_text), flow_steps)
    mel_FM = denormalize_mel(x).reshape(-1, self.cfg.n_mels)
    mel_FM = jnp.where(p_speak >= speak_threshold, mel_FM, LOG_MIN)
    return cache, dict(tokens=tokens, logits=logits, audio_cond=cond[0], mel=mel_FM,
                       p_speak=p_speak, p_delegate=p_delegate,
                       pooled=pool_chunk(h_obs, q_meta)[0])

  def _decode_text(self, cache, meta_K: TokenMeta, base, pos0, forced_T, rng, temperature,
                   speak_threshold, heard_D=None, delegate_threshold=1.0):
    """The MODEL_TEXT slots, autoregressive. After EOT the training inputs are EOT then PAD
    (the text FIFO), so a free-running decode feeds the same and reports PAD after it.
    DELEGATE is about one text target in 2000, so even where it belongs it seldom wins the
    argmax: a slot whose P(DELEGATE) reaches `delegate_threshold` (calibrated running free on
    validation, tml_jax.probe.calibrate_delegate_free_running) emits it, at most once per
    chunk.
    Returns (cache, tokens, logits, P(speak) from slot 0)."""
    lay, dt = self.cfg.layout, DTYPES[self.cfg.dtype]
    off_T, To, V = lay.offset(Segment.MODEL_TEXT), lay.model_text, self.cfg.vocab_size
    seg = self.embed.segment[...].astype(dt)[None, None, int(Segment.MODEL_TEXT)]

    def text_slot(j, carry):
      cache, prev, done, delegated, tokens, logits, p_speak = carry
      inp = jnp.where(forced_T[j] >= 0, forced_T[j], jnp.where(j == 0, tok.BOS, prev))
      x = (self.embed.tokens(jnp.reshape(inp, (1, 1)), dt) + seg).astype(cache.hidden.dtype)
      slot = off_T + j
      q_meta = meta_K.slice(off_T, off_T + 1)._replace(
          slot=jnp.reshape(slot, (1, 1)).astype(jnp.int32))
      cache, h = self.extend(cache, x, jnp.reshape(pos0 + slot, (1, 1)), q_meta, base + slot)
      lg = self.text_logits(h)[0, 0]
      if self.cfg.speak_gate:
        p_speak = jnp.where(j == 0, jax.nn.sigmoid(self.speak_logits(h[0, 0], heard_D)),
                            p_speak)
      pred = sample_token(lg, jax.random.fold_in(rng, j), temperature)
      p_del = jax.nn.softmax(lg.astype(jnp.float32))[tok.DELEGATE]
      pred = jnp.where((p_del >= delegate_threshold) & ~delegated, tok.DELEGATE, pred)
      # The gate rules slot 0, DELEGATE included: in the corpus a DELEGATE opens the
      # acknowledgement, a speech onset. Let through in silent chunks, P(DELEGATE) above
      # 0.1 fired all through the user's question (it peaks while a question is heard);
      # behind the gate it fired within a chunk or two of the corpus' own time.
      pred = jnp.where((j == 0) & (p_speak < speak_threshold), tok.EOT, pred)
      pred = jnp.where(done, tok.PAD, pred)
      done = done | (pred == tok.EOT)
      delegated = delegated | (pred == tok.DELEGATE)
      return (cache, pred, done, delegated, tokens.at[j].set(pred), logits.at[j].set(lg),
              p_speak)

    no = jnp.bool_(False)
    init = (cache, jnp.int32(tok.BOS), no, no, jnp.full((To,), tok.PAD, jnp.int32),
            jnp.zeros((To, V), jnp.float32), jnp.float32(1.0))
    cache, _, _, _, tokens, logits, p_speak = jax.lax.fori_loop(0, To, text_slot, init)
    return cache, tokens, logits, p_speak


def sample_token(logits_V, rng, temperature):
  """Greedy at temperature 0, else a sample at that temperature."""
  greedy = jnp.argmax(logits_V, -1).astype(jnp.int32)
  sampled = jax.random.categorical(rng, logits_V / jnp.maximum(temperature, 1e-6)).astype(
      jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


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
