r"""The trainer behind the project's main job:

  python -m tml_jax.train --config=configs/interaction.py:tiny --workdir=runs/tiny

Builds the corpus on first use, trains with a pure `train_step(state, batch, rng)` jitted once
with explicit shardings and donated state, validates periodically, checkpoints asynchronously
(resumes automatically when restarted; SIGTERM saves and exits), writes TensorBoard summaries,
`W/metrics.jsonl` and, at the end, `W/report.md` with loss curves.

Multi-host: when JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are set (see
launch/README.md), or on a TPU pod slice, `jax.distributed` is initialised first.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tml_jax import sharding as shd
from tml_jax.config import validate
from tml_jax.microturn import TokenMeta
from tml_jax.losses import compute_losses, sampled_audio_l1
from tml_jax.model.transformer import InteractionModel, ModelConfig, count_params

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


# ----------------------------------------------------------------------------- state

def make_optimizer(tc):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, tc.lr, warmup_steps=tc.warmup_steps, decay_steps=max(tc.num_steps, tc.warmup_steps + 1),
      end_value=tc.lr * tc.min_lr_ratio)
  # No decay on vectors (norm scales): decaying them only fights the normalisation.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                   optax.adamw(schedule, b2=tc.b2, weight_decay=tc.weight_decay,
                               mask=decay_mask))
  return tx, schedule


def _nested(flat: dict):
  out = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


class Setup:
  """Everything static about a run: model graph, shardings, optimizer, jitted steps."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.cfg = ModelConfig.from_config(config)
    abstract = nnx.eval_shape(lambda: InteractionModel(self.cfg, rngs=nnx.Rngs(0)))
    self.graphdef, abs_state = nnx.split(abstract)
    flat = dict(abs_state.flat_state())
    self.abs_state = abs_state
    param_spec = _nested({p: shd.logical_to_spec(v.get_metadata().get("logical_axes", ()),
                                                 config.sharding_rules, v.get_value().shape, mesh)
                          for p, v in flat.items()})
    self.tx, self.schedule = make_optimizer(config.train)
    abs_params = nnx.to_pure_dict(abs_state)
    abs_opt = jax.eval_shape(self.tx.init, abs_params)
    # Optimizer moments follow their parameter's sharding; scalars are replicated.
    named = lambda spec: jax.sharding.NamedSharding(mesh, spec)
    param_sh = jax.tree.map(named, param_spec,
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    opt_sh = optax.tree_utils.tree_map_params(
        self.tx, lambda _, sh: sh, abs_opt, param_sh,
        transform_non_params=lambda _: shd.replicated(mesh))
    self.state_sharding = dict(step=shd.replicated(mesh), params=param_sh, opt=opt_sh)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params, opt=abs_opt),
        self.state_sharding)
    self.batch_sharding = shd.batch_sharding(mesh)
    tc = config.train
    self.weights = {k: float(v) for k, v in tc.loss_weights.items()}
    self._init_jit = jax.jit(self._init, out_shardings=self.state_sharding)
    step_in = (self.state_sharding, self.batch_sharding, shd.replicated(mesh))
    self._train_step_jit = jax.jit(functools.partial(train_step, setup=self),
                                   in_shardings=step_in,
                                   out_shardings=(self.state_sharding, shd.replicated(mesh)),
                                   donate_argnums=(0,))
    self._eval_step_jit = jax.jit(functools.partial(eval_step, setup=self),
                                  in_shardings=step_in, out_shardings=shd.replicated(mesh))

  # The jitted steps trace under the run's mesh, so layers can see it (the MoE dispatches
  # tokens by all-to-all when the mesh has an 'expert' axis > 1).
  def init(self):
    with jax.set_mesh(self.mesh):
      return self._init_jit()

  def train_step(self, state, batch, rng):
    with jax.set_mesh(self.mesh):
      return self._train_step_jit(state, batch, rng)

  def eval_step(self, state, batch, rng):
    with jax.set_mesh(self.mesh):
      return self._eval_step_jit(state, batch, rng)

  def _init(self):
    model = InteractionModel(self.cfg, rngs=nnx.Rngs(self.config.seed))
    params = nnx.to_pure_dict(nnx.state(model))
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt=self.tx.init(params))

  def model(self, params):
    state = jax.tree.map(lambda x: x, self.abs_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)


def train_step(state, batch, rng, *, setup: Setup):
  """One optimizer step; a non-finite loss or gradient leaves the state unchanged and
  reports ok=False (the host then stops the run with the pre-step state saved)."""
  tc = setup.config.train

  def loss_fn(params):
    loss, metrics = compute_losses(setup.model(params), batch, rng, setup.weights)
    if tc.inject_nan_step >= 0:  # test hook: poison one step's loss
      loss = loss * jnp.where(state["step"] == tc.inject_nan_step, jnp.nan, 1.0)
    return loss, metrics

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  grad_norm = optax.global_norm(grads)
  updates, opt = setup.tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = dict(step=state["step"] + 1, params=params, opt=opt)
  new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, ok=ok,
                 lr=setup.schedule(state["step"]))
  return new, metrics


def eval_step(state, batch, rng, *, setup: Setup):
  model = setup.model(state["params"])
  _, metrics = compute_losses(model, batch, rng, setup.weights)
  out = model(batch)
  metrics["audio_l1"] = sampled_audio_l1(model, out.audio_cond, batch, rng,
                                         setup.config.model.flow_steps)
  return metrics


# ----------------------------------------------------------------------------- data

def to_global(batch: dict, sharding) -> dict:
  """Per-process numpy batch -> global jax arrays sharded over the batch axes."""
  batch = dict(batch)
  batch["meta"] = TokenMeta(*batch["meta"])
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def data_loaders(config, workdir: str):
  from tml_jax.data import pipeline, tml_duplex
  data_dir = config.data.dir or os.path.join(os.path.dirname(os.path.abspath(workdir)), "data")
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


# ----------------------------------------------------------------------------- loop

class MetricsLog:
  """TensorBoard (through clu) plus a plain jsonl for scripts; process 0 writes."""

  def __init__(self, workdir: str):
    from clu import metric_writers
    self.primary = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.primary)
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, step: int, scalars: dict):
    scalars = {k: float(v) for k, v in scalars.items()}
    self.writer.write_scalars(step, scalars)
    if self.primary:
      with open(self.path, "a") as f:
        f.write(json.dumps(dict(step=step, **scalars)) + "\n")

  def flush(self):
    self.writer.flush()


def evaluate(setup: Setup, state, make_val, num_batches: int) -> dict:
  from clu import metrics as clu_metrics
  it = iter(make_val())
  acc = None
  for i in range(num_batches):
    m = setup.eval_step(state, to_global(next(it), setup.batch_sharding), jax.random.key(i))
    m = {k: clu_metrics.Average.from_model_output(v) for k, v in m.items()}
    acc = m if acc is None else {k: acc[k].merge(v) for k, v in m.items()}
  return {k: float(v.compute()) for k, v in acc.items()}


def train_and_evaluate(config, workdir: str) -> dict:
  maybe_initialize_distributed()
  validate(config, num_devices=jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:  # what the engine and evaluation load the model with
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=1))
  tc = config.train
  mesh = shd.make_mesh(config)
  setup = Setup(config, mesh)
  total, active = count_params(setup.cfg)
  print(f"model: total_params={total} active_params={active}; mesh {dict(mesh.shape)} on "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es)", flush=True)
  train_loader, make_val, data_dir = data_loaders(config, workdir)
  train_iter = iter(train_loader)
  from tml_jax.checkpoint import Checkpointer
  ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints)
  step, state = ckpt.restore_latest(setup.abstract_state, train_iter)
  if state is None:
    state, step = setup.init(), 0
  else:
    print(f"resumed from step {step} in {ckpt.dir}", flush=True)
  log = MetricsLog(workdir)
  stop = {"signal": None}
  signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("signal", "SIGTERM"))

  base_key = jax.random.key(config.seed)
  tokens_per_step = tc.batch_size * setup.cfg.layout.seq_len(config.layout.num_chunks)
  t_start, t_last, step_last = time.perf_counter(), time.perf_counter(), step
  budget = float(tc.time_budget_s or 0)
  status = "completed"
  while step < tc.num_steps:
    batch = to_global(next(train_iter), setup.batch_sharding)
    new_state, metrics = setup.train_step(state, batch, jax.random.fold_in(base_key, step))
    if not bool(metrics["ok"]):
      # The step kept the old state: save it, then stop loudly.
      state = new_state
      _save_once(ckpt, step, state, train_iter)
      ckpt.close()
      raise FloatingPointError(
          f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}, "
          f"grad_norm={float(metrics['grad_norm'])}); state before the step saved in "
          f"{ckpt.dir} at step {step}. Lower train.lr or check the data, then rerun.")
    state, step = new_state, step + 1
    if step % tc.log_every == 0 or step == tc.num_steps:
      now = time.perf_counter()
      rate = (step - step_last) / max(now - t_last, 1e-9)
      scalars = {k: v for k, v in metrics.items() if k != "ok"}
      scalars.update(steps_per_s=rate, tokens_per_s=rate * tokens_per_step)
      log.write(step, scalars)
      eta = (tc.num_steps - step) / max(rate, 1e-9)
      print(f"step {step}/{tc.num_steps} loss {float(metrics['loss']):.4f} "
            f"text {float(metrics['text']):.4f} audio {float(metrics['audio']):.4f} "
            f"| {rate:.2f} steps/s {rate * tokens_per_step:,.0f} tok/s ETA {eta / 60:.1f} min",
            flush=True)
      t_last, step_last = now, step
    if step % tc.eval_every == 0 or step == tc.num_steps:
      val = evaluate(setup, state, make_val, tc.eval_batches)
      log.write(step, {f"val_{k}": v for k, v in val.items()})
      print(f"  validation @ {step}: " + " ".join(f"{k}={v:.4f}" for k, v in val.items()
                                                  if k in ("loss", "text", "audio", "audio_l1",
                                                           "text_acc")), flush=True)
    if step % tc.checkpoint_every == 0:
      ckpt.save(step, state, train_iter)
    if stop["signal"] or (budget and time.perf_counter() - t_start > budget):
      status = "preempted" if stop["signal"] else "time_budget"
      break
  _save_once(ckpt, step, state, train_iter)
  ckpt.close()
  log.flush()
  if status == "preempted":
    print(f"{stop['signal']} received: saved step {step} to {ckpt.dir}; rerun the same "
          "command to resume.", flush=True)
    return dict(status=status, step=step)
  if status == "time_budget":
    print(f"time budget of {budget:.0f}s reached at step {step}; saved.", flush=True)
  result = dict(status=status, step=step, workdir=workdir, data_dir=data_dir)
  if tc.final_report:
    from tml_jax import report
    # Every process takes part (evaluation is one program over all devices); process 0 writes.
    result.update(report.write_report(setup, state, make_val, workdir))
  return result


def _save_once(ckpt, step, state, data_iter):
  if step not in ckpt.manager.all_steps():
    ckpt.save(step, state, data_iter, force=True)
