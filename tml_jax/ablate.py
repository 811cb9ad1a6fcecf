r"""Reproduce an ablation with one command: train every variant of a grid at the same budget
and seeds, evaluate each by what it says out loud, and tabulate.

  python -m tml_jax.ablate --grid=configs/ablations.py:NAME --workdir=runs/ablate/NAME \
      [--budget_min=M] [--seeds=K] [--data_dir=DIR] [--eval_per_task=N]

The grids, their commands and costs are in configs/ablations.py. Per variant and seed,
W/<variant>/seed<k>/ is an ordinary trainer workdir (python -m tml_jax.train) with its
report.md, plus eval/ (python -m tml_jax.evaluate --systems=model over the test split in
Full-Duplex-Bench layout, voice scored). Each runs in its own process, as the main job's
evaluation does. W/table.md, W/table.json and W/plot_<family>.png (behaviour, losses,
probe, cost) compare the variants; with K > 1 seeds every figure is mean ± std.

Resumable: W/ablate.json records what is done. A rerun skips finished variants, resumes a
half-trained one from its checkpoint with the rest of its time budget, and re-evaluates
one whose evaluation did not finish. A rerun with another budget, steps or grid is refused
(the comparison would mix budgets); so is a W that holds files this runner did not write.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

STATE = "ablate.json"
FAMILIES = ("behaviour", "losses", "probe", "cost")
# Validation losses shown (report.json "validation"), lower is better unless *_acc.
LOSSES = ("text", "text_byte_acc", "audio_l1", "speak", "speak_acc", "background")
PROBE = ("user_speaking", "pause", "after_turn_end")


def load_grid_module(spec: str):
  """'path/to/ablations.py:NAME' -> (module, path, NAME)."""
  path, _, name = spec.partition(":")
  if not name:
    raise ValueError(f"--grid={spec!r}: pass FILE:NAME, e.g. configs/ablations.py:microturn")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--grid={spec!r}: no file {path!r} (run from the repository root, "
                            "or pass the path to configs/ablations.py)")
  mod_spec = importlib.util.spec_from_file_location("_tml_ablations", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module, path, name


class Ablation:
  def __init__(self, grid_spec: str, workdir: str, *, budget_min: float | None = None,
               seeds: int = 1, data_dir: str | None = None, eval_per_task: int | None = None,
               steps: int | None = None, log=print):
    self.module, self.grid_path, self.name = load_grid_module(grid_spec)
    grid = self.module.get_grid(self.name)
    self.budget_min = float(grid["budget_min"] if budget_min is None else budget_min)
    if steps is None:  # the grid's steps scale with an overridden budget
      steps = grid["steps"] if budget_min is None else int(
          round(grid["steps"] * self.budget_min / grid["budget_min"]))
    self.steps, self.seeds = int(steps), int(seeds)
    if self.seeds < 1 or self.budget_min <= 0 or self.steps < 1:
      raise ValueError(f"--seeds={seeds}, --budget_min={budget_min}, steps={steps}: each must "
                       "be positive")
    self.variants = list(grid["variants"])
    self.eval_per_task = int(grid["eval_per_task"] if eval_per_task is None else eval_per_task)
    self.workdir = workdir
    self.data_dir = os.path.abspath(data_dir or os.path.join(workdir, "data"))
    self.log = log
    self.state = self._load_state()

  # --------------------------------------------------------------- state
  def settings(self) -> dict:
    return dict(grid=self.name, grid_file=os.path.abspath(self.grid_path),
                budget_min=self.budget_min, steps=self.steps, seeds=self.seeds,
                eval_per_task=self.eval_per_task, data_dir=self.data_dir)

  def _load_state(self) -> dict:
    path = os.path.join(self.workdir, STATE)
    if os.path.exists(path):
      with open(path) as f:
        state = json.load(f)
      old = {k: state["settings"].get(k) for k in ("grid", "budget_min", "steps",
                                                   "eval_per_task")}
      new = {k: self.settings()[k] for k in old}
      if old != new:
        raise SystemExit(f"error: {self.workdir} holds an ablation run with {old}, not {new}. "
                         "Rerun with the same --budget_min/--eval_per_task, or use another "
                         "--workdir; nothing was changed.")
      state["settings"]["seeds"] = max(state["settings"]["seeds"], self.seeds)
      return state
    if os.path.isdir(self.workdir) and os.listdir(self.workdir):
      raise SystemExit(f"error: {self.workdir} is not empty and holds no {STATE}: it is not an "
                       "ablation run of this tool. Pick an empty or new --workdir; nothing was "
                       "changed.")
    os.makedirs(self.workdir, exist_ok=True)
    return dict(settings=self.settings(), runs={})

  def _save(self):
    path = os.path.join(self.workdir, STATE)
    with open(path + ".tmp", "w") as f:
      json.dump(self.state, f, indent=1)
    os.replace(path + ".tmp", path)

  def runs(self):
    return [(v, s) for v in self.variants for s in range(self.seeds)]

  def run_dir(self, variant: str, seed: int) -> str:
    return os.path.join(self.workdir, variant, f"seed{seed}")

  # --------------------------------------------------------------- running
  def _run(self, cmd: list[str], key: str, field: str):
    """A child process; its wall time accumulates in state[key][field] every few seconds,
    so a killed run still knows how much of its budget it used."""
    rec = self.state["runs"].setdefault(key, {})
    base = rec.get(field, 0.0)
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    stop = threading.Event()

    def beat():
      while not stop.wait(5.0):
        rec[field] = base + time.time() - t0
        self._save()
    th = threading.Thread(target=beat, daemon=True)
    th.start()
    try:
      rc = proc.wait()
    except BaseException:
      proc.terminate()  # the trainer saves on SIGTERM; a rerun resumes
      proc.wait()
      raise
    finally:
      stop.set()
      th.join()
      rec[field] = base + time.time() - t0
      self._save()
    if rc:
      raise SystemExit(f"error: {' '.join(cmd)} exited with {rc}; rerun the ablation to resume")

  def train(self, variant: str, seed: int, key: str):
    rec = self.state["runs"].setdefault(key, {})
    left_s = self.budget_min * 60 - rec.get("train_s", 0.0)
    d = self.run_dir(variant, seed)
    if rec.get("trained"):
      return
    if left_s <= 0 and os.path.exists(os.path.join(d, "report.json")):
      rec["trained"] = True
      return
    # The step cap goes into the config (the schedule, evaluation and checkpoints follow
    # it); the budget left is a runtime value.
    spec = f"{self.grid_path}:{self.name}/{variant},steps={self.steps}"
    cmd = [sys.executable, "-m", "tml_jax.train", f"--config={spec}", f"--workdir={d}",
           f"--config.seed={seed}", f"--config.data.dir={self.data_dir}",
           f"--config.train.time_budget_s={max(left_s, 1.0):.1f}"]
    self._run(cmd, key, "train_s")
    if not os.path.exists(os.path.join(d, "report.json")):
      raise SystemExit(f"error: training {d} ended without its report (preempted?); rerun the "
                       "ablation to resume it")
    rec["trained"] = True
    self._save()

  def evaluate(self, variant: str, seed: int, key: str, fdb: str):
    rec = self.state["runs"][key]
    if rec.get("evaluated"):
      return
    d = self.run_dir(variant, seed)
    cmd = [sys.executable, "-m", "tml_jax.evaluate", f"--workdir={d}", f"--data={fdb}",
           f"--out={os.path.join(d, 'eval')}", "--systems=model"]
    self._run(cmd, key, "eval_s")
    rec["evaluated"] = True
    self._save()

  def export(self) -> str:
    from tml_jax.data import export_fdb, tml_duplex
    config = self.module.variant_config(self.name, self.variants[0])
    config.data.dir = self.data_dir
    fdb = os.path.join(tml_duplex.default_dir(config.data, self.workdir),
                       f"fdb_test_{self.eval_per_task}")
    export_fdb.ensure_export(fdb, "test", config.data, per_task=self.eval_per_task,
                             log=self.log)
    return fdb

  def run(self):
    todo = self.runs()
    n = len(todo)
    self.log(f"ablation {self.name}: {len(self.variants)} variants x {self.seeds} seed(s), "
             f"{self.budget_min:g} min / at most {self.steps} steps each, "
             f"{self.eval_per_task} evaluation sample(s) per task; {self.workdir}")
    t_start, spent = time.time(), []
    fdb = None
    for i, (variant, seed) in enumerate(todo):
      key = f"{variant}/seed{seed}"
      rec = self.state["runs"].get(key, {})
      if rec.get("trained") and rec.get("evaluated"):
        self.log(f"[{i + 1}/{n}] {key}: done, skipped")
        continue
      left = n - i
      per = np.mean(spent) if spent else self.budget_min * 60 + 90
      eta = time.strftime("%H:%M", time.localtime(time.time() + left * per))
      self.log(f"[{i + 1}/{n}] {key}: {'resuming' if rec else 'training'} "
               f"({left} run(s) left, ~{left * per / 60:.0f} min, ETA {eta})")
      t0 = time.time()
      self.train(variant, seed, key)
      if fdb is None:
        fdb = self.export()
      self.log(f"[{i + 1}/{n}] {key}: evaluating on {fdb}")
      self.evaluate(variant, seed, key, fdb)
      spent.append(time.time() - t0)
    from tml_jax import ablate_report
    rows = [self.collect(v, s) for v, s in todo]
    files = ablate_report.write(self.workdir, self.name, self.settings(), rows, self.variants)
    self.log(f"ablation {self.name} finished in {(time.time() - t_start) / 60:.1f} min: "
             f"{files['md']}")
    return files

  # --------------------------------------------------------------- results
  def collect(self, variant: str, seed: int) -> dict:
    """One run's figures: behaviour (voice scored), validation, probe, cost."""
    from tml_jax.flops import forward_flops
    from tml_jax.microturn import ChunkLayout
    from tml_jax.model.transformer import ModelConfig, count_params
    d = self.run_dir(variant, seed)
    key = f"{variant}/seed{seed}"
    rec = self.state["runs"][key]
    with open(os.path.join(d, "report.json")) as f:
      rep = json.load(f)
    with open(os.path.join(d, "eval", "report.json")) as f:
      ev = json.load(f)
    steps, steps_per_s = 0, None
    with open(os.path.join(d, "metrics.jsonl")) as f:
      for line in f:
        m = json.loads(line)
        steps = max(steps, int(m.get("step", 0)))
        steps_per_s = m.get("steps_per_s", steps_per_s)
    config = self.module.variant_config(self.name, variant)
    cfg = ModelConfig.from_config(config)
    total, active = count_params(cfg)
    lay = ChunkLayout.from_config(config.layout)
    meta = lay.meta(config.layout.num_chunks)
    flops_tok = forward_flops(cfg, meta) / float(np.asarray(meta.segment).size)
    behaviour = {}
    for task, scores in ev["systems"].get("model", {}).items():
      if isinstance(scores, dict):
        for metric, value in scores.items():
          if metric != "n" and (value is None or isinstance(value, (int, float))):
            behaviour[f"{task}:{metric}"] = value
    tf = rep.get("speak_probe", {}).get("teacher-forced", {})
    probe = {f"p_speak_{k}": tf.get(k, {}).get("p_speak") for k in PROBE}
    probe["threshold"] = tf.get("calibration", {}).get("threshold")
    probe["onset_recall"] = tf.get("calibration", {}).get("onset_recall")
    return dict(variant=variant, seed=seed, behaviour=behaviour,
                losses={k: rep["validation"].get(k) for k in LOSSES}, probe=probe,
                cost=dict(total_params=int(total), active_params=int(active),
                          forward_flops_per_token=flops_tok, steps=steps,
                          steps_per_s=steps_per_s, train_min=rec.get("train_s", 0) / 60,
                          eval_min=rec.get("eval_s", 0) / 60))


def main(argv):
  del argv
  from absl import app
  if not _GRID.value or not _WORKDIR.value:
    raise app.UsageError("pass --grid=configs/ablations.py:NAME and --workdir=DIR")
  Ablation(_GRID.value, _WORKDIR.value, budget_min=_BUDGET.value, seeds=_SEEDS.value,
           data_dir=_DATA.value, eval_per_task=_PER_TASK.value, steps=_STEPS.value,
           log=lambda m: print(m, flush=True)).run()


if __name__ == "__main__":
  from absl import app, flags
  _GRID = flags.DEFINE_string("grid", None, "FILE:NAME of a grid (configs/ablations.py).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where the grid's runs and table go.")
  _BUDGET = flags.DEFINE_float("budget_min", None, "Training minutes per variant (default: "
                               "the grid's); the step cap scales with it.")
  _STEPS = flags.DEFINE_integer("steps", None, "Step cap per variant (default: the grid's).")
  _SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per variant (0..K-1).")
  _DATA = flags.DEFINE_string("data_dir", None, "The tml_duplex corpus (default W/data; "
                              "built on first use). runs/data reuses the main job's.")
  _PER_TASK = flags.DEFINE_integer("eval_per_task", None, "Evaluation samples per task.")
  app.run(main)
