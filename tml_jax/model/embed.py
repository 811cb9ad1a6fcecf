"""Early-fusion embeddings: dMel frames, 40x40 video patches, text and segment ids.

No audio encoder and no vision tower (docs/design.md §1): each modality is one small learned map
into the model width, trained from scratch with everything else.
Shapes: N tokens (any leading dims), D width, Cm mel channels, Nb dMel bins.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tml_jax.model.layers import DTYPES, fan_in_init, param


class DMelEmbed(nnx.Module):
  """A frame is the sum over mel channels of a per-(channel, bin) embedding.

  Written as one-hot @ table: the same sum as a gather, but a matmul on every backend and a
  dense gradient instead of a scatter.
  """

  def __init__(self, n_mels: int, num_bins: int, d_model: int, *, param_dtype, rngs):
    self.n_mels, self.num_bins = n_mels, num_bins
    self.table = param(rngs, fan_in_init(n_mels), (n_mels, num_bins, d_model),
                       ("dmel_channel", "dmel_bin", "embed"), param_dtype)

  def __call__(self, bins_NC, dtype):
    onehot = jax.nn.one_hot(bins_NC, self.num_bins, dtype=dtype)
    onehot = onehot.reshape(*bins_NC.shape[:-1], self.n_mels * self.num_bins)
    return onehot @ self.table[...].astype(dtype).reshape(self.n_mels * self.num_bins, -1)


class HMLPStem(nnx.Module):
  """Hierarchical MLP patch stem (hMLP, arXiv 2203.09795) for 40x40x3 patches.

  A patch is cut into 8x8 sub-patches of 5x5 pixels; each level embeds, normalises, applies
  GELU and merges 2x2 neighbours: 5 px -> 10 px -> 20 px -> 40 px. Sub-patches never mix
  across patch borders, so this equals a convolutional stem applied per patch.
  """

  def __init__(self, patch: int, d_model: int, *, param_dtype, rngs):
    if patch % 8:
      raise ValueError(f"hMLP stem needs a patch size divisible by 8, got {patch}")
    self.patch, self.sub = patch, patch // 8
    w = max(d_model // 4, 8)
    dims = [(self.sub * self.sub * 3, w), (4 * w, w), (4 * w, w), (4 * w, d_model)]
    self.ws = nnx.List([param(rngs, fan_in_init(i), (i, o), ("patch", "embed"), param_dtype)
                        for i, o in dims])
    self.norms = nnx.List([param(rngs, jax.nn.initializers.ones, (o,), ("norm",), param_dtype)
                           for _, o in dims[:-1]])

  def __call__(self, patches_NP, dtype):
    lead, s = patches_NP.shape[:-1], self.sub
    # Pixels arrive as uint8 in HWC order; centre them so the first layer sees zero mean.
    x = patches_NP.astype(dtype).reshape(-1, 8, s, 8, s, 3) / 255.0 - 0.5
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, 8, 8, s * s * 3)
    for i, w in enumerate(self.ws):
      if i:  # merge 2x2 neighbours into one token of 4x the width
        n = x.shape[1] // 2
        x = x.reshape(-1, n, 2, n, 2, x.shape[-1]).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, n, n, 4 * x.shape[-1])
      x = x @ w[...].astype(dtype)
      if i < len(self.norms):
        x32 = x.astype(jnp.float32)
        x32 = (x32 - x32.mean(-1, keepdims=True)) * jax.lax.rsqrt(x32.var(-1, keepdims=True)
                                                                  + 1e-6)
        x = jax.nn.gelu((x32 * self.norms[i][...][None, None, None]).astype(dtype))
    return x.reshape(*lead, -1)


class Embeddings(nnx.Module):
  """All input embeddings of the micro-turn sequence (one table per modality)."""

  def __init__(self, *, d_model, vocab_size, n_mels, dmel_bins, patch_size, model_audio_slots,
               param_dtype, rngs):
    pd = DTYPES[param_dtype] if isinstance(param_dtype, str) else param_dtype
    self.dmel = DMelEmbed(n_mels, dmel_bins, d_model, param_dtype=pd, rngs=rngs)
    self.patch = HMLPStem(patch_size, d_model, param_dtype=pd, rngs=rngs)
    self.text = param(rngs, jax.nn.initializers.normal(1.0), (vocab_size, d_model),
                      ("vocab", "embed"), pd)
    self.segment = param(rngs, jax.nn.initializers.normal(1.0), (7, d_model), (None, "embed"),
                         pd)
    # One learned query per MODEL_AUDIO slot: what the flow head reads back out.
    self.audio_query = param(rngs, jax.nn.initializers.normal(1.0), (model_audio_slots, d_model),
                             (None, "embed"), pd)

  def tokens(self, ids, dtype):
    return jnp.take(self.text[...].astype(dtype), ids, axis=0)
