"""The end-of-run report: loss curves, validation losses against trivial baselines, and a few
decoded outputs. Writes W/report.md, W/report.json and W/loss_curves.png."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from tml_jax.text import tokenizer as tok


def _read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(rows: list[dict], path: str) -> str | None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = [("text", "text cross-entropy (nats)"), ("audio", "flow-matching loss"),
          ("balance", "MoE balance loss"), ("audio_l1", "sampled mel L1 (log10)")]
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), dpi=110)
  for ax, (k, title) in zip(axes, keys):
    for prefix, style in (("", "-"), ("val_", "o-")):
      pts = [(r["step"], r[prefix + k]) for r in rows if prefix + k in r]
      if pts:
        ax.plot(*zip(*pts), style, label="train" if not prefix else "validation", ms=3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def baselines(make_val, num_batches: int, model_text_slots: int) -> dict:
  """Trivial predictors on the validation batches the model is scored on."""
  it = iter(make_val())
  counts = np.zeros(tok.VOCAB_SIZE)
  mels, masks = [], []
  for _ in range(num_batches):
    b = next(it)
    valid_chunk = np.asarray(b["meta"][4]).any(-1)[:, None]
    t = np.asarray(b["model_text_target"])
    keep = (t != tok.PAD)
    counts += np.bincount(t[keep], minlength=tok.VOCAB_SIZE)
    mels.append(np.asarray(b["audio_target"]))
    masks.append(np.asarray(b["audio_mask"]) & valid_chunk)
  p = counts / max(counts.sum(), 1)
  entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
  mel = np.concatenate(mels)
  mask = np.concatenate(masks)
  sel = mel[mask]  # [n, A, fpq*80]
  sel = sel.reshape(-1, 80)
  median = np.median(sel, axis=0, keepdims=True)  # the best constant under L1
  return dict(text_unigram_ce=entropy, text_majority_acc=float(p.max()),
              audio_l1_channel_median=float(np.abs(sel - median).mean()),
              audio_l1_silence=float(np.abs(sel - (-7.0)).mean()))


def decoded_samples(setup, state, make_val, max_lines: int = 24) -> list[str]:
  """Teacher-forced greedy text predictions next to the targets, chunk by chunk."""
  batch = next(iter(make_val()))
  from tml_jax.trainer import to_global
  model = setup.model(state["params"])
  out = jax.jit(lambda b: model(b).text_logits)(to_global(batch, setup.batch_sharding))
  # The first local example lives on this process's first shard (batch is sharded by process).
  pred = np.asarray(jnp.argmax(out.addressable_data(0), -1))[0]
  target = np.asarray(batch["model_text_target"])[0]
  chunk_s = setup.config.layout.chunk_ms / 1000
  t = tok.ByteTokenizer()
  lines = []
  for c in range(target.shape[0]):
    tgt = t.decode(target[c][target[c] != tok.PAD], show_special=True).replace("<eot>", "")
    prd = t.decode(pred[c][:max(int(np.sum(target[c] != tok.PAD)), 1)],
                   show_special=True).replace("<eot>", "")
    if tgt or prd:
      lines.append(f"chunk {c:3d} (t={(c + 1) * chunk_s:5.1f}s) target {tgt!r:24} "
                   f"predicted {prd!r}")
  return lines[:max_lines]


def write_report(setup, state, make_val, workdir: str) -> dict:
  from tml_jax.trainer import evaluate
  tc = setup.config.train
  val = evaluate(setup, state, make_val, tc.eval_batches)
  base = baselines(make_val, tc.eval_batches, setup.cfg.layout.model_text)
  rows = _read_metrics(workdir)
  png = (plot_curves(rows, os.path.join(workdir, "loss_curves.png"))
         if rows and jax.process_index() == 0 else None)
  samples = decoded_samples(setup, state, make_val)
  first = next((r for r in rows if "text" in r), {})
  report = dict(validation=val, baselines=base, first_logged=first, samples=samples)
  if jax.process_index() != 0:
    return dict(report=report)
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  md = [f"# Training report ({setup.config.variant})", "",
        f"steps: {int(state['step'])}; curves: `loss_curves.png`", "",
        "| metric | validation | trivial baseline |", "|---|---|---|",
        f"| text cross-entropy (nats) | {val['text']:.3f} | {base['text_unigram_ce']:.3f} "
        "(unigram) |",
        f"| text accuracy | {val['text_acc']:.3f} | {base['text_majority_acc']:.3f} "
        "(majority token) |",
        f"| text accuracy on bytes | {val['text_byte_acc']:.3f} | 0 |",
        f"| sampled mel L1 (log10) | {val['audio_l1']:.3f} | "
        f"{base['audio_l1_channel_median']:.3f} (per-channel median), "
        f"{base['audio_l1_silence']:.3f} (silence) |",
        f"| flow-matching loss | {val['audio']:.3f} | {first.get('audio', float('nan')):.3f} "
        "(first logged train step) |",
        f"| MoE balance loss | {val['balance']:.3f} | 1.0 = perfectly uniform |", "",
        "Decoded text (teacher-forced, greedy) on a validation conversation:", "", "```",
        *samples, "```", ""]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(md))
  print("\n".join(md[:12]), flush=True)
  return dict(report=report, report_md=os.path.join(workdir, "report.md"), curves=png)
