"""Finding and reading Full-Duplex-Bench sample folders (our export or the released data).

DATA is the benchmark's layout: task folders of numbered sample folders with input.wav and
the task's JSON files. A sample folder that cannot be read is refused with the folder and
the file named (`SampleError`); the harness lists it and goes on. DATA is only read.
"""

from __future__ import annotations

import dataclasses
import json
import os

from tml_jax.audio import io as audio_io

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
# The backchannel script loads icc_gt_distribution.json (FDB eval_backchannel.py L19-21).
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

  @property
  def crop_s(self) -> float:
    """Where the benchmark starts transcribing output.wav: the barge-in end for user
    interruption (get_transcript/asr.py L33-45), else the clip start."""
    return reference_times(self)["end_s"] if self.kind == "user_interruption" else 0.0

  @property
  def events(self) -> list[dict]:
    ann = self.files.get("annotations.json")
    return (ann.get("events") or []) if isinstance(ann, dict) else []

  @property
  def expected(self) -> dict:
    ann = self.files.get("annotations.json")
    return (ann.get("expected") or {}) if isinstance(ann, dict) else {}


def _sort_key(name: str):
  return (0, int(name), "") if name.isdigit() else (1, 0, name)


def discover(data_dir: str) -> list[tuple[str, str]]:
  """(task, sample folder) pairs: a sample folder has a numeric name or a sample file."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"--data={data_dir!r} is not a folder; pass the root of a "
                            f"Full-Duplex-Bench layout (e.g. from python -m "
                            f"tml_jax.data.export_fdb --out=DIR)")
  found = []
  for root, dirs, _ in os.walk(data_dir):
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
  """The benchmark's JSON files hold a list of segments (its scripts read the first, e.g.
  FDB eval_smooth_turn_taking.py L48); take a bare segment dict too."""
  return content if isinstance(content, dict) else content[0]


def reference_times(s: Sample) -> dict:
  """The times a sample's metrics are measured from (the benchmark's own fields)."""
  if s.kind == "turn_taking":  # FDB eval_smooth_turn_taking.py L48
    return {"turn_end_s": float(_first(s.files["turn_taking.json"])["timestamp"][0])}
  if s.kind == "user_interruption":  # FDB eval_user_interruption.py L88
    a, b = _first(s.files["interrupt.json"])["timestamp"][:2]
    return {"start_s": float(a), "end_s": float(b)}
  if s.kind == "v1.5":
    a, b = s.files["metadata.json"]["timestamps"][:2]
    return {"overlap": (float(a), float(b))}
  return {}


def load_gt(task_dir: str, task: str) -> tuple[dict | None, str | None]:
  """A backchannel task's reference histograms, or (None, why not)."""
  for name in GT_FILES:
    path = os.path.join(task_dir, name)
    if os.path.exists(path):
      try:
        with open(path) as f:
          return json.load(f), None
      except (OSError, ValueError) as e:
        return None, f"{path} unreadable ({e}): backchannel JSD omitted for {task}"
  return None, f"no {' or '.join(GT_FILES)} in {task}: backchannel JSD omitted"


def collect(data_dir: str, max_per_task: int | None = None, log=print
            ) -> tuple[list[Sample], list[dict], list[str], dict[str, int]]:
  """(samples, refused folders, notes, samples per task) of a DATA folder."""
  samples, refused, notes, per_task, gts = [], [], [], {}, {}
  for task, folder in discover(data_dir):
    if max_per_task is not None and per_task.get(task, 0) >= max_per_task:
      continue
    try:
      if kind_of(task, folder) == "backchannel" and task not in gts:
        gts[task], why = load_gt(os.path.dirname(folder), task)
        if why:
          notes.append(why)
      samples.append(load_sample(task, folder, gts.get(task)))
      per_task[task] = per_task.get(task, 0) + 1
    except (SampleError, OSError) as e:
      refused.append({"folder": folder, "reason": str(e)})
      log(f"[evaluate] {e}")
  if not samples:
    notes.append(f"no readable sample folders under {data_dir}")
  return samples, refused, notes, per_task
