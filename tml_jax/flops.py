"""Analytic FLOP counts for MFU: active matmul parameters plus the attention actually computed
under the micro-turn mask (visible query-key pairs), forward x3 for a training step."""

from __future__ import annotations

import numpy as np

from tml_jax.microturn import Segment, TokenMeta, microturn_mask


def forward_flops(cfg, meta: TokenMeta) -> float:
  """FLOPs of one forward pass over a batch with metadata `meta` (numpy, [B, L])."""
  a, m = cfg.attention, cfg.moe
  D, H, K, Dh = cfg.d_model, a.num_heads, a.num_kv_heads, a.head_dim
  seg = np.asarray(meta.segment)
  tokens = seg.size
  per_token = 2 * D * (H + 2 * K) * Dh + 2 * H * Dh * D
  if cfg.ffn == "moe":
    per_token += 2 * D * m.num_experts + m.top_k * 6 * D * m.hidden + 6 * D * m.shared_hidden
  else:
    per_token += 6 * D * cfg.dense.hidden
  visible = float(np.asarray(microturn_mask(meta, meta, cfg.window)).sum())
  flops = cfg.num_layers * (tokens * per_token + 4 * H * Dh * visible)
  audio = np.isin(seg, [Segment.USER_AUDIO, Segment.SELF_AUDIO]).sum()
  flops += audio * 2 * cfg.n_mels * cfg.dmel_bins * D          # dMel one-hot @ table
  flops += (seg == Segment.MODEL_TEXT).sum() * 2 * D * cfg.vocab_size
  f = cfg.flow
  W = f.width
  flow_per_query = 2 * (f.cond_dim * W + W * W + f.out_dim * W + W * f.out_dim
                        + (f.num_layers + 1) * 3 * W * W + f.num_layers * 4 * W * W)
  flops += (seg == Segment.MODEL_AUDIO).sum() * flow_per_query
  return float(flops)


def train_step_flops(cfg, meta: TokenMeta) -> float:
  return 3.0 * forward_flops(cfg, meta)
