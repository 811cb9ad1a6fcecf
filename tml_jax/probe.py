"""The speak-decision probe: P(the model speaks in chunk t+1), split by conversational
condition, against the truth (does the model's channel hold speech then?).

This number moves long before the Full-Duplex-Bench scores do, so every model change is
judged by it first. Conditions are read from the corpus annotations at the decision time
tau = (t+1) * chunk_s (the end of chunk t, when chunk t+1's audio is decided):

  user_speaking     tau inside a user word (the model should mostly keep quiet)
  pause             tau inside a mid-utterance pause of the user (keep quiet)
  after_turn_end    0-1 s after the user's turn ended (take the turn, after a short gap)
  barge_in          the user barges in while the model talks (stop within 0.2-0.4 s)
  user_backchannel  a user "mm-hmm" while the model talks (keep talking)

A chunk matching several takes the first in that list read bottom up (barge_in wins over
user_speaking). Chunks matching none are "other". The labels themselves are built with
the training rows (tml_jax.data.speak_labels); this module measures and draws.
"""

from __future__ import annotations

import json

import numpy as np

from tml_jax import paths
from tml_jax.data.speak_labels import CONDITIONS, _text, chunk_conditions, voiced_chunks
from tml_jax.text import tokenizer as tok

__all__ = ["CONDITIONS", "chunk_conditions", "voiced_chunks", "summarize", "table_md",
           "plot_probe", "teacher_forced", "teacher_forced_probe", "free_running",
           "free_running_on_validation", "engine_from_params", "calibrate_threshold",
           "calibrate_delegate_threshold", "calibrate_delegate_free_running",
           "background_at_delegations", "max_false_onsets"]
# Which way the truth mostly goes, for reading the table (not used in any computation).
EXPECTED = {"user_speaking": "silent", "pause": "silent", "after_turn_end": "speak",
            "barge_in": "stop", "user_backchannel": "speak"}

def summarize(p_N, truth_N, cond_N, valid_N=None, threshold: float = 0.5,
              now_N=None) -> dict:
  """Per condition: chunks, truth rate, mean P(speak), accuracy of P >= threshold, and the
  mean P(speak) on chunks whose truth is speech / silence. With `now_N` (does the model
  speak in chunk t itself), also "p_silent_now": the mean P(speak) where the model is
  silent, i.e. the decision to *start*. That is the number to read for pauses and turn
  ends: a condition's mean mixes it with chunks where the model already talks."""
  p, y = np.asarray(p_N, np.float64).ravel(), np.asarray(truth_N, bool).ravel()
  c = np.asarray(cond_N).ravel()
  v = np.ones_like(y) if valid_N is None else np.asarray(valid_N, bool).ravel()
  now = None if now_N is None else np.asarray(now_N, bool).ravel()
  out = {}
  for i, name in enumerate(CONDITIONS):
    m = v & (c == i)
    if not m.any():
      continue
    pm, ym = p[m], y[m]
    out[name] = dict(
        chunks=int(m.sum()), truth_speak=float(ym.mean()), p_speak=float(pm.mean()),
        accuracy=float(((pm >= threshold) == ym).mean()),
        p_when_speech=float(pm[ym].mean()) if ym.any() else None,
        p_when_silent=float(pm[~ym].mean()) if (~ym).any() else None)
    if now is not None:
      quiet = m & ~now
      out[name]["p_silent_now"] = float(p[quiet].mean()) if quiet.any() else None
  m = v.astype(bool)
  out["all"] = dict(chunks=int(m.sum()), truth_speak=float(y[m].mean()),
                    p_speak=float(p[m].mean()),
                    accuracy=float(((p[m] >= threshold) == y[m]).mean()))
  return out


def table_md(probes: dict[str, dict]) -> str:
  """A markdown table; `probes` maps a column group name (e.g. "teacher-forced") to a
  `summarize` result."""
  groups = list(probes)
  # "silent now": P(speak) where the model is silent in chunk t, the decision to start.
  quiet = [g for g in groups if any(isinstance(r, dict) and r.get("p_silent_now") is not None
                                    for r in probes[g].values())]
  head = "| condition | expected | chunks | truth P(speak) | " + " | ".join(
      f"{g}: P(speak) | {g}: accuracy" for g in groups) + "".join(
      f" | {g}: P(speak) when silent now" for g in quiet) + " |"
  lines = [head, "|" + "---|" * (4 + 2 * len(groups) + len(quiet))]
  for name in (*CONDITIONS[1:], "other", "all"):
    ref = next((probes[g][name] for g in groups if name in probes[g]), None)
    if ref is not None and "chunks" not in ref:
      continue
    if ref is None:
      continue
    cells = [name, EXPECTED.get(name, ""), str(ref["chunks"]), f"{ref['truth_speak']:.2f}"]
    for g in groups:
      r = probes[g].get(name)
      cells += ([f"{r['p_speak']:.2f}", f"{r['accuracy']:.2f}"] if r else ["", ""])
    for g in quiet:
      q = (probes[g].get(name) or {}).get("p_silent_now")
      cells.append("" if q is None else f"{q:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_probe(probes: dict[str, dict], path: str, history: list[dict] | None = None) -> str:
  """Bars of P(speak) against the truth per condition; with `history` ([{step, probe}]),
  a second panel of P(speak) per condition against training steps."""
  from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone
  names = [n for n in CONDITIONS[1:] if any(n in p for p in probes.values())]
  fig = Figure(figsize=(11 if history else 6.5, 3.8), dpi=110)
  ax = fig.add_subplot(1, 2 if history else 1, 1)
  x = np.arange(len(names))
  width = 0.8 / (len(probes) + 1)
  truth = [next(p[n]["truth_speak"] for p in probes.values() if n in p) for n in names]
  ax.bar(x - 0.4 + width / 2, truth, width, color="#bbbbbb", label="truth")
  for i, (g, p) in enumerate(probes.items()):
    ax.bar(x - 0.4 + width * (i + 1.5), [p.get(n, {}).get("p_speak", np.nan) for n in names],
           width, label=g)
  ax.set_xticks(x, [n.replace("_", "\n") for n in names], fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("P(speak in chunk t+1)")
  ax.legend(fontsize=7)
  ax.set_title("speak-decision probe")
  if history:
    ax2 = fig.add_subplot(1, 2, 2)
    steps = [h["step"] for h in history]
    for n in names:
      ax2.plot(steps, [h["probe"].get(n, {}).get("p_speak", np.nan) for h in history],
               marker="o", ms=3, label=n)
    ax2.set_xlabel("training step")
    ax2.set_ylim(0, 1)
    ax2.set_title("P(speak) per condition (teacher-forced, validation)")
    ax2.legend(fontsize=7)
  fig.tight_layout()
  return paths.save_figure(fig, path)


def teacher_forced(speak_logits_BC, batch) -> tuple[np.ndarray, ...]:
  """(p, truth, condition, valid, now) flattened from a forward pass over a batch; `now`:
  does the model channel hold speech in chunk t itself."""
  logits = np.asarray(speak_logits_BC, np.float64)
  p = 1.0 / (1.0 + np.exp(-logits))
  return (p.ravel(), np.asarray(batch["speak_target"]).ravel(),
          np.asarray(batch["speak_condition"]).ravel(), np.asarray(batch["audio_mask"]).ravel(),
          np.asarray(batch["speak_now"]).ravel())


def calibrate_threshold(p_N, truth_N, now_N, valid_N, cond_N=None, *,
                        max_false_onsets: float = 0.01, lo: float = 0.05,
                        hi: float = 0.95) -> dict:
  """The speak threshold for serving, from teacher-forced validation chunks where the model
  is silent: the lowest threshold at which at most `max_false_onsets` of the chunks where
  it should stay silent would start speech. Chunks 0-1 s after a user's turn ended do not
  count as such (`cond_N`): starting there is a reply, at worst an early one, and the corpus'
  own start time within that window is random.

  Why not 0.5: the corpus starts a reply 0.2-0.6 s after the turn end, so even a calibrated
  model gives each of those chunks only a share of the onset (a hazard of ~1/3, 1/2, 1),
  and a 0.5 threshold answers late or never. Why bound the false onsets: one false start
  in a pause is a taken turn (a model that hears itself speaking keeps speaking).
  Returns dict(threshold, onset_recall, false_onset_rate, onsets, silent_chunks).
  """
  p, y = np.asarray(p_N, np.float64), np.asarray(truth_N, bool)
  now, v = np.asarray(now_N, bool), np.asarray(valid_N, bool)
  stay = v & ~now & ~y
  if cond_N is not None:
    stay &= np.asarray(cond_N) != CONDITIONS.index("after_turn_end")
  onset = v & ~now & y
  if not stay.any() or not onset.any():
    return dict(threshold=0.5, onset_recall=None, false_onset_rate=None,
                onsets=int(onset.sum()), silent_chunks=int(stay.sum()))
  # Just above the (n-k)-th smallest negative: at most k = floor(share * n) reach it.
  neg = np.sort(p[stay])
  k = int(np.floor(max_false_onsets * neg.size))
  thr = float(np.clip(np.nextafter(neg[neg.size - k - 1], np.inf), lo, hi))
  return dict(threshold=thr, onset_recall=float((p[onset] >= thr).mean()),
              false_onset_rate=float((p[stay] >= thr).mean()), onsets=int(onset.sum()),
              silent_chunks=int(stay.sum()))


def _mic(record) -> np.ndarray:
  """A corpus record's microphone channel as float audio for the engine."""
  return np.asarray(record["user_wav"], np.float32) / 32768.0


def _typed(record) -> list[tuple[float, str]]:
  """What the user typed in a corpus record, fed to the engine as TEXT_IN as the evaluation
  feeds a sample's (`serve.inputs.typed_text`)."""
  from tml_jax.serve.inputs import typed_text
  return typed_text(json.loads(_text(record["events_json"])))


def _delegation_chunk(event: dict, chunk_s: float) -> int:
  """The micro-turn that should emit a corpus delegation: the one before its start."""
  return int(np.floor(float(event["start_s"]) / chunk_s + 1e-9)) - 1


def free_running(engine, records, *, chunk_s: float, max_s: float | None = None) -> dict:
  """The probe with the model hearing its own generated audio as SELF_AUDIO: each record's
  microphone channel goes through the streaming engine (offline clock), and each chunk's
  P(speak) is compared with what the corpus' model channel did then."""
  ps, ys, cs, nows = [], [], [], []
  for record in records:
    wav = _mic(record)
    if max_s:
      wav = wav[:int(max_s * 16000)]
    res = engine.run_wav(wav, text_at_s=_typed(record))
    total = res["num_chunks"]
    F = engine.lay.user_audio
    mel = np.asarray(record["model_mel"], np.float32)[:total * F]
    mel = np.concatenate([mel, np.full((total * F - len(mel), mel.shape[-1]), -7.0,
                                       np.float32)]).reshape(total, F, -1)
    truth = np.concatenate([voiced_chunks(mel)[1:], [False]])
    ps.append([r.p_speak for r in res["records"]][:total - 1])
    ys.append(truth[:total - 1])
    cs.append(chunk_conditions(record, total, chunk_s)[:total - 1])
    # Chunk t sounds with what the gate let through at t-1.
    nows.append([False] + [r.spoke for r in res["records"]][:total - 2])
  return summarize(np.concatenate(ps), np.concatenate(ys), np.concatenate(cs),
                   threshold=engine.speak_threshold, now_N=np.concatenate(nows))


def calibrate_delegate_threshold(p_del_BCT, target_BCT, mask_BCT, *,
                                 max_false: float = 0.002, lo: float = 0.01,
                                 tolerance: int = 2, speak_BC=None) -> dict:
  """A DELEGATE threshold for serving (serve.delegate_threshold="auto") from P(DELEGATE)
  per text slot, its targets and the slots scored (`calibrate_delegate_free_running`
  feeds it one slot per chunk).

  The engine emits DELEGATE at the first slot of a chunk whose P(DELEGATE) reaches the
  threshold, so a chunk counts by its highest scored slot. A delegation `tolerance` chunks
  early or late is still one (the corpus' own DELEGATE time follows a random reply
  latency): a target counts as recalled when a chunk that near it reaches the threshold,
  and those chunks are not negatives. The threshold is the lowest at which at most
  `max_false` of the other scored chunks would emit one (never below `lo`: a few hundred
  chunks cannot vouch for less). With `speak_BC` (the speak gate's targets) only chunks
  where the model speaks next are negatives: the engine lets DELEGATE through the gate
  alone, and P(DELEGATE) is high while a question is heard, when the gate is shut. Why a
  threshold at all: DELEGATE is about one text target in 2000, so a model that gives it a
  tenth of the mass where it belongs (CE ~2.3) still never emits it by argmax.
  Returns dict(threshold, recall (share of the DELEGATE targets recalled), false_rate,
  targets, negative_chunks); threshold 1.0 (plain decoding) without targets.
  """
  p = np.asarray(p_del_BCT, np.float64)
  mask = np.asarray(mask_BCT, bool)
  is_del = (mask & (np.asarray(target_BCT) == tok.DELEGATE)).any(-1)  # [B, C]
  score = np.where(mask, p, 0.0).max(-1)  # per chunk: its most likely slot
  B, C = score.shape
  near = np.zeros((B, C), bool)
  for b, c in zip(*np.nonzero(is_del)):
    near[b, max(0, c - tolerance):c + tolerance + 1] = True
  neg = mask.any(-1) & ~near
  if speak_BC is not None:
    neg &= np.asarray(speak_BC, bool)
  targets = list(zip(*np.nonzero(is_del)))
  if not targets or not neg.any():
    return dict(threshold=1.0, recall=None, false_rate=None, targets=len(targets),
                negative_chunks=int(neg.sum()))
  sorted_neg = np.sort(score[neg])
  k = int(np.floor(max_false * sorted_neg.size))
  thr = float(np.clip(np.nextafter(sorted_neg[sorted_neg.size - k - 1], np.inf), lo, 1.0))
  best = [score[b, max(0, c - tolerance):c + tolerance + 1].max() for b, c in targets]
  return dict(threshold=thr, recall=float(np.mean(np.asarray(best) >= thr)),
              false_rate=float((score[neg] >= thr).mean()), targets=len(targets),
              negative_chunks=int(neg.sum()))


def calibrate_delegate_free_running(engine, records, *, chunk_s: float,
                                    max_false: float = 0.002, tolerance: int = 3) -> dict:
  """The serving DELEGATE threshold from the model running free (the streaming engine on
  validation conversations, hearing its own voice, plain decoding): `calibrate_delegate_
  threshold` over the chunks the gate let speak, each scored by slot 0's P(DELEGATE), with
  a target at the micro-turn before each corpus delegation's start.

  Why not the teacher-forced text: there the highest P(DELEGATE) of chunks without one
  (0.3-0.6, while a result or a reminder is spoken) sat far above anything the model gives
  running free (no gate-open chunk of the test delegations reached 0.1), so a threshold
  from it never fires. `tolerance` is 3 chunks: running free, the gate opens up to half a
  second off the corpus' reply.
  """
  rows = []
  for record in records:
    res = engine.run_wav(_mic(record), text_at_s=_typed(record))
    recs = res["records"]
    spoke = np.array([r.spoke for r in recs], bool)
    p = np.where(spoke, [r.p_delegate for r in recs], 0.0)
    truth = np.zeros(len(recs), bool)
    for e in json.loads(_text(record["events_json"])):
      c = _delegation_chunk(e, chunk_s)
      if e["kind"] == "delegation" and 0 <= c < len(recs):
        truth[c] = True
    rows.append((p, truth, spoke))
  C = max(len(r[0]) for r in rows)
  pad = lambda x, v: np.concatenate([x, np.full(C - len(x), v, x.dtype)])
  p = np.stack([pad(r[0], 0.0) for r in rows])[..., None]
  target = np.where(np.stack([pad(r[1], False) for r in rows]), tok.DELEGATE, 0)[..., None]
  valid = np.stack([pad(np.ones(len(r[0]), bool), False) for r in rows])[..., None]
  spoke = np.stack([pad(r[2], False) for r in rows])
  return dict(calibrate_delegate_threshold(p, target, valid, max_false=max_false,
                                           tolerance=tolerance, speak_BC=spoke),
              conversations=len(rows), mode="free-running")


def background_at_delegations(engine, records, *, chunk_s: float) -> dict:
  """The second link of the delegation chain on its own: each record runs through the
  streaming engine with a delegation forced at the micro-turn of each corpus delegation
  (Engine.run_wav `delegate_at_s`), so the background model reads the context it would get
  had the interaction model delegated on time. Its call is compared with the corpus':

    ended       the call ended with SEP (else: the worker's "did not end" tool error)
    tool        the tool named is the corpus' tool
    args        ... and its args are the corpus' args, exactly
    ran         the tool ran without error
    answer      the background answer is the corpus' result text, exactly

  Returns counts per link, `n`, the same for the typed questions alone (`typed_n`,
  `typed_tool`, `typed_args`: their bytes are in the context, a spoken one's only as audio),
  and the first calls as (expected, written) for the report.
  """
  counts = dict(n=0, ended=0, tool=0, args=0, ran=0, answer=0, typed_n=0, typed_tool=0,
                typed_args=0)
  calls = []
  for record in records:
    wanted = [e for e in json.loads(_text(record["events_json"])) if e["kind"] == "delegation"]
    at = [max(0, _delegation_chunk(e, chunk_s)) * chunk_s for e in wanted]
    res = engine.run_wav(_mic(record), delegate_at_s=at, text_at_s=_typed(record))
    events = res["events"]
    jobs = [e["job"] for e in events if e["kind"] == "delegation" and e.get("forced")]
    for want, job in zip(wanted, jobs):
      mine = [e for e in events if e.get("job") == job]
      first = lambda kind: next((e for e in mine if e["kind"] == kind), None)
      call, error, result = first("tool_call"), first("tool_error"), first("background_result")
      data = want.get("data", {})
      counts["n"] += 1
      counts["ended"] += not (error and error.get("ended") is False)
      named = bool(call and call["tool"] == data.get("tool"))
      args = named and call["args"].strip() == str(data.get("args", "")).strip()
      counts["tool"] += named
      counts["args"] += args
      if data.get("typed"):
        counts["typed_n"] += 1
        counts["typed_tool"] += named
        counts["typed_args"] += args
      counts["ran"] += bool(first("tool_result"))
      counts["answer"] += bool(result and result["text"].strip()
                               == str(data.get("result_text", "")).strip())
      if len(calls) < 4:
        calls.append((f"{data.get('tool')}:{data.get('args')}",
                      f"{call['tool']}:{call['args']}" if call else
                      (error or {}).get("error", "no call")))
  return dict(counts, calls=calls)


def max_false_onsets(config) -> float:
  """The calibration's false-onset share of a run's config (train.speak_max_false_onsets;
  0.01 for configs written before the field existed)."""
  return float(config.train.get("speak_max_false_onsets", 0.01))


def teacher_forced_probe(speak_logits_fn, batches, *, max_false_onsets: float = 0.01) -> dict:
  """The probe over validation batches, every chunk teacher-forced (the model hears the
  corpus' own audio as SELF_AUDIO). speak_logits_fn(batch) -> the gate's [B, C] logits."""
  parts = [teacher_forced(np.asarray(speak_logits_fn(b)), b) for b in batches]
  if not parts:
    raise ValueError("no validation batches for the speak-decision probe")
  return summarize_parts(parts, max_false_onsets=max_false_onsets)


def summarize_parts(parts: list[tuple], *, max_false_onsets: float = 0.01) -> dict:
  """`summarize` over the `teacher_forced` tuples of several batches, plus "calibration"
  (`calibrate_threshold`)."""
  p, truth, cond, valid, now = (np.concatenate([part[i] for part in parts]) for i in range(5))
  calibration = calibrate_threshold(p, truth, now, valid, cond,
                                    max_false_onsets=max_false_onsets)
  return dict(summarize(p, truth, cond, valid, calibration["threshold"], now),
              calibration=calibration)


def free_running_on_validation(config, params, data_dir: str, *, num: int = 4,
                               max_s: float = 12.0, speak_threshold: float = 0.5) -> dict:
  """`free_running` over the first `num` validation conversations of the corpus in
  `data_dir`, with a streaming engine built from `params` (a pure dict of the run's
  parameters) under the serving form of `config`."""
  from tml_jax.data import tml_duplex
  engine = engine_from_params(config, params, speak_threshold=speak_threshold)
  source = tml_duplex.load_split(data_dir, "validation", config.data)
  records = [source[i] for i in range(min(num, len(source)))]
  return free_running(engine, records, chunk_s=config.layout.chunk_ms / 1000, max_s=max_s)


def engine_from_params(config, params, **kw):
  """A streaming engine on `params` (a pure dict of a run's parameters) under the serving
  form of `config`; kw go to Engine (thresholds)."""
  from tml_jax.serve.engine import Engine
  from tml_jax.serve.stream import serving_config
  from tml_jax.train.state import model_from_params, params_abstract
  config = serving_config(config)
  graphdef, abstract = params_abstract(config)
  return Engine(model_from_params(graphdef, abstract, params), config, **kw)


def main(argv=None):
  """python -m tml_jax.probe --workdir=W [--free_running=4] [--batches=4]: the probe of a
  trained run's newest checkpoint; writes W/speak_probe.json and W/speak_probe.png."""
  import argparse
  from flax import nnx
  from tml_jax.serve.engine import load_config
  from tml_jax.serve.stream import serving_config
  from tml_jax.train.checkpoint import restore_params
  from tml_jax.data import pipeline, tml_duplex
  from tml_jax.train.state import model_from_params, params_abstract
  ap = argparse.ArgumentParser(description=main.__doc__)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--batches", type=int, default=4, help="validation batches, teacher-forced")
  ap.add_argument("--free_running", type=int, default=4, help="validation conversations "
                  "through the streaming engine (0: skip)")
  ap.add_argument("--max_s", type=float, default=12.0, help="seconds of each conversation")
  args = ap.parse_args(argv)
  config = serving_config(load_config(args.workdir))
  graphdef, abstract = params_abstract(config)
  params, step = restore_params(args.workdir, nnx.to_pure_dict(abstract))
  model = model_from_params(graphdef, abstract, params)
  if not model.cfg.speak_gate:
    raise ValueError("the speak-decision probe reads the speak gate; this run has none "
                     "(model.speak_gate=False). Fix: train with --config.model.speak_gate=True.")
  import jax
  graphdef, state = nnx.split(model)
  logits_fn = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b).speak_logits)
  data_dir = tml_duplex.default_dir(config.data, args.workdir)
  val = tml_duplex.load_split(data_dir, "validation", config.data)
  it = iter(pipeline.make_loader(val, config, split="validation", seed=0, shuffle=False,
                                 random_crop=False))
  probes = {"teacher-forced": teacher_forced_probe(
      lambda b: logits_fn(state, b), [next(it) for _ in range(args.batches)],
      max_false_onsets=max_false_onsets(config))}
  if args.free_running:
    probes["free-running"] = free_running_on_validation(
        config, params, data_dir, num=args.free_running, max_s=args.max_s,
        speak_threshold=probes["teacher-forced"]["calibration"]["threshold"])
  paths.write_json(paths.join(args.workdir, "speak_probe.json"), dict(step=step, probes=probes))
  plot_probe(probes, paths.join(args.workdir, "speak_probe.png"))
  print(f"step {step}; calibrated threshold {probes['teacher-forced']['calibration']}\n"
        + table_md(probes))


if __name__ == "__main__":
  main()
