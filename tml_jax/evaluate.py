r"""Run systems over Full-Duplex-Bench sample folders and score them with our own metrics.

  python -m tml_jax.data.export_fdb --split=test --out=out/fdb --per_task=20
  python -m tml_jax.evaluate --workdir=out/run --data=out/fdb --out=out/eval
  python -m tml_jax.evaluate --data=out/fdb --out=out/eval_baselines \
      --systems=vad_0.5s,vad_0.8s,silent,always_talking --max_per_task=5

DATA is the benchmark's layout (our export, or the real v1 / v1.5 folders): task folders of
numbered sample folders with input.wav and the task's JSON files. Every system writes, per
sample, REPORT/<system>/<task>/<sample>/{output.wav, output.json} (DATA is never written),
then `tml_jax.eval.metrics` scores it (definitions and sources in that module's docstring)
and `tml_jax.eval.report` writes REPORT/report.json, REPORT/report.md, PNG plots and
REPORT/samples.jsonl (one line per system and sample). A sample folder that cannot be read
is refused with the folder and the file named, listed under "refused", and skipped.

Systems: "model" (the streaming engine, `tml_jax.serve.Engine.from_workdir(--workdir,
--config)`, `run_file(sample folder, out)`; when it cannot be loaded the run goes on with the
baselines and the report says why), and the baselines of
`tml_jax.eval.baselines` (vad_<endpoint>s, silent, always_talking).

Python: `evaluate(data_dir, out_dir, systems=..., workdir=..., config=...) -> report dict`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback


from tml_jax.audio import io as audio_io
from tml_jax.eval import baselines, metrics, report, vad

DEFAULT_SYSTEMS = ("model", "vad_0.5s", "vad_0.8s", "silent", "always_talking")
# The released v1 folders are named by source; our export names them by task.
V1_KINDS = {
    "pause_handling": "pause_handling", "synthetic_pause_handling": "pause_handling",
    "candor_pause_handling": "pause_handling", "turn_taking": "turn_taking",
    "candor_turn_taking": "turn_taking", "smooth_turn_taking": "turn_taking",
    "backchannel": "backchannel", "icc_backchannel": "backchannel",
    "user_interruption": "user_interruption",
    "synthetic_user_interruption": "user_interruption",
}
# Which file tells a sample's kind when its folder name does not, and what each kind reads.
KIND_BY_FILE = (("interrupt.json", "user_interruption"), ("turn_taking.json", "turn_taking"),
                ("pause.json", "pause_handling"), ("backchannel.json", "backchannel"),
                ("metadata.json", "v1.5"), ("annotations.json", "extra"))
REQUIRED = {"pause_handling": (), "turn_taking": ("turn_taking.json",),
            "user_interruption": ("interrupt.json",), "backchannel": (),
            "v1.5": ("metadata.json",), "extra": ("annotations.json",)}
SAMPLE_FILES = {"input.wav"} | {f for f, _ in KIND_BY_FILE}
GT_FILES = ("gt_distribution.json", "icc_gt_distribution.json")


class SampleError(ValueError):
  """A sample folder the harness refuses (it names the folder and what is wrong)."""


@dataclasses.dataclass
class Sample:
  task: str          # folder under DATA, e.g. "turn_taking" or "v1.5/talking_to_other"
  kind: str          # metric family: a V1_KINDS value, "v1.5" or "extra"
  name: str          # the sample folder's name
  folder: str
  duration_s: float
  files: dict        # parsed JSON files by name
  gt: list | None = None  # backchannel reference histogram

  @property
  def input_path(self) -> str:
    return os.path.join(self.folder, "input.wav")


# ---- finding and reading samples ------------------------------------------------------

def _sort_key(name: str):
  return (0, int(name), "") if name.isdigit() else (1, 0, name)


def discover(data_dir: str) -> list[tuple[str, str]]:
  """(task, sample folder) pairs: a sample folder has a numeric name or a sample file."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"--data={data_dir!r} is not a folder; pass the root of a "
                            f"Full-Duplex-Bench layout (e.g. from python -m "
                            f"tml_jax.data.export_fdb --out=DIR)")
  found = []
  for root, dirs, files in os.walk(data_dir):
    dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=_sort_key)
    for d in list(dirs):
      path = os.path.join(root, d)
      try:
        inside = set(os.listdir(path))
      except OSError:
        inside = set()
      if d.isdigit() or inside & SAMPLE_FILES:
        task = os.path.relpath(root, data_dir)
        found.append((os.path.basename(os.path.abspath(data_dir)) if task == "." else task,
                      path))
        dirs.remove(d)  # a sample folder holds no samples
  return found


def _read_json(folder: str, name: str):
  path = os.path.join(folder, name)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise SampleError(f"refusing sample folder {folder}: cannot read {name} ({e}); re-export "
                      f"the sample or delete the folder") from e


def kind_of(task: str, folder: str) -> str:
  base = task.replace(os.sep, "/")
  if base.split("/")[-1] in V1_KINDS and not base.startswith("v1.5"):
    return V1_KINDS[base.split("/")[-1]]
  if base.startswith("v1.5"):
    return "v1.5"
  inside = set(os.listdir(folder))
  return next((kind for f, kind in KIND_BY_FILE if f in inside), "extra")


def load_sample(task: str, folder: str, gt: dict | None = None) -> Sample:
  """Validate one sample folder; raises SampleError naming the folder and missing file."""
  kind = kind_of(task, folder)
  for name in ("input.wav",) + REQUIRED[kind]:
    if not os.path.isfile(os.path.join(folder, name)):
      raise SampleError(f"refusing sample folder {folder}: missing {name} (a {kind} sample "
                        f"needs input.wav{''.join(', ' + n for n in REQUIRED[kind])}); "
                        f"re-export it or delete the folder")
  try:
    wav, sr = audio_io.load_wav(os.path.join(folder, "input.wav"))
    wav = audio_io.check_wav(wav, sr, name="input.wav")
  except (ValueError, OSError) as e:
    raise SampleError(f"refusing sample folder {folder}: bad input.wav ({e})") from e
  files = {n: _read_json(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".json")}
  sample = Sample(task, kind, os.path.basename(folder), folder, len(wav) / audio_io.SAMPLE_RATE,
                  files, (gt or {}).get(os.path.basename(folder)))
  try:
    reference_times(sample)
  except (KeyError, IndexError, TypeError, ValueError) as e:
    raise SampleError(f"refusing sample folder {folder}: its {REQUIRED[kind] or 'JSON'} "
                      f"lacks the timestamps the {kind} metrics read ({e!r})") from e
  return sample


def _first(content):
  """The benchmark's JSON files hold a list of segments (we read the first); take a bare
  segment dict too, in case a release writes one."""
  return content if isinstance(content, dict) else content[0]


def reference_times(s: Sample) -> dict:
  """The times a sample's metrics are measured from (the benchmark's own fields)."""
  if s.kind == "turn_taking":
    return {"turn_end_s": float(_first(s.files["turn_taking.json"])["timestamp"][0])}
  if s.kind == "user_interruption":
    a, b = _first(s.files["interrupt.json"])["timestamp"][:2]
    return {"start_s": float(a), "end_s": float(b)}
  if s.kind == "v1.5":
    a, b = s.files["metadata.json"]["timestamps"][:2]
    return {"overlap": (float(a), float(b))}
  return {}


def _load_gt(task_dir: str, task: str) -> tuple[dict | None, str | None]:
  for name in GT_FILES:
    path = os.path.join(task_dir, name)
    if os.path.exists(path):
      try:
        with open(path) as f:
          return json.load(f), None
      except (OSError, ValueError) as e:
        return None, f"{path} unreadable ({e}): backchannel JSD omitted for {task}"
  return None, f"no {' or '.join(GT_FILES)} in {task}: backchannel JSD omitted"


# ---- systems --------------------------------------------------------------------------

class ModelUnavailable(RuntimeError):
  pass


class ModelSystem:
  """The streaming engine of tml_jax.interact, loaded once from a training workdir."""
  name = "model"

  def __init__(self, workdir: str | None, config=None):
    if not workdir:
      raise ModelUnavailable("no --workdir given (a training workdir with a checkpoint)")
    try:
      engine_cls = engine_class()
    except Exception as e:  # missing, or broken by a dependency: still run the baselines
      raise ModelUnavailable(f"the streaming engine cannot be imported ({e})") from e
    try:
      self.engine = engine_cls.from_workdir(workdir, config)
    except Exception as e:  # any failure to load must not stop the baselines
      why = f"{type(e).__name__}: {e}"
      why = why if len(why) < 400 else why[:400] + " ..."  # orbax prints whole tree diffs
      raise ModelUnavailable(f"Engine.from_workdir({workdir!r}) failed: {why}") from e

  def run_sample(self, sample: Sample, out_dir: str):
    os.makedirs(out_dir, exist_ok=True)
    # The folder, not input.wav: the engine also reads a sample's video (video.npy, frames/).
    kw = {}
    typed = [(float(e["start_s"]), e["data"]["text"]) for e in _events(sample)
             if e.get("kind") == "typed_text"]
    if typed:  # what the user typed is input too (TEXT_IN), not something to answer blind
      kw["text_at_s"] = typed
    self.engine.run_file(sample.folder, out_dir, **kw)


def _events(sample: Sample) -> list[dict]:
  ann = sample.files.get("annotations.json")
  return (ann.get("events") or []) if isinstance(ann, dict) else []


def engine_class():
  """The streaming engine, imported only when the model runs (baselines need no JAX model).
  tml_jax.serve first: tml_jax.interact defines absl flags that clash with ours."""
  try:
    from tml_jax.serve.engine import Engine
  except ImportError:
    from tml_jax.interact import Engine
  return Engine


class BaselineSystem:
  def __init__(self, name: str):
    self.impl = baselines.make(name)
    self.name = name

  def run_sample(self, sample: Sample, out_dir: str):
    wav, sr = audio_io.load_wav(sample.input_path)
    self.impl.respond(audio_io.check_wav(wav, sr, name="input.wav"), out_dir)


def make_system(spec, workdir: str | None, config=None):
  """A system by name, or `spec` itself when it is an object with .name and .run_sample
  (sample, out_dir) that writes output.wav and output.json (e.g. a test oracle)."""
  if not isinstance(spec, str):
    return spec
  return ModelSystem(workdir, config) if spec == "model" else BaselineSystem(spec)


# ---- scoring --------------------------------------------------------------------------

def read_output(out_dir: str, duration_s: float) -> tuple[list, list, list[str]]:
  """(words, VAD segments, notes) of a system's output for one sample."""
  notes = []
  wav_path, json_path = (os.path.join(out_dir, n) for n in ("output.wav", "output.json"))
  if not os.path.exists(wav_path) or not os.path.exists(json_path):
    missing = [n for n in ("output.wav", "output.json")
               if not os.path.exists(os.path.join(out_dir, n))]
    raise FileNotFoundError(f"the system wrote no {' and no '.join(missing)} in {out_dir}")
  wav, sr = audio_io.load_wav(wav_path)
  wav = audio_io.check_wav(wav, sr, name="output.wav")
  got = len(wav) / audio_io.SAMPLE_RATE
  if abs(got - duration_s) > 0.02:
    notes.append(f"{wav_path} lasts {got:.3f} s, input {duration_s:.3f} s (should be equal)")
  with open(json_path) as f:
    words = metrics.words_from_output(json.load(f))
  return words, vad.segments(wav), notes


def monologue_end(sample: Sample, user_segs: list) -> float | None:
  """End of the user's turn in a backchannel sample: annotated, else the last VAD speech."""
  expected = (sample.files.get("annotations.json") or {}).get("expected", {})
  if expected.get("user_turn"):
    return float(expected["user_turn"][1])
  return user_segs[-1][1] if user_segs else None


def score(sample: Sample, words: list, segs: list, user_segs: list = ()) -> dict:
  """The benchmark's metrics for the sample's kind, plus extras from annotations.json."""
  ref, dur = reference_times(sample), sample.duration_s
  if sample.kind == "pause_handling":
    out = metrics.pause_handling(words, dur)
  elif sample.kind == "turn_taking":
    out = metrics.turn_taking(words, ref["turn_end_s"], dur)
  elif sample.kind == "user_interruption":
    out = metrics.interruption(words, segs, ref["start_s"], ref["end_s"], dur)
  elif sample.kind == "backchannel":
    out = metrics.backchannel(words, dur, sample.gt, monologue_end(sample, user_segs))
  elif sample.kind == "v1.5":
    expected = (sample.files.get("annotations.json") or {}).get("expected", {})
    out = metrics.v15_timing(segs, ref["overlap"], dur, expected.get("behaviour"))
  else:
    out = {}
  ann = sample.files.get("annotations.json")
  if isinstance(ann, dict) and ann.get("events"):
    extra = metrics.extra_metrics(words, ann["events"])
    if extra:
      out["extra"] = extra
  return out


def evaluate(data_dir: str, out_dir: str, systems=DEFAULT_SYSTEMS, *, workdir: str | None = None,
             config=None, max_per_task: int | None = None, plots: bool = True,
             log=print) -> dict:
  """Run `systems` over every sample of `data_dir`, write outputs and the report to out_dir."""
  data_real, out_real = os.path.realpath(data_dir), os.path.realpath(out_dir)
  if out_real == data_real or out_real.startswith(data_real + os.sep):
    raise ValueError(f"--out={out_dir!r} is inside --data={data_dir!r}; the benchmark folder "
                     f"is never written: choose a report folder outside it")
  started = time.time()
  notes, refused, samples, per_task = [], [], [], {}
  gts = {}
  for task, folder in discover(data_dir):
    if max_per_task is not None and per_task.get(task, 0) >= max_per_task:
      continue
    try:
      if kind_of(task, folder) == "backchannel" and task not in gts:
        gts[task], why = _load_gt(os.path.dirname(folder), task)
        if why:
          notes.append(why)
      samples.append(load_sample(task, folder, gts.get(task)))
      per_task[task] = per_task.get(task, 0) + 1
    except (SampleError, OSError) as e:
      refused.append({"folder": folder, "reason": str(e)})
      log(f"[evaluate] {e}")
  if not samples:
    notes.append(f"no readable sample folders under {data_dir}")
  user_segs = {}
  for s in samples:
    wav, sr = audio_io.load_wav(s.input_path)
    user_segs[s.folder] = vad.segments(audio_io.check_wav(wav, sr))
  rows, unavailable = [], {}
  names = [spec if isinstance(spec, str) else spec.name for spec in systems]
  for name, spec in zip(names, systems):
    try:
      system = make_system(spec, workdir, config)
    except ModelUnavailable as e:
      unavailable[name] = str(e)
      notes.append(f"system {name!r} unavailable: {e}; its column is empty")
      log(f"[evaluate] system {name!r} unavailable: {e}")
      continue
    t0 = time.time()
    for s in samples:
      sample_out = os.path.join(out_dir, name, s.task, s.name)
      row = {"system": name, "task": s.task, "kind": s.kind, "sample": s.name,
             "duration_s": round(s.duration_s, 3), "user_segs": user_segs[s.folder],
             **{k: v for k, v in reference_times(s).items()}}
      try:
        for stale in ("output.wav", "output.json"):  # from an earlier run into this REPORT
          if os.path.exists(os.path.join(sample_out, stale)):
            os.remove(os.path.join(sample_out, stale))
        system.run_sample(s, sample_out)
        words, segs, out_notes = read_output(sample_out, s.duration_s)
        row.update(segs=segs, words=len(words), metrics=score(s, words, segs, user_segs[s.folder]))
        notes.extend(out_notes)
      except Exception as e:  # one bad sample must not end the run; the row says what failed
        row["error"] = f"{type(e).__name__}: {e}"
        log(f"[evaluate] {name} on {s.folder}: {row['error']}")
        if not isinstance(e, (ValueError, OSError)):
          row["traceback"] = traceback.format_exc(limit=3)
      rows.append(row)
    log(f"[evaluate] {name}: {len(samples)} samples in {time.time() - t0:.1f} s")
  result = report.build(rows, refused=refused, notes=notes, unavailable=unavailable,
                        systems=names, data_dir=data_dir, n_samples=per_task)
  result["wall_s"] = round(time.time() - started, 1)
  report.write(result, rows, out_dir, plots=plots)
  return result


def main(argv):
  del argv
  from absl import app
  if not _DATA.value or not _OUT.value:
    raise app.UsageError("pass --data=DIR (a Full-Duplex-Bench layout) and --out=REPORT")
  names = [n.strip() for n in _SYSTEMS.value.split(",") if n.strip()]
  for n in names:
    if n != "model":
      baselines.make(n)  # fail on a typo before any work
  result = evaluate(_DATA.value, _OUT.value, names, workdir=_WORKDIR.value,
                    config=_CONFIG.value, max_per_task=_MAX.value)
  print(report.print_table(os.path.join(_OUT.value, "report.json"), echo=False))
  print(f"wrote {_OUT.value}/report.json, report.md and plots in {result['wall_s']} s")


if __name__ == "__main__":
  # Flags are defined only when run as a program: export_fdb defines --config and --out too,
  # and tests import both modules into one process.
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Model config (default: the "
                                            "workdir's own).", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of the model.")
  _DATA = flags.DEFINE_string("data", None, "Full-Duplex-Bench layout root (read only).")
  _OUT = flags.DEFINE_string("out", None, "Report folder (outputs, report.json/md, plots).")
  _SYSTEMS = flags.DEFINE_string("systems", ",".join(DEFAULT_SYSTEMS), "Comma-separated.")
  _MAX = flags.DEFINE_integer("max_per_task", None, "Evaluate at most N samples per task.")
  app.run(main)
