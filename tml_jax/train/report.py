"""The end-of-run report writer: numbers in, files out.

Writes W/report.md, W/report.json and W/loss_curves.png from the validation metrics, the
trivial baselines and the decoded samples that tml_jax.train.loop computes, plus the logged
curves of W/metrics.jsonl. It runs nothing on a device and imports no trainer code.
"""

from __future__ import annotations

import json
import math
import os

from tml_jax import paths
from tml_jax import probe as probe_lib
from tml_jax.text import tokenizer as tok
from tml_jax.train.losses import PER_TARGET


def read_metrics(workdir: str) -> list[dict]:
  """The records of W/metrics.jsonl (one per logged step), [] before the first."""
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def plot_curves(rows: list[dict], path: str) -> str:
  from matplotlib.figure import Figure  # no pyplot: a notebook's backend is left alone
  panels = [("text cross-entropy (nats)", {"text": ""}), ("flow-matching loss", {"audio": ""}),
            ("MoE balance loss", {"balance": ""}),
            ("sampled mel L1 (log10)", {"audio_l1": ""}),
            # The gap between the two validation curves: how much the background model's
            # calls depend on the conversation it reads (report.markdown).
            ("background cross-entropy (nats/token)",
             {"background": "", "background_other": ", another conversation"})]
  if any(r.get("heard_tokens") for r in rows):  # background.heard_targets
    panels.append(("heard cross-entropy (nats/byte)",
                   {"heard": "", "heard_other": ", another conversation"}))
  fig = Figure(figsize=(4 * len(panels), 3.2), dpi=110)
  axes = fig.subplots(1, len(panels))
  for ax, (title, keys) in zip(axes, panels):
    for i, (k, what) in enumerate(keys.items()):
      # A step whose batch held none of a per-target term's targets logged 0: not a point.
      count = PER_TARGET.get(k)
      for prefix, style in (("", "-"), ("val_", "o-" if i == 0 else "s--")):
        pts = [(r["step"], r[prefix + k]) for r in rows
               if prefix + k in r and (count is None or r.get(prefix + count) != 0)]
        if pts:
          label = ("train" if not prefix else "validation") + what
          ax.plot(*zip(*pts), style, label=label, ms=3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  paths.save_figure(fig, path)
  return path


def markdown(variant: str, step: int, val: dict, base: dict, first: dict,
             samples: list[str]) -> list[str]:
  return [
      f"# Training report ({variant})", "",
      f"steps: {step}; curves: `loss_curves.png`", "",
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
      f"| MoE balance loss | {val['balance']:.3f} | 1.0 = perfectly uniform |",
      *_background_rows(val), *_delegate_rows(val), "",
      "Decoded text (teacher-forced, greedy) on a validation conversation:", "", "```",
      *samples, "```", ""]


def _background_rows(val: dict) -> list[str]:
  """The background model's teacher-forced loss on the conversation it was asked in, against
  the same targets read from another row's conversation (tml_jax.train.losses.
  background_other_conversation): no gap, no use of what was asked. The heard targets
  likewise: no gap, the user's words are not in the hidden states the background reads."""
  rows = []
  for key, what in (("background", "background cross-entropy (nats/token)"),
                    ("heard", "heard: the user's words, cross-entropy (nats/byte)")):
    if f"{key}_other" in val and val.get(f"{key}_tokens", 1):
      rows.append(f"| {what}, its own conversation | {val[key]:.3f} | "
                  f"{val[key + '_other']:.3f} (another row's conversation; gap "
                  f"{val[key + '_other'] - val[key]:+.3f}) |")
  return rows


def _delegate_rows(val: dict) -> list[str]:
  """DELEGATE, teacher-forced: how often greedy decoding (the engine's) emits it where the
  corpus does and where it does not (tml_jax.train.losses.text_terms)."""
  if "delegate_acc" not in val:
    return ["| DELEGATE emitted at its targets | no DELEGATE in these validation batches | – |"]
  return [f"| DELEGATE emitted at its targets (greedy) | {val['delegate_acc']:.3f} | 0 |",
          f"| DELEGATE cross-entropy at its targets | {val['delegate']:.3f} | "
          f"{math.log(tok.VOCAB_SIZE):.3f} (uniform) |",
          f"| DELEGATE emitted at other text targets (share) | {val['delegate_false']:.5f} "
          "| 0 |", *_delegate_calibration_rows(val)]


def _delegate_calibration_rows(val: dict) -> list[str]:
  """The serving DELEGATE threshold (W/delegate_threshold.json) and what it does with the
  model running free (tml_jax.probe.calibrate_delegate_free_running)."""
  if "delegate_calibration_recall" not in val:
    return []
  n = val.get("delegate_calibration_conversations", 0)
  return [f"| DELEGATE threshold for serving (running free, {n:.0f} validation "
          f"conversations) | {val['delegate_calibration_threshold']:.4f} | 1 (plain decoding) |",
          f"| delegations where the gate-open P(DELEGATE) reaches it within 3 chunks | "
          f"{val['delegate_calibration_recall']:.3f} "
          f"(of {val['delegate_calibration_targets']:.0f}) | 0 |",
          f"| gate-open chunks away from one that reach it (false) | "
          f"{val['delegate_calibration_false_rate']:.4f} "
          f"(of {val['delegate_calibration_negative_chunks']:.0f}) | 0 |",
          *_background_link_rows(val)]


def _background_link_rows(val: dict) -> list[str]:
  """The background model with delegations forced on time (tml_jax.probe.
  background_at_delegations): how far down the chain its calls get."""
  n = val.get("background_link_n", 0)
  if not n:
    return []
  said = {"ended": "calls that end (SEP)", "tool": "calls naming the corpus' tool",
          "args": "... with the corpus' args, exactly", "ran": "tool ran without error",
          "answer": "background answer is the corpus' result, exactly"}
  rows = [f"| background model, delegations forced on time: {what} | "
          f"{val[f'background_link_{k}']:.0f} of {n:.0f} | 0 |" for k, what in said.items()]
  typed = val.get("background_link_typed_n", 0)
  if typed:
    rows += [f"| ... typed questions only: {what} | {val[f'background_link_typed_{k}']:.0f} "
             f"of {typed:.0f} | 0 |" for k, what in (("tool", said["tool"]),
                                                     ("args", said["args"]))]
  return rows


def probe_markdown(probes: dict, png: str | None) -> list[str]:
  if not probes:
    return []
  return ["## Speak-decision probe", "",
          "P(the model speaks in chunk t+1) by condition on validation conversations, against "
          "the truth (does the model channel hold speech then). Teacher-forced: the model "
          "hears the corpus' audio as its own; free-running: it hears what it generated.", "",
          probe_lib.table_md(probes), "", *calibration_lines(probes),
          f"![probe]({os.path.basename(png)})" if png else "", ""]


def calibration_lines(probes: dict) -> list[str]:
  c = probes.get("teacher-forced", {}).get("calibration")
  if not c or c.get("onset_recall") is None:
    return []
  return [f"Serving threshold calibrated on these chunks (W/speak_threshold.json): "
          f"{c['threshold']:.3f}, where {c['false_onset_rate']:.1%} of the {c['silent_chunks']} "
          f"chunks in which the model should stay silent would start speech, and "
          f"{c['onset_recall']:.1%} of the {c['onsets']} true onsets do.", ""]


def probe_history(rows: list[dict]) -> list[dict]:
  """[{step, probe: {condition: {p_speak}}}] from the validation rows of metrics.jsonl."""
  out = []
  for r in rows:
    conds = {c: dict(p_speak=r[f"val_probe_{c}"]) for c in probe_lib.CONDITIONS
             if f"val_probe_{c}" in r}
    if conds:
      out.append(dict(step=r["step"], probe=conds))
  return out


def write_report(workdir: str, *, variant: str, step: int, validation: dict, baselines: dict,
                 samples: list[str], rows: list[dict], probes: dict | None = None) -> dict:
  """Writes the three files; returns dict(report=..., report_md=path, curves=path|None).

  validation: tml_jax.train.loop.evaluate's means; baselines: loop.baselines; samples:
  decoded lines; rows: read_metrics(workdir); probes: {"teacher-forced": summary, ...}
  of tml_jax.probe (also written as speak_probe.png, with P(speak) against steps).
  """
  png = plot_curves(rows, paths.join(workdir, "loss_curves.png")) if rows else None
  first = next((r for r in rows if "text" in r), {})
  report = dict(validation=validation, baselines=baselines, first_logged=first,
                samples=samples, speak_probe=probes or {})
  probe_png = (probe_lib.plot_probe(probes, paths.join(workdir, "speak_probe.png"),
                                    probe_history(rows)) if probes else None)
  paths.write_json(paths.join(workdir, "report.json"), report)
  md = markdown(variant, step, validation, baselines, first, samples)
  md += probe_markdown(probes, probe_png)
  paths.write_text(paths.join(workdir, "report.md"), "\n".join(md))
  print("\n".join(md[:12]), flush=True)
  return dict(report=report, report_md=paths.join(workdir, "report.md"), curves=png)
