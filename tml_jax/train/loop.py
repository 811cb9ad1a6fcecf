r"""The training loop behind the project's main job:

  python -m tml_jax.train --config=configs/interaction.py:tiny --workdir=runs/tiny

Builds the corpus on first use, trains with the pure jitted `train_step` (tml_jax.train.state),
validates periodically, checkpoints asynchronously (resumes automatically when restarted;
SIGTERM saves and exits), writes TensorBoard summaries, `W/metrics.jsonl` and, at the end,
the report (`W/report.md`, loss curves; tml_jax.train.report writes what this module
measures).

Multi-host: when JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are set (see
launch/README.md), or on a TPU pod slice, `jax.distributed` is initialised first.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from tml_jax import paths
from tml_jax import probe as probe_lib
from tml_jax.config import validate
from tml_jax.model.transformer import count_params
from tml_jax.text import tokenizer as tok
from tml_jax.train import report as report_lib
from tml_jax.train import sharding as shd
from tml_jax.train.checkpoint import Checkpointer
from tml_jax.train.losses import PER_TARGET, audio_weight
from tml_jax.train.state import Setup


# ----------------------------------------------------------------------------- set-up

def maybe_initialize_distributed():
  """Explicit coordinator from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
  (launch/local.sh), or jax's own cluster detection (Slurm, TPU pod slices) when
  TML_JAX_DISTRIBUTED=auto or Slurm runs several tasks."""
  env = os.environ
  if jax.distributed.is_initialized():
    return
  if "JAX_COORDINATOR_ADDRESS" in env:
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]))
  elif env.get("TML_JAX_DISTRIBUTED") == "auto" or int(env.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()


def write_config(config, workdir: str):
  """W/config.json: what the engine and the evaluation load the model with. A different
  earlier config.json is kept as config.<n>.json (the run's config history)."""
  paths.makedirs(workdir)
  if jax.process_index() != 0:
    return
  path, text = paths.join(workdir, "config.json"), config.to_json(indent=1)
  if paths.exists(path):
    if paths.read_text(path) == text:
      return
    n = 1
    while paths.exists(paths.join(workdir, f"config.{n}.json")):
      n += 1
    paths.replace(path, paths.join(workdir, f"config.{n}.json"))
  paths.write_text(path, text)


def describe(setup: Setup):
  total, active = count_params(setup.cfg)
  print(f"model: total_params={total} active_params={active}; mesh {dict(setup.mesh.shape)} "
        f"on {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es)", flush=True)


def data_loaders(config, workdir: str):
  """(train loader, make_val() -> a fresh validation loader, data dir); builds the corpus
  in `config.data.dir` (default: data/ beside the workdir) on first use."""
  from tml_jax.data import pipeline, tml_duplex
  data_dir = tml_duplex.default_dir(config.data, workdir)
  try:
    tml_duplex.dataset_dir(data_dir, config.data)
  except FileNotFoundError:
    print(f"building the tml_duplex corpus in {data_dir} (first use) ...", flush=True)
    if jax.process_index() == 0:
      tml_duplex.build(data_dir, config.data)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("corpus built")
  train = pipeline.make_loader(tml_duplex.load_split(data_dir, "train", config.data), config,
                               split="train", seed=config.seed)
  val_src = tml_duplex.load_split(data_dir, "validation", config.data)
  make_val = lambda: pipeline.make_loader(val_src, config, split="validation", seed=0,
                                          shuffle=False, random_crop=False)
  return train, make_val, data_dir


class MetricsLog:
  """TensorBoard scalars (tml_jax.train.tensorboard, no TensorFlow) plus a plain jsonl for
  scripts; process 0 writes, the others log nothing."""

  def __init__(self, workdir: str):
    self.primary = jax.process_index() == 0
    self.writer = None
    if self.primary:
      from tml_jax.train.tensorboard import ScalarWriter
      self.writer = ScalarWriter(workdir)
    self.path = paths.join(workdir, "metrics.jsonl")

  def write(self, step: int, scalars: dict):
    scalars = {k: float(v) for k, v in scalars.items()}
    if self.primary:
      self.writer.write_scalars(step, scalars)
      paths.append_line(self.path, json.dumps(dict(step=step, **scalars)))

  def flush(self):
    if self.writer is not None:
      self.writer.flush()


# ----------------------------------------------------------------------------- measuring

def evaluate(setup: Setup, state, make_val, num_batches: int) -> dict:
  """Means over `num_batches` validation batches of every eval_step metric."""
  it = iter(make_val())
  sums, counts = {}, {}
  for i in range(num_batches):
    m = {k: float(v) for k, v in setup.eval_step(
        state, shd.to_global(next(it), setup.batch_sharding), jax.random.key(i)).items()}
    for k, v in m.items():
      w = m.get(PER_TARGET.get(k), 1.0)
      sums[k] = sums.get(k, 0.0) + w * v
      counts[k] = counts.get(k, 0.0) + w
  # A per-target metric with no target in any batch is unmeasured, not 0: left out.
  return {k: v / counts[k] for k, v in sums.items() if counts[k]}


def baselines(make_val, num_batches: int, speech_only: bool = False) -> dict:
  """Trivial predictors on the validation batches the model is scored on (the mel ones on
  the chunks the flow head is scored on: `losses.audio_weight`)."""
  it = iter(make_val())
  counts = np.zeros(tok.VOCAB_SIZE)
  mels, masks = [], []
  for _ in range(num_batches):
    b = next(it)
    valid_chunk = np.asarray(b["meta"][4]).any(-1)[:, None]
    t = np.asarray(b["model_text_target"])
    counts += np.bincount(t[t != tok.PAD], minlength=tok.VOCAB_SIZE)
    mels.append(np.asarray(b["audio_target"]))
    masks.append(np.asarray(audio_weight(b, speech_only)) & valid_chunk)
  p = counts / max(counts.sum(), 1)
  entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
  sel = np.concatenate(mels)[np.concatenate(masks)].reshape(-1, 80)  # [n * A * fpq, 80]
  median = np.median(sel, axis=0, keepdims=True)  # the best constant under L1
  return dict(text_unigram_ce=entropy, text_majority_acc=float(p.max()),
              audio_l1_channel_median=float(np.abs(sel - median).mean()),
              audio_l1_silence=float(np.abs(sel - (-7.0)).mean()))


def decoded_samples(setup: Setup, state, make_val, max_lines: int = 24) -> list[str]:
  """Teacher-forced greedy text predictions next to the targets, chunk by chunk."""
  batch = next(iter(make_val()))
  out, _ = setup.logits(state["params"], shd.to_global(batch, setup.batch_sharding))
  # The first local example lives on this process's first shard (batch is sharded by process).
  pred = np.asarray(jnp.argmax(out.addressable_data(0), -1))[0]
  target = np.asarray(batch["model_text_target"])[0]
  chunk_s = setup.config.layout.chunk_ms / 1000
  t = tok.ByteTokenizer()
  lines = []
  for c in range(target.shape[0]):
    n = max(int(np.sum(target[c] != tok.PAD)), 1)
    tgt = t.decode(target[c][target[c] != tok.PAD], show_special=True).replace("<eot>", "")
    prd = t.decode(pred[c][:n], show_special=True).replace("<eot>", "")
    if tgt or prd:
      lines.append(f"chunk {c:3d} (t={(c + 1) * chunk_s:5.1f}s) target {tgt!r:24} "
                   f"predicted {prd!r}")
  return lines[:max_lines]


def speak_probe(setup: Setup, state, make_val, num_batches: int) -> dict | None:
  """The teacher-forced speak-decision probe (tml_jax.probe) on validation batches; None
  when the model has no speak gate or the batch spans processes."""
  if not setup.cfg.speak_gate or jax.process_count() > 1:
    return None
  return probe_lib.teacher_forced_probe(
      lambda b: setup.logits(state["params"], shd.to_global(b, setup.batch_sharding))[1],
      itertools.islice(make_val(), num_batches),
      max_false_onsets=probe_lib.max_false_onsets(setup.config))


def free_running_probe(setup: Setup, state, data_dir: str, num: int,
                       speak_threshold: float) -> dict | None:
  """The probe with the model hearing its own voice (validation conversations through the
  streaming engine); None without a speak gate or across processes."""
  if not setup.cfg.speak_gate or jax.process_count() > 1 or num <= 0:
    return None
  params = jax.device_get(state["params"])
  return probe_lib.free_running_on_validation(setup.config, params, data_dir, num=num,
                                              speak_threshold=speak_threshold)


def delegate_calibration(setup: Setup, state, data_dir: str, num: int,
                         speak_threshold: float) -> tuple[dict, dict] | None:
  """(the serving DELEGATE threshold, the background model's links), with the model running
  free on the first `num` validation conversations that hold a delegation; None across
  processes or without any.

  The threshold: tml_jax.probe.calibrate_delegate_free_running (at most
  train.delegate_max_false of the gate-open chunks away from a delegation would emit
  DELEGATE). The links: tml_jax.probe.background_at_delegations (delegations forced on
  time; is the call, the tool run and the answer right?)."""
  if jax.process_count() > 1 or num <= 0:
    return None
  from tml_jax.data import tml_duplex
  config = setup.config
  source = tml_duplex.load_split(data_dir, "validation", config.data)
  records = []
  for i in range(len(source)):
    if len(records) == num:
      break
    record = source[i]
    if any(e["kind"] == "delegation" for e in json.loads(record["events_json"])):
      records.append(record)
  if not records:
    return None
  engine = probe_lib.engine_from_params(config, jax.device_get(state["params"]),
                                        speak_threshold=speak_threshold, delegate_threshold=1.0)
  chunk_s = config.layout.chunk_ms / 1000
  threshold = probe_lib.calibrate_delegate_free_running(
      engine, records, chunk_s=chunk_s,
      max_false=float(config.train.get("delegate_max_false", 0.002)))
  return threshold, probe_lib.background_at_delegations(engine, records, chunk_s=chunk_s)


def write_threshold(workdir: str, kind: str, step: int, calibration: dict):
  """W/{kind}_threshold.json: the threshold the engine serves with when the config says
  serve.{kind}_threshold="auto" (tml_jax.probe.calibrate_threshold / calibrate_delegate_
  free_running; tml_jax.serve.engine.calibrated_threshold reads it)."""
  paths.write_json(paths.join(workdir, f"{kind}_threshold.json"), dict(calibration, step=step))
  print(f"{kind} threshold calibrated on validation: {calibration['threshold']:.3f} "
        f"({', '.join(f'{k} {v}' for k, v in calibration.items() if k != 'threshold')})",
        flush=True)


def write_final_report(setup: Setup, state, make_val, workdir: str) -> dict:
  """Measures on every process (evaluation is one program over all devices); process 0
  writes the report."""
  tc = setup.config.train
  val = evaluate(setup, state, make_val, tc.eval_batches)
  base = baselines(make_val, tc.eval_batches, setup.cfg.speak_gate)
  samples = decoded_samples(setup, state, make_val)
  if jax.process_index() != 0:
    return dict(report=dict(validation=val, baselines=base, samples=samples))
  probes = {}
  from tml_jax.data import tml_duplex
  data_dir = tml_duplex.default_dir(setup.config.data, workdir)
  tf = speak_probe(setup, state, make_val, tc.eval_batches)
  if tf is not None:
    probes["teacher-forced"] = tf
    write_threshold(workdir, "speak", int(state["step"]), tf["calibration"])
    print("speak-decision probe: running the engine free on validation conversations ...",
          flush=True)
    fr = free_running_probe(setup, state, data_dir,
                            num=int(tc.get("probe_free_running_conversations", 4)),
                            speak_threshold=tf["calibration"]["threshold"])
    if fr is not None:
      probes["free-running"] = fr
  dc = delegate_calibration(
      setup, state, data_dir, int(tc.get("delegate_calibration_conversations", 6)),
      tf["calibration"]["threshold"] if tf is not None else 0.5)
  if dc is not None:
    dc, links = dc
    write_threshold(workdir, "delegate", int(state["step"]), dc)
    val.update({f"delegate_calibration_{k}": v for k, v in dc.items()
                if isinstance(v, (int, float))})
    calls = links.pop("calls")
    val.update({f"background_link_{k}": v for k, v in links.items()})
    print("background model, delegations forced on time: "
          + ", ".join(f"{k} {v}" for k, v in links.items())
          + "".join(f"\n  expected {a!r:40} wrote {b!r}" for a, b in calls), flush=True)
  return report_lib.write_report(
      workdir, variant=setup.config.variant, step=int(state["step"]), validation=val,
      baselines=base, samples=samples, rows=report_lib.read_metrics(workdir), probes=probes)


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class Run:
  """The mutable side of a run: where it is, and what it writes to."""
  setup: Setup
  ckpt: Checkpointer
  log: MetricsLog
  train_iter: object
  make_val: object
  state: dict
  step: int


def start(setup: Setup, workdir: str, train_loader, make_val) -> Run:
  """Resumes from the newest checkpoint that restores, else initialises."""
  train_iter = iter(train_loader)
  ckpt = Checkpointer(workdir, keep=setup.config.train.keep_checkpoints)
  step, state = ckpt.restore_latest(setup.abstract_state, train_iter)
  if state is None:
    state, step = setup.init(), 0
  else:
    print(f"resumed from step {step} in {ckpt.dir}", flush=True)
  return Run(setup, ckpt, MetricsLog(workdir), train_iter, make_val, state, step)


class Stop:
  """When every process stops: on SIGTERM (preemption) or when the time budget runs out.

  One process: a SIGTERM handler sets the flag and the loop stops after that step. Several
  processes must stop at the same step, or the ones still stepping hang in a collective:
  - SIGTERM: jax.distributed's preemption sync manager holds the signal (installed by
    `jax.distributed.initialize`; a Python handler would take it away). A notice on any
    process makes orbax's `reached_preemption(step)` true on all of them at one agreed step.
  - the budget: process 0's clock decides, and the decision is broadcast to all at every step.
  """

  def __init__(self, ckpt: Checkpointer, budget_s: float):
    self.ckpt, self.budget_s = ckpt, float(budget_s or 0)
    self.multi = jax.process_count() > 1
    self.signal = None
    self.t0 = time.perf_counter()
    if not self.multi:
      signal.signal(signal.SIGTERM, lambda *_: setattr(self, "signal", "SIGTERM"))

  def why(self, step: int) -> str | None:
    """"preempted" | "time_budget" | None, the same on every process."""
    if self.multi and self.ckpt.manager.reached_preemption(step):
      self.signal = "SIGTERM"
    if self.signal:
      return "preempted"
    if not self.budget_s:
      return None
    over = time.perf_counter() - self.t0 > self.budget_s
    if self.multi:
      from jax.experimental import multihost_utils
      over = bool(multihost_utils.broadcast_one_to_all(np.int32(over)))
    return "time_budget" if over else None


class Throughput:
  """Steps and tokens per second since the previous `rate` call."""

  def __init__(self, step: int, tokens_per_step: int):
    self.t, self.step, self.tokens_per_step = time.perf_counter(), step, tokens_per_step

  def rate(self, step: int) -> float:
    now = time.perf_counter()
    r = (step - self.step) / max(now - self.t, 1e-9)
    self.t, self.step = now, step
    return r


def stop_non_finite(run: Run, metrics):
  """The step kept the old state: save it, then stop loudly."""
  run.ckpt.save_once(run.step, run.state, run.train_iter)
  run.ckpt.close()
  raise FloatingPointError(
      f"non-finite loss or gradient at step {run.step} (loss={float(metrics['loss'])}, "
      f"grad_norm={float(metrics['grad_norm'])}); state before the step saved in "
      f"{run.ckpt.dir} at step {run.step}. Lower train.lr or check the data, then rerun.")


def log_train(run: Run, metrics, meter: Throughput):
  num_steps = run.setup.config.train.num_steps
  rate = meter.rate(run.step)
  tokens_s = rate * meter.tokens_per_step
  run.log.write(run.step, {k: v for k, v in metrics.items() if k != "ok"}
                | dict(steps_per_s=rate, tokens_per_s=tokens_s))
  eta = (num_steps - run.step) / max(rate, 1e-9)
  print(f"step {run.step}/{num_steps} loss {float(metrics['loss']):.4f} "
        f"text {float(metrics['text']):.4f} audio {float(metrics['audio']):.4f} "
        f"| {rate:.2f} steps/s {tokens_s:,.0f} tok/s ETA {eta / 60:.1f} min", flush=True)


def log_validation(run: Run):
  val = evaluate(run.setup, run.state, run.make_val, run.setup.config.train.eval_batches)
  probe = speak_probe(run.setup, run.state, run.make_val, run.setup.config.train.eval_batches)
  for name, r in (probe or {}).items():
    if name == "calibration":
      val["probe_threshold"] = r["threshold"]
      val["probe_onset_recall"] = r["onset_recall"] if r["onset_recall"] is not None else -1.0
      continue
    val[f"probe_{name}"] = r["p_speak"]
    val[f"probe_{name}_acc"] = r["accuracy"]
    if r.get("p_silent_now") is not None:
      val[f"probe_{name}_silent_now"] = r["p_silent_now"]
  run.log.write(run.step, {f"val_{k}": v for k, v in val.items()})
  shown = ("loss", "text", "audio", "audio_l1", "text_acc")
  print(f"  validation @ {run.step}: " + " ".join(f"{k}={v:.4f}" for k, v in val.items()
                                                  if k in shown), flush=True)


def train(run: Run, stop: Stop) -> str:
  """Steps until num_steps, SIGTERM or the time budget; returns why it stopped."""
  config = run.setup.config
  tc = config.train
  base_key = jax.random.key(config.seed)
  meter = Throughput(run.step, tc.batch_size * run.setup.cfg.layout.seq_len(
      config.layout.num_chunks))
  while run.step < tc.num_steps:
    batch = shd.to_global(next(run.train_iter), run.setup.batch_sharding)
    # The old state is donated: keep the returned one either way (unchanged when not ok).
    run.state, metrics = run.setup.train_step(run.state, batch,
                                              jax.random.fold_in(base_key, run.step))
    if not bool(metrics["ok"]):
      stop_non_finite(run, metrics)
    run.step += 1
    last = run.step == tc.num_steps
    if run.step % tc.log_every == 0 or last:
      log_train(run, metrics, meter)
    if run.step % tc.eval_every == 0 or last:
      log_validation(run)
    if run.step % tc.checkpoint_every == 0:
      run.ckpt.save(run.step, run.state, run.train_iter)
    why = stop.why(run.step)
    if why:
      return why
  return "completed"


def finish(run: Run, status: str, stop: Stop):
  run.ckpt.save_once(run.step, run.state, run.train_iter)
  run.ckpt.close()
  run.log.flush()
  if status == "preempted":
    print(f"{stop.signal} received: saved step {run.step} to {run.ckpt.dir}; rerun the "
          "same command to resume.", flush=True)
  elif status == "time_budget":
    print(f"time budget of {float(run.setup.config.train.time_budget_s):.0f}s reached at "
          f"step {run.step}; saved.", flush=True)


def train_and_evaluate(config, workdir: str, *, final_report: bool = True) -> dict:
  """Trains (or resumes) the run in `workdir`; `final_report=False` skips the end-of-run
  evaluation and report (scripts and tests that only need the checkpoints and metrics)."""
  maybe_initialize_distributed()
  workdir = paths.resolve(workdir)
  validate(config, num_devices=jax.device_count())
  setup = Setup(config, shd.make_mesh(config))
  describe(setup)
  train_loader, make_val, data_dir = data_loaders(config, workdir)
  run = start(setup, workdir, train_loader, make_val)
  # Only now: a resume that fails must leave the run's config.json as it was.
  write_config(config, workdir)
  stop = Stop(run.ckpt, config.train.time_budget_s)
  status = train(run, stop)
  finish(run, status, stop)
  if status == "preempted":
    return dict(status=status, step=run.step)
  result = dict(status=status, step=run.step, workdir=workdir, data_dir=data_dir)
  if final_report:
    result.update(write_final_report(setup, run.state, make_val, workdir))
  return result
