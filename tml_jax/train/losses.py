"""The training objective: every loss term, each reported on its own.

  text        cross-entropy of MODEL_TEXT targets (PAD slots and invalid chunks ignored)
  audio       conditional flow matching of chunk t+1's mel frames on MODEL_AUDIO queries
  balance     MoE load balancing (Switch), averaged over layers by the backbone
  z           router z-loss (ST-MoE), averaged likewise
  background  the background model's teacher-forced text loss on the delegations of the
              row (0 when the model or the batch has none)
  heard       the same on its "heard" targets (background.heard_targets): the words the
              user said in the window of the row's last chunk (data.background_targets.
              heard_sequence)
  speak       binary cross-entropy of the speak gate (does the model's audio in chunk t+1
              hold speech?) on valid chunks (0 when the model has no gate)
The total is the `train.loss_weights`-weighted sum of these (a missing weight is 0).

Plain jax, no optax: tml_jax.train.state imports this module, and serving imports that one
(for `params_abstract`) without the training dependencies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tml_jax.data.speak_labels import CONDITIONS
from tml_jax.microturn import Segment, TokenMeta
from tml_jax.model.background import pool_history, read_context
from tml_jax.model.flow import denormalize_mel, normalize_mel
from tml_jax.text import tokenizer as tok

TERMS = ("text", "audio", "balance", "z", "background", "heard", "speak", "delegate")
# Metrics that are means over a batch's few targets of one kind: averaged over batches, each
# batch counts by its number of those targets (tml_jax.train.loop.evaluate).
PER_TARGET = {"delegate": "delegate_targets", "delegate_acc": "delegate_targets",
              "background": "background_tokens", "background_other": "background_tokens",
              "heard": "heard_tokens", "heard_other": "heard_tokens"}


def cross_entropy(logits_NV, labels_N):
  """logsumexp(logits) - logits[label], computed as optax's
  softmax_cross_entropy_with_integer_labels does (numbers match runs trained with it)."""
  label_logits_N = jnp.take_along_axis(logits_NV, labels_N[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_NV, axis=-1) - label_logits_N


def text_terms(logits_BCTV, target_BCT, chunk_valid_BC):
  mask = (target_BCT != tok.PAD) & chunk_valid_BC[..., None]
  ce = cross_entropy(logits_BCTV, target_BCT)
  n = jnp.maximum(jnp.sum(mask), 1)
  pred_BCT = jnp.argmax(logits_BCTV, -1)
  correct = (pred_BCT == target_BCT) & mask
  # Speech text alone (bytes): EOT dominates the targets and hides what the model learnt.
  is_byte = mask & (target_BCT < 256)
  # DELEGATE is about one text target in 2000: the `delegate` term is the mean CE over its
  # targets alone (0 in a batch without one), so its weight says what one delegation is
  # worth. delegate_acc / delegate_false: greedy decoding (the engine's) emits it where it
  # should / where it should not.
  is_del = mask & (target_BCT == tok.DELEGATE)
  n_del = jnp.sum(is_del)
  argmax_del = pred_BCT == tok.DELEGATE
  others = mask & ~is_del
  return dict(text=jnp.sum(ce * mask) / n, text_acc=jnp.sum(correct) / n,
              text_byte_acc=jnp.sum(correct & is_byte) / jnp.maximum(jnp.sum(is_byte), 1),
              delegate=jnp.sum(ce * is_del) / jnp.maximum(n_del, 1),
              delegate_targets=n_del.astype(jnp.float32),
              delegate_acc=jnp.sum(argmax_del & is_del) / jnp.maximum(n_del, 1),
              delegate_false=jnp.sum(argmax_del & others) / jnp.maximum(jnp.sum(others), 1))


def flow_matching_loss(flow, cond_ND, x1_NM, rng, weight_N=None):
  """Conditional flow matching on the straight path x_t = (1 - t) x0 + t x1: mean squared
  error of the head's velocity against x1 - x0, per element, weighted per row."""
  k_noise, k_t = jax.random.split(rng)
  x0 = jax.random.normal(k_noise, x1_NM.shape, jnp.float32)
  t_N = jax.random.uniform(k_t, x1_NM.shape[:-1], jnp.float32)
  xt = (1 - t_N[..., None]) * x0 + t_N[..., None] * x1_NM
  err_N = jnp.mean((flow(cond_ND, xt, t_N) - (x1_NM - x0)) ** 2, axis=-1)
  if weight_N is None:
    return jnp.mean(err_N)
  w_N = weight_N.astype(jnp.float32)
  return jnp.sum(err_N * w_N) / jnp.maximum(jnp.sum(w_N), 1.0)


def audio_weight(batch, speech_only: bool):
  """bool [B, C]: the chunks the flow head learns (and is scored on). With a speak gate the
  model's voice factorises as P(speak) x p(mel | speech): the gate owns silence, so the flow
  head learns only target chunks that hold the model's speech (`audio_voiced`, the same
  rule as the gate's target). Learning silence too, it answers an uncertain onset with
  silence, the majority mode, and a gate that opens plays nothing."""
  w = jnp.asarray(batch["audio_mask"], bool)
  if speech_only and "audio_voiced" in batch:
    w = w & jnp.asarray(batch["audio_voiced"], bool)
  return w


def audio_loss(model, audio_cond_BCAD, batch, rng):
  B, C, A, D = audio_cond_BCAD.shape
  x1 = normalize_mel(jnp.asarray(batch["audio_target"], jnp.float32)).reshape(B * C * A, -1)
  mask = audio_weight(batch, model.cfg.speak_gate)
  w = jnp.broadcast_to(mask[..., None], (B, C, A)).reshape(-1)
  return flow_matching_loss(model.flow, audio_cond_BCAD.reshape(B * C * A, D), x1, rng, w)


def speak_terms(speak_logits_BC, batch, transition_weight: float = 1.0,
                pause_weight: float = 1.0, barge_in_weight: float = 1.0) -> dict:
  """Gate BCE, its accuracy and the mean predicted P(speak), over chunks with a target.

  Chunks where the decision changes (an onset: silent now, speaking next; an offset: the
  reverse) weigh `transition_weight` times the others. Without it the gate learns "keep
  doing what I hear myself doing", right on almost every chunk, and never starts a turn on
  its own (the free-running probe shows it). Chunks inside a user's mid-utterance pause
  weigh `pause_weight`: they are the onsets' counterpart (the same silence, "wait" instead
  of "answer"), and as rare. Chunks of a user's barge-in while the model still speaks weigh
  `barge_in_weight`: the only offsets the model's own text cannot predict (its sentence is
  not finished; only the user's voice says "stop"), one or two per interruption.
  """
  y = jnp.asarray(batch["speak_target"], jnp.float32)
  mask = jnp.asarray(batch["audio_mask"], jnp.float32)
  now = jnp.asarray(batch.get("speak_now", batch["speak_target"]), jnp.float32)
  w = mask * jnp.where(now != y, transition_weight, 1.0)
  if "speak_condition" in batch and pause_weight != 1.0:
    pause = jnp.asarray(batch["speak_condition"]) == CONDITIONS.index("pause")
    w = w * jnp.where(pause & (now == 0), pause_weight, 1.0)
  if "speak_condition" in batch and barge_in_weight != 1.0:
    barge = jnp.asarray(batch["speak_condition"]) == CONDITIONS.index("barge_in")
    w = w * jnp.where(barge & (now == 1), barge_in_weight, 1.0)
  n = jnp.maximum(jnp.sum(w), 1.0)
  # log(1 + e^x) - y x: the stable form of BCE with logits.
  bce = jax.nn.softplus(speak_logits_BC) - y * speak_logits_BC
  correct = ((speak_logits_BC > 0) == (y > 0.5)).astype(jnp.float32)
  m = jnp.maximum(jnp.sum(mask), 1.0)
  onset = mask * (1 - now) * y
  return dict(speak=jnp.sum(bce * w) / n, speak_acc=jnp.sum(correct * mask) / m,
              speak_p=jnp.sum(jax.nn.sigmoid(speak_logits_BC) * mask) / m,
              speak_onset_acc=jnp.sum(correct * onset) / jnp.maximum(jnp.sum(onset), 1.0))


def background_terms(bg, hidden_BLD, meta: TokenMeta, batch, window, num_chunks: int) -> dict:
  """Teacher-forced cross-entropy of the background targets over the context each
  delegating chunk could see (with history_chunks > 0, the row's pooled history of the
  chunks before its window too), one decoder pass for every slot: {"background": (loss,
  target tokens) of the delegations, "heard": the same of the heard targets (bg_kind 1)},
  each 0 when the batch has none."""
  tokens, target = jnp.asarray(batch["bg_in"]), jnp.asarray(batch["bg_target"])
  mask = jnp.asarray(batch["bg_mask"]) & (jnp.asarray(batch["bg_chunk"]) >= 0)[..., None]
  kind = jnp.asarray(batch["bg_kind"]) if "bg_kind" in batch else jnp.zeros(
      batch["bg_chunk"].shape, jnp.int32)
  hist, hist_chunk = (pool_history(hidden_BLD, meta, num_chunks)
                      if bg.cfg.history_chunks > 0 else (None, None))
  ctx, ctx_mask, pos = read_context(bg.cfg, hidden_BLD, meta, jnp.asarray(batch["bg_chunk"]),
                                    window, hist, hist_chunk)
  ce = cross_entropy(bg(tokens, ctx, ctx_mask, pos), target)
  out = {}
  for name, k in (("background", 0), ("heard", 1)):
    m = mask & (kind == k)[..., None]
    n = jnp.sum(m).astype(jnp.float32)
    out[name] = (jnp.sum(ce * m) / jnp.maximum(n, 1.0), n)
  return out


def background_loss(bg, hidden_BLD, meta: TokenMeta, batch, window, num_chunks: int):
  """(loss, number of target tokens) of the delegations alone (`background_terms`)."""
  return background_terms(bg, hidden_BLD, meta, batch, window, num_chunks)["background"]


def background_other_conversation(bg, hidden_BLD, meta: TokenMeta, batch, window,
                                  num_chunks: int) -> dict:
  """`background_terms` with each row's delegations reading the next row's conversation (its
  hidden states, token metadata and history: the batch rolled by one), the targets kept.
  Against `background_loss` it says how much the background model's calls and answers
  depend on what it reads: equal losses mean it writes the same call whatever was asked.
  (Two rows of a batch can be crops of one conversation: the gap is a lower bound.)"""
  roll = lambda x: jnp.roll(x, 1, axis=0)
  return background_terms(bg, roll(hidden_BLD), TokenMeta(*(roll(f) for f in meta)), batch,
                          window, num_chunks)


def losses_from_output(model, out, batch, rng, weights, *,
                       other_conversation: bool = False) -> tuple[jnp.ndarray, dict]:
  """(weighted total, every term) of a forward pass `out = model(batch)` already run; with
  `other_conversation` (validation), also `background_other_conversation`."""
  lay = model.cfg.layout
  chunk_valid_BC = lay.unpack(jnp.asarray(batch["meta"].valid)[..., None],
                              Segment.MODEL_TEXT)[:, :, 0, 0]
  metrics = text_terms(out.text_logits, jnp.asarray(batch["model_text_target"]), chunk_valid_BC)
  metrics["audio"] = audio_loss(model, out.audio_cond, batch, rng)
  # MoE aux losses are computed inside the routers (they need the router probabilities).
  metrics["balance"] = out.aux.get("balance", jnp.zeros(()))
  metrics["z"] = out.aux.get("z", jnp.zeros(()))
  metrics["background"] = metrics["heard"] = jnp.zeros(())
  if getattr(model, "background", None) is not None and "bg_chunk" in batch:
    args = (model.background, out.hidden, TokenMeta(*(jnp.asarray(f) for f in batch["meta"])),
            batch, model.cfg.window, chunk_valid_BC.shape[1])
    terms = background_terms(*args)
    metrics["background"], metrics["background_tokens"] = terms["background"]
    if "bg_kind" in batch:
      metrics["heard"], metrics["heard_tokens"] = terms["heard"]
    if other_conversation and out.hidden.shape[0] > 1:
      other = background_other_conversation(*args)
      metrics["background_other"] = other["background"][0]
      if "bg_kind" in batch:
        metrics["heard_other"] = other["heard"][0]
  metrics["speak"] = jnp.zeros(())
  if out.speak_logits is not None and "speak_target" in batch:
    metrics.update(speak_terms(out.speak_logits, batch,
                               weights.get("speak_transition", 1.0),
                               weights.get("speak_pause", 1.0),
                               weights.get("speak_barge_in", 1.0)))
  total = sum(weights.get(k, 0.0) * metrics[k] for k in TERMS)
  metrics["loss"] = total
  return total, metrics


def compute_losses(model, batch, rng, weights) -> tuple[jnp.ndarray, dict]:
  """Forward pass and every loss term: (weighted total, metrics)."""
  return losses_from_output(model, model(batch), batch, rng, weights)


def sampled_audio_l1(model, audio_cond_BCAD, batch, rng, steps: int):
  """Mean |log10 mel| error of Euler samples against the targets (an interpretable number,
  with the per-channel-median predictor as its trivial baseline)."""
  B, C, A, D = audio_cond_BCAD.shape
  x = model.flow.sample(audio_cond_BCAD.reshape(-1, D), rng, steps)
  pred = denormalize_mel(x).reshape(B, C, A, -1)
  target = jnp.asarray(batch["audio_target"], jnp.float32)
  w = audio_weight(batch, model.cfg.speak_gate).astype(jnp.float32)[..., None, None]
  n = jnp.maximum(jnp.sum(w) * A * target.shape[-1], 1.0)
  return jnp.sum(jnp.abs(pred - target) * w) / n
