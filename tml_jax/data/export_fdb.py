r"""Write evaluation samples in Full-Duplex-Bench's on-disk layout (v1 and v1.5 tasks).

  python -m tml_jax.data.export_fdb --split=test --out=out/fdb
  python -m tml_jax.data.export_fdb --split=test --out=out/fdb \
      --config=configs/interaction.py:tiny --per_task=40
  python -m tml_jax.data.export_fdb --split=test --out=out/fdb --data_dir=data  # from a build
  python -m tml_jax.data.export_fdb --split=test --out=out/fdb --behaviours  # + OUT/tasks/

Then run the model over every input.wav, save its output.wav beside it, transcribe it with
the benchmark's ASR step (output.json) and run its evaluator on one task folder, e.g.
`python evaluate.py --task smooth_turn_taking --root_dir out/fdb/turn_taking`.

Layout (sample folders are named 0, 1, 2, ...: the backchannel evaluator only reads numeric
folder names). Every input.wav is 16 kHz mono int16 PCM of the USER channel only.

  OUT/pause_handling/<id>/   (--task pause_handling: takeover rate from output.json alone)
      input.wav              the user stops mid-utterance (unfinished syntax, often a filler),
                             pauses 0.6-2 s and goes on; the clip ends where the user's turn
                             does, so any model speech is a takeover, and one started in the
                             pause runs on over the user's continuation.
      pause.json             [{"text": words before the pause, "timestamp": [pause start,
                             clip end]}]
  OUT/turn_taking/<id>/      (--task smooth_turn_taking)
      input.wav              one complete user turn, then silence up to 4 s after its end.
      turn_taking.json       [{"text": the user's turn, "timestamp": [turn end, clip end]}];
                             the evaluator measures latency from timestamp[0].
  OUT/backchannel/<id>/      (--task backchannel)
      input.wav              a long multi-sentence user turn with short gaps, +1 s.
      backchannel.json       [{"text", "timestamp"}] of the reference model backchannels.
  OUT/backchannel/gt_distribution.json   {id: [...]}: the reference backchannels as the
                             normalised 0.2 s-window histogram the evaluator compares with
                             (it loads such a file as icc_gt_distribution.json).
  OUT/user_interruption/<id>/  (--task user_interruption)
      input.wav              a question, silence while the (reference) model answers, the
                             barge-in, then 4 s of silence.
      interrupt.json         [{"context": the question, "interrupt": the barge-in text,
                             "timestamp": [barge-in start, barge-in end]}]; the evaluator
                             measures latency from timestamp[1].
      context.wav, interrupt.wav   the question and the barge-in alone.
  OUT/v1.5/{user_interruption,user_backchannel,talking_to_other,background_speech}/<id>/
      input.wav              the user channel from the start through one overlap event + 4 s.
      clean_input.wav        the same with the overlapping speech replaced by silence (the
                             paired control of v1.5's behaviour analysis).
      metadata.json          {"context_text": what the user asked before, "current_turn_text":
                             the overlapping speech, "timestamps": [overlap start, end]}.
                             About half of the talking_to_other and background_speech samples
                             overlap the reference model's explanation (keep talking), the
                             rest happen while it is silent (stay silent).
  every v1 sample also gets transcription.json ({"text", "chunks": [{"text", "timestamp"}]}:
  the user's words in the clip, the benchmark's ASR output shape), and every sample our
  annotations.json: source conversation id, all events and words (all speakers, the
  reference model's included) inside the clip, text_in, and `expected` behaviour and times.

By default conversations are regenerated with `clean_mic=True` (no noise and no echo of our
synthetic model voice, which is not the evaluated model's voice); with --data_dir the stored
microphone channel is used as is.

Provenance and doubts: the v1 file names and the fields the evaluators read (turn_taking.json
timestamp[0]; interrupt.json "context", "interrupt", timestamp[1]; numeric folders and a
ground-truth distribution for backchannel; output.json "chunks") follow the benchmark's
evaluation scripts. The released v1 folders are named by source (candor_turn_taking,
synthetic_pause_handling, icc_backchannel, synthetic_user_interruption); we use task names,
which is fine because the evaluators take the folder as --root_dir. Not verified: the
"text" of pause.json / turn_taking.json (we could not see a released example), and the v1.5
sample files, which we took from secondary descriptions (input.wav + clean_input.wav +
metadata.json with context_text / current_turn_text / timestamps); check them against the
benchmark version you run.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import scipy.io.wavfile
from absl import app, flags
from ml_collections import config_flags

from tml_jax.audio.constants import SAMPLE_RATE as SR
from tml_jax.data import export_tasks, scenarios
from tml_jax.data.clips import Sample, next_speech
from tml_jax.data.conversation import CHUNK_S

TAIL_S = 4.0  # silence after the last user speech in turn-taking / interruption samples
VIDEO_SIZE = (80, 80)  # behaviour samples' video.npy frames (the engine resizes to its layout)
BC_WINDOW_S = 0.2  # the backchannel evaluator's histogram window
# task folder -> scenario its samples are cut from
TASKS = {"pause_handling": "pause_handling", "turn_taking": "turn_taking",
         "backchannel": "model_backchannel", "user_interruption": "interruption",
         "v1.5/user_interruption": "interruption", "v1.5/user_backchannel": "user_backchannel",
         "v1.5/talking_to_other": "talking_to_other",
         "v1.5/background_speech": "background_speech"}


def _seg(text: str, start: float, end: float) -> dict:
  return {"text": text, "timestamp": [round(float(start), 3), round(float(end), 3)]}


def _said(conv, start: float, end: float, speaker: str = "user") -> str:
  return " ".join(w.text for w in conv.words
                  if w.speaker == speaker and w.start_s >= start - 1e-3 and w.end_s <= end + 1e-3)


def _pause_handling(conv, rng) -> Sample | None:
  del rng
  pauses = conv.events_of("pause")
  if not pauses:
    return None
  p = pauses[0]
  # Up to the end of the paused turn (format 1 ended 0.5-1.0 s into the pause: a takeover,
  # >= 1 s or > 3 words, then hardly fit in the clip, and every system scored ~0).
  turn = next(e for e in conv.events_of("user_turn") if e.start_s <= p.start_s <= e.end_s)
  end = turn.end_s
  return Sample(end, {"pause.json": [_seg(_said(conv, turn.start_s, p.start_s), p.start_s,
                                          end)]},
                dict(behaviour="stay_silent", pause_start_s=p.start_s))


def _turn_taking(conv, rng) -> Sample | None:
  del rng
  turns = conv.events_of("user_turn")
  if not turns:
    return None
  u = turns[0]
  end = u.end_s + TAIL_S
  reply = next((e for e in conv.events_of("model_turn") if e.start_s >= u.end_s), None)
  return Sample(end, {"turn_taking.json": [_seg(u.data["text"], u.end_s, end)]},
                dict(behaviour="take_turn", user_turn_end_s=u.end_s,
                     reference_latency_s=reply.data.get("latency_s") if reply else None),
                silence_from=min(end, next_speech(conv, u.end_s) - 0.05))


def _backchannel(conv, rng) -> Sample | None:
  del rng
  turns, bcs = conv.events_of("user_turn"), conv.events_of("model_backchannel")
  if not turns or not bcs:
    return None
  u = turns[0]
  bcs = [e for e in bcs if u.start_s <= e.start_s <= u.end_s]
  return Sample(u.end_s + 1.0,
                {"backchannel.json": [_seg(e.data["text"], e.start_s, e.end_s) for e in bcs]},
                dict(behaviour="backchannel_in_gaps", user_turn=[u.start_s, u.end_s],
                     reference_backchannels=[[e.start_s, e.end_s] for e in bcs]),
                silence_from=min(u.end_s + 1.0, next_speech(conv, u.end_s) - 0.05))


def _interruption(conv, rng, v15: bool) -> Sample | None:
  del rng
  cuts = conv.events_of("interruption")
  if not cuts:
    return None
  i = cuts[0]
  ask = [e for e in conv.events_of("user_turn") if e.end_s <= i.start_s][-1]
  end = i.end_s + TAIL_S
  expected = dict(behaviour="stop_then_respond", interrupt_start_s=i.start_s,
                  reference_stop_s=i.data["model_stop_s"])
  silence = min(end, next_speech(conv, i.end_s) - 0.05)
  if v15:
    meta = dict(context_text=ask.data["text"], current_turn_text=i.data["text"],
                timestamps=[i.start_s, i.end_s])
    return Sample(end, {"metadata.json": meta}, expected, silence,
                  overlaps=[(i.start_s, i.end_s)])
  return Sample(end, {"interrupt.json": [dict(context=ask.data["text"],
                                              interrupt=i.data["text"],
                                              timestamp=[i.start_s, i.end_s])]},
                expected, silence, extra_wavs={"context.wav": (ask.start_s, ask.end_s),
                                               "interrupt.wav": (i.start_s, i.end_s)})


def _user_backchannel(conv, rng) -> Sample | None:
  del rng
  bcs = conv.events_of("user_backchannel")
  if not bcs:
    return None
  turn = next(e for e in conv.events_of("model_turn") if e.start_s <= bcs[0].start_s <= e.end_s)
  ask = [e for e in conv.events_of("user_turn") if e.end_s <= turn.start_s][-1]
  end = turn.end_s + 1.0
  bcs = [e for e in bcs if e.end_s <= end]
  meta = dict(context_text=ask.data["text"],
              current_turn_text=" ".join(e.data["text"] for e in bcs),
              timestamps=[bcs[0].start_s, bcs[-1].end_s])
  return Sample(end, {"metadata.json": meta},
                dict(behaviour="keep_talking", reference_model_turn=[turn.start_s, turn.end_s],
                     user_backchannels=[[e.start_s, e.end_s] for e in bcs]),
                silence_from=min(end, next_speech(conv, bcs[-1].end_s) - 0.05),
                overlaps=[(e.start_s, e.end_s) for e in bcs])


def _not_addressed(conv, rng, kind: str) -> Sample | None:
  del rng
  spans = conv.events_of(kind)
  if not spans:
    return None
  first = spans[0]
  # talking_to_other: the other person's reply belongs to the side conversation
  group = [first] + [e for e in conv.events_of("background_speech")
                     if e.start_s > first.start_s][:1]
  last = group[-1]
  end = last.end_s + TAIL_S
  during = bool(first.data["during_model"])
  asks = [e for e in conv.events_of("user_turn") if e.end_s <= first.start_s]
  meta = dict(context_text=asks[-1].data["text"] if during and asks else "",
              current_turn_text=" ".join(e.data["text"] for e in group),
              timestamps=[first.start_s, last.end_s])
  return Sample(end, {"metadata.json": meta},
                dict(behaviour="keep_talking" if during else "stay_silent",
                     overlap=[first.start_s, last.end_s], during_model=during),
                silence_from=min(end, next_speech(conv, last.end_s) - 0.05),
                overlaps=[(e.start_s, e.end_s) for e in group])


def plan(task: str, conv, rng: np.random.Generator) -> Sample | None:
  """The sample of `task` cut from `conv`, or None if the conversation has no such moment."""
  if task == "pause_handling":
    return _pause_handling(conv, rng)
  if task == "turn_taking":
    return _turn_taking(conv, rng)
  if task == "backchannel":
    return _backchannel(conv, rng)
  if task in ("user_interruption", "v1.5/user_interruption"):
    return _interruption(conv, rng, v15=task.startswith("v1.5"))
  if task == "v1.5/user_backchannel":
    return _user_backchannel(conv, rng)
  if task in ("v1.5/talking_to_other", "v1.5/background_speech"):
    return _not_addressed(conv, rng, task.split("/")[1])
  if task in export_tasks.BEHAVIOUR_TASKS:
    return export_tasks.plan(task, conv)
  raise ValueError(f"unknown task {task!r}; expected one of "
                   f"{sorted(TASKS) + sorted(export_tasks.BEHAVIOUR_TASKS)}")


def _clip(conv, start_s: float, end_s: float) -> np.ndarray:
  """User channel [start_s, end_s), zero-padded past the end of the conversation."""
  a, b = int(round(start_s * SR)), int(round(end_s * SR))
  out = np.zeros(b - a, np.float32)
  src = conv.user_wav[a:min(b, len(conv.user_wav))]
  out[:len(src)] = src
  return out


def _write_wav(path: str, wav: np.ndarray):
  scipy.io.wavfile.write(path, SR, np.round(np.clip(wav, -1.0, 32767 / 32768) * 32768)
                         .astype(np.int16))


def _annotations(conv, task: str, sample: Sample) -> dict:
  inside = lambda t: t < sample.end_s
  return {
      "task": task, "source_id": conv.id, "scenario": conv.scenario, "split": conv.split,
      "duration_s": round(sample.end_s, 3), "sample_rate": SR,
      "events": [dataclasses.asdict(e) for e in conv.events if inside(e.start_s)],
      "words": [dataclasses.asdict(w) for w in conv.words if inside(w.start_s)],
      "text_in": [[t, x] for t, x in conv.text_in if inside(t)],
      "expected": sample.expected, "meta": conv.meta,
  }


def bc_distribution(spans: list[list[float]], duration_s: float) -> list[float]:
  """Backchannel spans -> the evaluator's histogram: counts per 0.2 s window, normalised."""
  hist = np.zeros(int(duration_s / BC_WINDOW_S) + 1)
  for a, b in spans:
    hist[int(a / BC_WINDOW_S):int(b / BC_WINDOW_S) + 1] += 1
  hist += 1e-10
  return (hist / hist.sum()).round(8).tolist()


def write_sample(root: str, task: str, number: int, conv, rng: np.random.Generator
                 ) -> Sample | None:
  sample = plan(task, conv, rng)
  if sample is None:
    return None
  folder = os.path.join(root, task, str(number))
  os.makedirs(folder, exist_ok=True)
  wav = _clip(conv, 0.0, sample.end_s)
  if sample.silence_from is not None:
    wav[int(round(sample.silence_from * SR)):] = 0.0
  _write_wav(os.path.join(folder, "input.wav"), wav)
  if sample.overlaps:
    clean = wav.copy()
    for a, b in sample.overlaps:
      clean[int(round(a * SR)):int(round(b * SR))] = 0.0
    _write_wav(os.path.join(folder, "clean_input.wav"), clean)
  for name, (a, b) in sample.extra_wavs.items():
    _write_wav(os.path.join(folder, name), _clip(conv, a, b))
  if sample.video:
    from tml_jax.vision import synthetic
    chunks = int(np.ceil(sample.end_s / CHUNK_S - 1e-6))
    frames, _ = synthetic.make_video(chunks, VIDEO_SIZE, conv.video_events,
                                     int(conv.meta.get("video_seed", 0)),
                                     chunk_ms=int(round(CHUNK_S * 1000)))
    np.save(os.path.join(folder, "video.npy"), frames)
  files = dict(sample.json_files)
  if not task.startswith(("v1.5", "tasks/")):
    words = [w for w in conv.words if w.speaker == "user" and w.start_s < sample.end_s
             and (sample.silence_from is None or w.start_s < sample.silence_from)]
    files["transcription.json"] = {"text": " ".join(w.text for w in words),
                                   "chunks": [_seg(w.text, w.start_s, w.end_s) for w in words]}
  files["annotations.json"] = _annotations(conv, task, sample)
  for name, content in files.items():
    with open(os.path.join(folder, name), "w") as f:
      json.dump(content, f, indent=1, sort_keys=name == "annotations.json", ensure_ascii=False)
  return sample


# ----------------------------------------------------------------------------- ownership
# An export writes OUT/tml_export.json first (complete: false) and last (complete: true, with
# every file it wrote). A later export may replace only what such a manifest says is ours: a
# folder without one, or holding anything else (the real benchmark's data, a model's
# output.wav beside an input.wav), is refused and left exactly as it was.
MANIFEST = "tml_export.json"
FORMAT = 2  # 2: pause clips run to the end of the paused turn


def export_settings(split: str, data_cfg, per_task: int | None,
                    data_dir: str | None, behaviours: bool = False,
                    behaviour_per_task: int | None = None) -> dict:
  """Everything that changes what an export writes (the key of the main job's cache)."""
  cfg = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  return json.loads(json.dumps(dict(format=FORMAT, corpus=scenarios.CORPUS_VERSION,
                                    split=split, per_task=per_task, behaviours=behaviours,
                                    behaviour_per_task=behaviour_per_task if behaviours
                                    else None,
                                    data_dir=os.path.abspath(data_dir) if data_dir else None,
                                    data=cfg), default=str, sort_keys=True))


def read_manifest(out: str) -> dict | None:
  path = os.path.join(out, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable export manifest ({e}); move {out!r} aside or "
                     "pass another --out") from None
  if manifest.get("written_by") != __name__:
    raise ValueError(f"{path} was not written by {__name__}; pass another --out")
  return manifest


def _files_under(out: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, f), out)
                for d, _, files in os.walk(out) for f in files)


def _claim(out: str) -> None:
  """Empty `out` of an earlier export of ours, or raise (touching nothing) when it holds a
  file that no manifest of ours accounts for."""
  if not os.path.exists(out):
    return
  if not os.path.isdir(out):
    raise NotADirectoryError(f"--out={out!r} is a file; pass a folder for the export")
  manifest = read_manifest(out)
  present = [f for f in _files_under(out) if f != MANIFEST]
  if manifest is None:
    if present:
      raise FileExistsError(
          f"--out={out!r} holds files this exporter did not write (e.g. "
          f"{os.path.join(out, present[0])!r}) and no {MANIFEST}; it writes only into an empty "
          "folder or an earlier export of its own. Pass an empty or new --out.")
    return
  ours = set(manifest.get("files", []))
  # An export that stopped half-way listed no files yet: what lies in its task folders is its.
  own_dirs = () if manifest.get("complete") else tuple(t + os.sep for t in TASKS) + (
      "tasks" + os.sep,)
  foreign = [f for f in present if f not in ours and not f.startswith(own_dirs)]
  if foreign:
    raise FileExistsError(
        f"{os.path.join(out, foreign[0])!r} (and {len(foreign) - 1} more) lies inside an earlier "
        f"export but was not written by it (e.g. a model's output); move it out of {out!r} or "
        "pass another --out. Nothing was changed.")
  for f in present:
    os.remove(os.path.join(out, f))
  for d, _, _ in sorted(os.walk(out), key=lambda w: -len(w[0])):  # deepest first
    if d != out and not os.listdir(d):
      os.rmdir(d)


def _write_manifest(out: str, settings: dict, *, counts=None, files=()) -> None:
  tmp = os.path.join(out, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(dict(written_by=__name__, complete=counts is not None, settings=settings,
                   counts=counts, files=sorted(files)), f, indent=1)
  os.replace(tmp, os.path.join(out, MANIFEST))


def ensure_export(out: str, split: str, data_cfg, *, per_task: int | None = None,
                  data_dir: str | None = None, behaviours: bool = False,
                  behaviour_per_task: int | None = None, log=print) -> dict[str, int]:
  """The counts of a complete export in `out` made with the same settings, else export."""
  try:
    manifest = read_manifest(out)
  except ValueError:
    manifest = None  # export() raises with the reason
  settings = export_settings(split, data_cfg, per_task, data_dir, behaviours,
                             behaviour_per_task)
  if manifest and manifest.get("complete") and manifest.get("settings") == settings:
    return manifest["counts"]
  log(f"exporting {per_task or 'all'} {split} samples per task to {out} ...")
  return export(out, split, data_cfg, per_task=per_task, data_dir=data_dir,
                behaviours=behaviours, behaviour_per_task=behaviour_per_task)


def export(out: str, split: str, data_cfg, *, per_task: int | None = None,
           data_dir: str | None = None, behaviours: bool = False,
           behaviour_per_task: int | None = None) -> dict[str, int]:
  """Write every task's samples under `out` (empty, new, or an earlier export of ours: see
  MANIFEST); returns samples written per task. `behaviours`: also the samples of
  tml_jax.data.export_tasks (delegation, reminders, video, translation, typed text),
  `behaviour_per_task` of each (default: per_task)."""
  _claim(out)
  os.makedirs(out, exist_ok=True)
  settings = export_settings(split, data_cfg, per_task, data_dir, behaviours,
                             behaviour_per_task)
  _write_manifest(out, settings)
  counts = _export(out, split, data_cfg, per_task=per_task, data_dir=data_dir,
                   behaviours=behaviours, behaviour_per_task=behaviour_per_task)
  _write_manifest(out, settings, counts=counts,
                  files=[f for f in _files_under(out) if f != MANIFEST])
  return counts


def _export(out: str, split: str, data_cfg, *, per_task: int | None,
            data_dir: str | None, behaviours: bool = False,
            behaviour_per_task: int | None = None) -> dict[str, int]:
  if data_dir:
    from tml_jax.data import tml_duplex
    source = tml_duplex.load_split(data_dir, split, data_cfg)
    stored = [tml_duplex.to_conversation(source[i]) for i in range(len(source))]
  counts, tasks = {}, dict(TASKS)
  if behaviours:
    tasks.update(export_tasks.BEHAVIOUR_TASKS)  # after the benchmark's: their cut-point seeds stay put
  for t, (task, scenario) in enumerate(tasks.items()):
    rng = np.random.default_rng([int(data_cfg.seed), t])  # the cut points
    n_task, cap = per_task, None
    if task.startswith("tasks/") and behaviour_per_task is not None:
      n_task = cap = behaviour_per_task
    if data_dir:
      convs = (c for c in stored if c.scenario == scenario)
      if cap is not None:
        convs = (c for _, c in zip(range(cap), convs))
    else:
      convs = (scenarios.generate(split, i, int(data_cfg.seed), float(data_cfg.conversation_s),
                                  scenario, clean_mic=True)
               for i in range(n_task or int(data_cfg[f"num_{split}"])))
    gt, n = {}, 0
    for conv in convs:
      sample = write_sample(out, task, n, conv, rng)
      if sample is None:
        continue
      if task == "backchannel":
        gt[str(n)] = bc_distribution(sample.expected["reference_backchannels"], sample.end_s)
      n += 1
    if gt:
      with open(os.path.join(out, task, "gt_distribution.json"), "w") as f:
        json.dump(gt, f)
    counts[task] = n
  return counts


def main(argv):
  del argv
  if not _OUT.value:
    raise app.UsageError("pass --out=DIR (the root folder of the benchmark layout)")
  counts = export(_OUT.value, _SPLIT.value, _CONFIG.value.data, per_task=_PER_TASK.value,
                  data_dir=_DATA_DIR.value, behaviours=_BEHAVIOURS.value,
                  behaviour_per_task=_BEHAVIOUR_PER_TASK.value)
  print(json.dumps(counts, indent=1))


if __name__ == "__main__":
  # Flags live here so that importing export() (e.g. from tml_jax.main) defines none.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "configs/interaction.py:tiny", "Experiment config (its data section).",
      lock_config=True)
  _SPLIT = flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split.")
  _OUT = flags.DEFINE_string("out", None, "Output root of the benchmark layout.")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "Read a built corpus instead of generating.")
  _PER_TASK = flags.DEFINE_integer("per_task", None,
                                   "Samples per task when generating (default num_<split>).")
  _BEHAVIOURS = flags.DEFINE_bool("behaviours", False,
                                  "Also write OUT/tasks/<behaviour>/ (tml_jax.data.export_tasks).")
  _BEHAVIOUR_PER_TASK = flags.DEFINE_integer(
      "behaviour_per_task", None, "Samples per behaviour task (default: --per_task).")
  app.run(main)
