"""Run systems over Full-Duplex-Bench sample folders, hear what each said, and score it.

Three passes over REPORT/<system>/<task>/<sample>/:
1. every system writes output.wav (and, if it has one, monologue.json: the words it meant
   to say; the model's text stream, a baseline's script);
2. for every output.wav alike, the Silero VAD (`vad`) finds where it sounds and the ASR
   (`asr`) transcribes those regions: output.json, in the benchmark's shape, is what the
   system said out loud (the benchmark's own pipeline, v1_v1.5/get_transcript/asr.py);
3. `metrics` applies the benchmark's rules to output.json and the VAD segments. The same
   rules on monologue.json are a secondary, labelled score, and the two are compared
   (audio-text agreement: the ASR's word error rate against the monologue, and the share
   of monologue words that fall where output.wav is audible).
Then `report` writes report.json, report.md, plots and samples.jsonl.
"""

from __future__ import annotations

import json
import os
import time
import traceback

import numpy as np

from tml_jax.audio import io as audio_io
from tml_jax.eval import asr, behaviours, metrics, report, samples as samples_lib
from tml_jax.eval import systems as systems_lib
from tml_jax.eval import vad

DEFAULT_SYSTEMS = ("model", "vad_0.5s", "vad_0.8s", "silent", "always_talking")
OUTPUT_FILES = ("output.wav", "output.json", "monologue.json", "events.jsonl")


def _load_pcm(path: str, name: str) -> np.ndarray:
  wav, sr = audio_io.load_wav(path)
  return asr.to_pcm(audio_io.check_wav(wav, sr, name=name))


def _segments(pcm_N: np.ndarray) -> list[tuple[float, float]]:
  return vad.segments(pcm_N.astype(np.float32) / 32768.0)


def _read_words(path: str, duration_s: float, start_s: float = 0.0) -> list | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return metrics.clip(metrics.words_from_output(json.load(f)), duration_s, start_s)


def score(sample, words: list, segs: list, user_segs: list,
          sys_events: list | None = None) -> dict:
  """The benchmark's metrics for the sample's kind from words and VAD segments, plus the
  extras its annotations.json events ask for: a behaviour sample (tml_jax.data.export_tasks)
  is scored by `behaviours` (also from the events the system logged, `sys_events`)."""
  ref, dur = samples_lib.reference_times(sample), sample.duration_s
  if sample.kind == "pause_handling":
    out = metrics.pause_handling(words)
  elif sample.kind == "turn_taking":
    out = metrics.turn_taking(words, ref["turn_end_s"])
  elif sample.kind == "user_interruption":
    out = metrics.interruption(words, segs, ref["start_s"], ref["end_s"], dur)
  elif sample.kind == "backchannel":
    out = metrics.backchannel(words, vad.rounded(segs, dur), dur, sample.gt)
  elif sample.kind == "v1.5":
    out = metrics.v15_timing(user_segs, segs, ref["overlap"], dur,
                             sample.expected.get("behaviour"))
  else:
    out = {}
  if sample.expected.get("behaviour") in behaviours.BEHAVIOURS:
    extra = behaviours.score(sample.expected, sample.events, words, sys_events)
  else:
    extra = metrics.extra_metrics(words, sample.events) if sample.events else {}
  if extra:
    out["extra"] = extra
  return out


def agreement(said: list, meant: list, meant_after: list, segs: list) -> dict:
  """Audio-text agreement of one sample: word edits of the ASR against the monologue (both
  from the benchmark's transcription start), and how many monologue words overlap audible
  output."""
  ref = [t for w in meant_after for t in asr.tokens(w[0])]
  hyp = [t for w in said for t in asr.tokens(w[0])]
  audible = sum(any(s < b and e > a for a, b in segs) for _, s, e in meant)
  return {"ref_words": len(ref), "edits": asr.edit_distance(ref, hyp),
          "monologue_words": len(meant), "audible": int(audible)}


def _run_system(system, sample_list, out_dir, log) -> list[dict]:
  rows, t0 = [], time.time()
  for s in sample_list:
    sample_out = os.path.join(out_dir, system.name, s.task, s.name)
    row = {"system": system.name, "task": s.task, "kind": s.kind, "sample": s.name,
           "duration_s": round(s.duration_s, 3), "dir": sample_out,
           **samples_lib.reference_times(s)}
    try:
      for stale in OUTPUT_FILES:  # from an earlier run into this REPORT
        if os.path.exists(os.path.join(sample_out, stale)):
          os.remove(os.path.join(sample_out, stale))
      system.run_sample(s, sample_out)
      if not os.path.exists(os.path.join(sample_out, "output.wav")):
        raise FileNotFoundError(f"the system wrote no output.wav in {sample_out}")
    except Exception as e:  # one bad sample must not end the run; the row says what failed
      row["error"] = f"{type(e).__name__}: {e}"
      log(f"[evaluate] {system.name} on {s.folder}: {row['error']}")
      if not isinstance(e, (ValueError, OSError)):
        row["traceback"] = traceback.format_exc(limit=3)
    rows.append(row)
  log(f"[evaluate] {system.name}: {len(sample_list)} samples in {time.time() - t0:.1f} s")
  return rows


def listen(rows: list[dict], by_folder: dict, transcriber: asr.Transcriber,
           notes: list[str]) -> None:
  """VAD and ASR of every row's output.wav; writes output.json and fills row["segs"]."""
  todo = []
  for r in rows:
    if "error" in r:
      continue
    s, path = by_folder[r["folder"]], os.path.join(r["dir"], "output.wav")
    try:
      pcm = _load_pcm(path, "output.wav")
    except (ValueError, OSError) as e:
      r["error"] = f"{type(e).__name__}: {e}"
      continue
    got = len(pcm) / audio_io.SAMPLE_RATE
    if abs(got - s.duration_s) > 0.02:
      notes.append(f"{path} lasts {got:.3f} s, input {s.duration_s:.3f} s (should be equal)")
    r["segs"] = _segments(pcm)  # exact sample times / 16 kHz
    todo.append((r, (pcm, r["segs"], s.crop_s, s.duration_s)))
  heard = transcriber.run([item for _, item in todo])
  for (r, _), words in zip(todo, heard):
    with open(os.path.join(r["dir"], "output.json"), "w") as f:
      json.dump(asr.to_fdb(words), f, indent=1)


def _score_row(r: dict, s, user_segs: list) -> None:
  # output.json is already cropped where the benchmark starts transcribing (asr.crop_s)
  said = _read_words(os.path.join(r["dir"], "output.json"), s.duration_s)
  r["words"] = len(said)
  sys_events = behaviours.read_system_events(r["dir"])
  r["metrics"] = score(s, said, r["segs"], user_segs, sys_events)
  mono_path = os.path.join(r["dir"], "monologue.json")
  meant = _read_words(mono_path, s.duration_s)
  if meant is not None:
    meant_after = metrics.clip(meant, s.duration_s, s.crop_s)
    r["monologue_metrics"] = score(s, meant_after, r["segs"], user_segs, sys_events)
    r["agreement"] = agreement(said, meant, meant_after, r["segs"])


def _run_all(systems, sample_list, out_dir, workdir, config, notes, log):
  """Pass 1: every system over every sample -> (rows, unavailable, models, seconds)."""
  rows, unavailable, models, seconds = [], {}, {}, {}
  for spec in systems:
    name = spec if isinstance(spec, str) else spec.name
    try:
      system = systems_lib.make_system(spec, workdir, config)
    except systems_lib.ModelUnavailable as e:
      unavailable[name] = str(e)
      notes.append(f"system {name!r} unavailable: {e}; its column is empty")
      log(f"[evaluate] system {name!r} unavailable: {e}")
      continue
    if isinstance(system, systems_lib.ModelSystem):
      models[name] = {"workdir": system.workdir, "checkpoint_step": system.step,
                      "skipped_checkpoints": system.skipped}
      if system.skipped:
        notes.append(f"system {name!r} scored checkpoint step {system.step}, NOT the newest: "
                     + "; ".join(f"step {k['step']} failed ({k['error'][:120]})"
                                 for k in system.skipped))
        log(f"[evaluate] WARNING: {notes[-1]}")
    t0 = time.time()
    rows += [dict(r, folder=s.folder) for r, s in
             zip(_run_system(system, sample_list, out_dir, log), sample_list)]
    seconds[name] = round(time.time() - t0, 1)
  return rows, unavailable, models, seconds


def _score_all(rows, by_folder, user_segs, log):
  """Pass 3: the benchmark's rules on each row's output.json (and monologue.json)."""
  for r in rows:
    if "error" in r:
      continue
    s = by_folder[r["folder"]]
    r["user_segs"] = user_segs[s.folder]
    try:
      _score_row(r, s, user_segs[s.folder])
    except (ValueError, OSError, KeyError) as e:
      r["error"] = f"{type(e).__name__}: {e}"
      log(f"[evaluate] {r['system']} on {s.folder}: {r['error']}")
  for r in rows:
    r.pop("folder", None)


def evaluate(data_dir: str, out_dir: str, systems=DEFAULT_SYSTEMS, *, workdir: str | None = None,
             config=None, max_per_task: int | None = None, plots: bool = True,
             processes: int | None = None, log=print) -> dict:
  """Run `systems` over every sample of `data_dir`, write outputs and the report to out_dir.
  processes: ASR decoding processes (default: up to 2)."""
  data_real, out_real = os.path.realpath(data_dir), os.path.realpath(out_dir)
  if out_real == data_real or out_real.startswith(data_real + os.sep):
    raise ValueError(f"--out={out_dir!r} is inside --data={data_dir!r}; the benchmark folder "
                     f"is never written: choose a report folder outside it")
  started = time.time()
  sample_list, refused, notes, per_task = samples_lib.collect(data_dir, max_per_task, log)
  by_folder = {s.folder: s for s in sample_list}
  user_segs = {s.folder: _segments(_load_pcm(s.input_path, "input.wav")) for s in sample_list}
  rows, unavailable, models, seconds = _run_all(systems, sample_list, out_dir, workdir, config,
                                                notes, log)
  t0 = time.time()
  transcriber = asr.Transcriber(processes, cache_dir=os.path.join(out_dir, ".asr_cache"))
  listen(rows, by_folder, transcriber, notes)
  timing = {"systems_s": seconds, "listen_s": round(time.time() - t0, 1),
            "asr": {k: round(v, 1) if isinstance(v, float) else v
                    for k, v in transcriber.stats.items()}}
  log(f"[evaluate] VAD + ASR of {len(rows)} outputs in {timing['listen_s']} s "
      f"({timing['asr']})")
  _score_all(rows, by_folder, user_segs, log)
  names = [spec if isinstance(spec, str) else spec.name for spec in systems]
  result = report.build(rows, refused=refused, notes=notes, unavailable=unavailable,
                        systems=names, data_dir=data_dir, n_samples=per_task)
  result.update(models=models, timing=timing, wall_s=round(time.time() - started, 1))
  report.write(result, rows, out_dir, plots=plots)
  return result
