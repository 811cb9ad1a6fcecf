"""The ablation table and plots (`tml_jax.ablate`): table.md, table.json and one
plot_<family>.png per metric family, every figure mean ± std over seeds."""

from __future__ import annotations

import json
import os
import platform

import numpy as np

# Behaviour columns in the table: the voice-scored metrics a reader compares first.
BEHAVIOUR_COLUMNS = (
    ("turn_taking:tor", "turn-taking TOR ↑"), ("turn_taking:latency_s", "turn-taking latency s"),
    ("pause_handling:tor", "pause TOR ↓"), ("backchannel:tor", "backchannel TOR ↓"),
    ("backchannel:freq", "backchannel freq"),
    ("user_interruption:tor", "interruption TOR ↑"),
    ("user_interruption:latency_s", "interruption latency s"))
LOSS_COLUMNS = (("text", "val text CE"), ("text_byte_acc", "byte acc"),
                ("audio_l1", "mel L1"), ("speak", "speak CE"), ("background", "bg CE"))
PROBE_COLUMNS = (("p_speak_user_speaking", "P(speak) user"), ("p_speak_pause", "P(speak) pause"),
                 ("p_speak_after_turn_end", "P(speak) turn end"), ("threshold", "threshold"))
COST_COLUMNS = (("total_params", "params"), ("active_params", "active"),
                ("forward_flops_per_token", "fwd FLOPs/token"), ("steps", "steps"),
                ("steps_per_s", "steps/s"), ("train_min", "train min"))


def _stats(values):
  vals = [float(v) for v in values if v is not None and np.isfinite(float(v))]
  if not vals:
    return None
  return dict(mean=float(np.mean(vals)), std=float(np.std(vals)), n=len(vals))


def aggregate(rows: list[dict], variants: list[str]) -> dict:
  """{variant: {family: {metric: {mean, std, n}}}} over seeds."""
  out = {}
  for v in variants:
    mine = [r for r in rows if r["variant"] == v]
    fam = {}
    for family in ("behaviour", "losses", "probe", "cost"):
      keys = sorted({k for r in mine for k in r[family]})
      fam[family] = {k: _stats([r[family].get(k) for r in mine]) for k in keys}
    out[v] = fam
  return out


def _fmt(s, key: str) -> str:
  if s is None:
    return "–"
  m = s["mean"]
  if key.endswith("params"):
    text = f"{m / 1e6:.2f} M"
  elif "flops" in key:
    text = f"{m / 1e6:.1f} M"
  elif key == "steps":
    text = f"{m:.0f}"
  else:
    text = f"{m:.3f}" if abs(m) < 100 else f"{m:.0f}"
  if s["n"] > 1:
    spread = s["std"] / 1e6 if key.endswith("params") or "flops" in key else s["std"]
    text += f" ± {spread:.3f}" if spread < 100 else f" ± {spread:.0f}"
  return text


def markdown(name: str, settings: dict, agg: dict, variants: list[str]) -> str:
  lines = [f"# Ablation `{name}`", "",
           f"{len(variants)} variants x {settings['seeds']} seed(s); at most "
           f"{settings['steps']} steps or {settings['budget_min']:g} min of training each; "
           f"behaviour voice-scored (ASR of output.wav) on {settings['eval_per_task']} test "
           f"sample(s) per task. Machine: {platform.machine()}, {os.cpu_count()} cores. "
           "Mean ± std over seeds where K > 1.", ""]
  for title, family, cols in (("Behaviour (Full-Duplex-Bench rules)", "behaviour",
                               BEHAVIOUR_COLUMNS),
                              ("Validation", "losses", LOSS_COLUMNS),
                              ("Speak-decision probe (teacher-forced)", "probe", PROBE_COLUMNS),
                              ("Cost", "cost", COST_COLUMNS)):
    lines += [f"## {title}", "", "| variant | " + " | ".join(c[1] for c in cols) + " |",
              "|---|" + "---|" * len(cols)]
    for v in variants:
      lines.append(f"| {v} | " + " | ".join(_fmt(agg[v][family].get(k), k) for k, _ in cols)
                   + " |")
    lines.append("")
  return "\n".join(lines)


def plot(path: str, family: str, agg: dict, variants: list[str], columns):
  """One panel per metric, a bar per variant with its seed spread."""
  from matplotlib.figure import Figure  # no pyplot: no global backend switch
  cols = [(k, label) for k, label in columns
          if any(agg[v][family].get(k) for v in variants)]
  if not cols:
    return None
  fig = Figure(figsize=(2.6 * len(cols) + 1, 3.2), dpi=100)
  axes = fig.subplots(1, len(cols), squeeze=False)[0]
  x = np.arange(len(variants))
  for ax, (k, label) in zip(axes, cols):
    s = [agg[v][family].get(k) for v in variants]
    ax.bar(x, [0 if a is None else a["mean"] for a in s],
           yerr=[0 if a is None else a["std"] for a in s], color="#3182bd", capsize=3)
    ax.set_title(label, fontsize=9)
    ax.set_xticks(x, variants, rotation=30, ha="right", fontsize=7)
  fig.suptitle(family, fontsize=10)
  fig.subplots_adjust(bottom=0.35, top=0.82, wspace=0.45)
  fig.savefig(path)
  return path


def write(workdir: str, name: str, settings: dict, rows: list[dict], variants: list[str]) -> dict:
  agg = aggregate(rows, variants)
  files = dict(md=os.path.join(workdir, "table.md"), json=os.path.join(workdir, "table.json"))
  with open(files["json"], "w") as f:
    json.dump(dict(grid=name, settings=settings, variants=agg, runs=rows), f, indent=1)
  md = markdown(name, settings, agg, variants)
  with open(files["md"], "w") as f:
    f.write(md)
  for family, cols in (("behaviour", BEHAVIOUR_COLUMNS), ("losses", LOSS_COLUMNS),
                       ("probe", PROBE_COLUMNS), ("cost", COST_COLUMNS)):
    p = plot(os.path.join(workdir, f"plot_{family}.png"), family, agg, variants, cols)
    if p:
      files[family] = p
  print(md, flush=True)
  return files
