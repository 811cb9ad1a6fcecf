"""The training objective: one function, each term reported on its own.

  text     cross-entropy of MODEL_TEXT targets (PAD slots and invalid chunks ignored)
  audio    conditional flow matching of chunk t+1's mel frames on MODEL_AUDIO queries
  balance  MoE load balancing (Switch), averaged over layers
  z        router z-loss (ST-MoE)
  background  the background model's teacher-forced text loss on the delegations of the
              row (tml_jax.model.background; 0 when the model or the batch has none)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tml_jax.microturn import Segment, TokenMeta
from tml_jax.model.background import background_loss
from tml_jax.model.flow import denormalize_mel, normalize_mel
from tml_jax.text import tokenizer as tok


def text_terms(logits_BCTV, target_BCT, chunk_valid_BC):
  mask = (target_BCT != tok.PAD) & chunk_valid_BC[..., None]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BCTV, target_BCT)
  n = jnp.maximum(jnp.sum(mask), 1)
  correct = (jnp.argmax(logits_BCTV, -1) == target_BCT) & mask
  # Speech text alone (bytes): EOT dominates the targets and hides what the model learnt.
  is_byte = mask & (target_BCT < 256)
  return dict(text=jnp.sum(ce * mask) / n, text_acc=jnp.sum(correct) / n,
              text_byte_acc=jnp.sum(correct & is_byte) / jnp.maximum(jnp.sum(is_byte), 1))


def compute_losses(model, batch, rng, weights) -> tuple[jnp.ndarray, dict]:
  out = model(batch)
  lay = model.cfg.layout
  chunk_valid_BC = lay.unpack(jnp.asarray(batch["meta"].valid)[..., None],
                              Segment.MODEL_TEXT)[:, :, 0, 0]
  metrics = text_terms(out.text_logits, jnp.asarray(batch["model_text_target"]), chunk_valid_BC)
  B, C, A, D = out.audio_cond.shape
  x1 = normalize_mel(jnp.asarray(batch["audio_target"], jnp.float32)).reshape(B * C * A, -1)
  w = jnp.broadcast_to(jnp.asarray(batch["audio_mask"])[..., None], (B, C, A)).reshape(-1)
  metrics["audio"] = model.flow.loss(out.audio_cond.reshape(B * C * A, D), x1, rng, w)
  metrics["balance"] = out.aux.get("balance", jnp.zeros(()))
  metrics["z"] = out.aux.get("z", jnp.zeros(()))
  metrics["background"] = jnp.zeros(())
  if getattr(model, "background", None) is not None and "bg_chunk" in batch:
    metrics["background"], metrics["background_tokens"] = background_loss(
        model.background, out.hidden, TokenMeta(*(jnp.asarray(f) for f in batch["meta"])),
        batch, model.cfg.window)
  total = sum(weights[k] * metrics[k] for k in ("text", "audio", "balance", "z", "background"))
  metrics["loss"] = total
  return total, metrics


def sampled_audio_l1(model, out_audio_cond, batch, rng, steps: int):
  """Mean |log10 mel| error of Euler samples against the targets (an interpretable number,
  with the per-channel-mean predictor as its trivial baseline)."""
  B, C, A, D = out_audio_cond.shape
  x = model.flow.sample(out_audio_cond.reshape(-1, D), rng, steps)
  pred = denormalize_mel(x).reshape(B, C, A, -1)
  target = jnp.asarray(batch["audio_target"], jnp.float32)
  w = jnp.asarray(batch["audio_mask"], jnp.float32)[..., None, None]
  n = jnp.maximum(jnp.sum(w) * A * target.shape[-1], 1.0)
  return jnp.sum(jnp.abs(pred - target) * w) / n
