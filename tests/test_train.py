"""The trainer as users run it: subprocesses, kills, restarts, several processes, a mesh."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import JIT_CACHE_ENV, TEST_XLA_FLAGS, built_once

from configs.interaction import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--config=configs/interaction.py:tiny,smoke", "--config.train.log_every=1",
        "--config.train.eval_every=1000", "--config.train.checkpoint_every=3"]

# `python -m tml_jax.train` as these tests run it: without the end-of-run report (they check
# checkpoints and metrics; the report costs an evaluation), and with `--nan_step=N` feeding
# step N a batch whose audio targets are NaN (the poisoned batch the non-finite guard is for).
TRAINER = textwrap.dedent("""
    import functools
    from absl import app, flags
    from tml_jax.train import __main__ as cli
    from tml_jax.train import state
    nan_step = flags.DEFINE_integer("nan_step", -1, "step fed a NaN batch (-1: none)")
    train_step = state.Setup.train_step
    def poisoned(self, st, batch, rng):
      if nan_step.value >= 0 and int(st["step"]) == nan_step.value:
        batch = dict(batch, audio_target=batch["audio_target"] * float("nan"))
      return train_step(self, st, batch, rng)
    state.Setup.train_step = poisoned
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(functools.partial(cli.main, final_report=False))
""")




def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **JIT_CACHE_ENV, **extra)
  env["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} {extra.get('XLA_FLAGS', '')}".strip()
  return env


def train_cmd(workdir, overrides, *extra):
  return [sys.executable, "-c", TRAINER, *BASE, *overrides, f"--workdir={workdir}", *extra]


def run_train(workdir, overrides, *extra, check=True):
  p = subprocess.run(train_cmd(workdir, overrides, *extra), cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=600)
  if check and p.returncode != 0:
    raise AssertionError(f"trainer failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                         f"{p.stderr[-3000:]}")
  return p


def losses(workdir) -> dict[int, float]:
  """step -> loss, the last record of each step (a restarted run rewrites some steps)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r:
        out[r["step"]] = r["loss"]
  return out


def wait_for(pred, timeout, what):
  t0 = time.time()
  while not pred():
    if time.time() - t0 > timeout:
      raise TimeoutError(what)
    time.sleep(0.2)


@pytest.fixture(scope="module")
def reference_run(smoke_corpus, tmp_path_factory):
  """8 uninterrupted steps, the run the others are compared with. Its workdir is given as a
  file:// URL (test_file_url_workdir_is_the_local_folder); the tests get the local path."""
  _, overrides = smoke_corpus
  build = lambda d: run_train(f"file://{d}/url run", overrides, "--config.train.num_steps=8")
  return os.path.join(built_once(tmp_path_factory, "reference_run", build), "url run")


def test_sigkill_resume_is_bitwise(smoke_corpus, reference_run, tmp_path):
  _, overrides = smoke_corpus
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(train_cmd(workdir, overrides, "--config.train.num_steps=8"),
                          cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")) and
             max(losses(workdir), default=0) >= 5, 300, "trainer never reached step 5")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert 3 in [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  run_train(workdir, overrides, "--config.train.num_steps=8")
  ref, got = losses(reference_run), losses(workdir)
  assert sorted(got) == list(range(1, 9))
  for step in range(1, 9):
    assert got[step] == ref[step], (step, got[step], ref[step])  # bitwise on CPU


def test_corrupt_latest_checkpoint_falls_back(smoke_corpus, reference_run, tmp_path):
  import shutil
  _, overrides = smoke_corpus
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(reference_run, workdir)
  ckpt = os.path.join(workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
  latest, previous = steps[-1], steps[-2]
  for root, _, files in os.walk(os.path.join(ckpt, str(latest), "state")):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(max(os.path.getsize(f.name) // 3, 1))
  # A resume given the workdir as a file:// URL (test_file_url_workdir_is_the_local_folder).
  p = run_train(f"file://{workdir}", overrides, f"--config.train.num_steps={latest + 2}")
  out = p.stdout + p.stderr
  assert f"latest checkpoint step {latest} is damaged" in out and f"using step {previous}" in out
  assert os.path.isdir(os.path.join(workdir, "checkpoints_corrupt", str(latest)))
  assert f"resumed from step {previous}" in out


def _snapshot(root):
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_config_mismatch_rerun_exits_nonzero_and_touches_nothing(smoke_corpus, reference_run,
                                                                 tmp_path):
  import shutil
  _, overrides = smoke_corpus
  workdir = str(tmp_path / "rerun")
  shutil.copytree(reference_run, workdir)
  before = _snapshot(workdir)
  p = run_train(workdir, overrides, "--config.train.num_steps=10",
                "--config.model.speak_gate=False", check=False)
  assert p.returncode != 0
  assert "speak_" in p.stdout + p.stderr and "Nothing was changed" in p.stdout + p.stderr
  assert _snapshot(workdir) == before  # config.json, checkpoints, metrics: byte-identical


def test_quarantine_never_deletes(tmp_path):
  """A second quarantine of the same step number keeps the first copy."""
  from tml_jax.train.checkpoint import Checkpointer
  ckpt = Checkpointer(str(tmp_path), keep=2, async_save=False)
  for n, content in enumerate((b"first damaged copy", b"second damaged copy")):
    os.makedirs(tmp_path / "checkpoints" / "5", exist_ok=True)
    (tmp_path / "checkpoints" / "5" / "data").write_bytes(content)
    ckpt._quarantine([5])
    assert not (tmp_path / "checkpoints" / "5").exists()
  ckpt.close()
  kept = {p.parent.name: p.read_bytes() for p in (tmp_path / "checkpoints_corrupt").rglob("data")}
  assert kept == {"5": b"first damaged copy", "5.1": b"second damaged copy"}


def test_injected_nan_stops_with_a_checkpoint(smoke_corpus, tmp_path):
  _, overrides = smoke_corpus
  workdir = str(tmp_path / "nan")
  p = run_train(workdir, overrides, "--config.train.num_steps=8",
                "--nan_step=4", check=False)
  assert p.returncode != 0
  assert "non-finite loss or gradient at step 4" in p.stderr
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  assert max(losses(workdir)) == 4  # nothing logged after the bad step


def test_file_url_workdir_is_the_local_folder(reference_run):
  """--workdir=file:///abs/run: orbax, TensorBoard, metrics and config all land in /abs/run,
  and no `file:` folder appears where the trainer runs (tests/test_paths.py: gs://). A
  resume from such a URL: test_corrupt_latest_checkpoint_falls_back."""
  workdir = pathlib.Path(reference_run)
  assert (workdir / "checkpoints" / "6").is_dir() and (workdir / "checkpoints" / "8").is_dir()
  assert json.loads((workdir / "config.json").read_text())["variant"] == "tiny"
  assert max(losses(str(workdir))) == 8
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir))
  assert not os.path.exists(os.path.join(ROOT, "file:"))


def _start_two_processes(workdir, overrides, *extra):
  """Two trainer processes joined through an explicit coordinator, each logging to a file."""
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  os.makedirs(workdir, exist_ok=True)
  procs = []
  for i in range(2):
    env = _env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    log = open(os.path.join(workdir, f"process_{i}.log"), "w")
    procs.append(subprocess.Popen(train_cmd(workdir, overrides, *extra), cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, text=True))
  return procs


def _finish_two(workdir, procs, timeout=180) -> list[str]:
  """Both processes' logs once they exit; a hang (one process left in a collective) fails."""
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = [open(os.path.join(workdir, f"process_{i}.log")).read() for i in range(2)]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


def _same_stop_step(logs, pattern) -> int:
  """The step both processes' logs name after `pattern`; they must agree."""
  steps = []
  for log in logs:
    assert pattern in log, log[-2000:]
    steps.append(int(log.split(pattern)[1].split()[0].rstrip(";")))
  assert steps[0] == steps[1], steps
  assert 0 < steps[0] < 200
  return steps[0]


def test_two_processes_stop_together_on_sigterm_to_one(smoke_corpus, tmp_path):
  """SIGTERM to process 1 only: both processes stop after the same step, save it together
  and exit 0 (none is left in a collective). A single process goes through the same
  handler, so this covers the one-process preemption too."""
  _, overrides = smoke_corpus
  workdir = str(tmp_path / "sigterm")
  procs = _start_two_processes(workdir, overrides, "--config.train.num_steps=200",
                               "--config.train.checkpoint_every=1000")
  metrics = os.path.join(workdir, "metrics.jsonl")
  wait_for(lambda: os.path.exists(metrics) and max(losses(workdir), default=0) >= 2, 300,
           "the two processes never reached step 2")
  procs[1].send_signal(signal.SIGTERM)
  step = _same_stop_step(_finish_two(workdir, procs), "SIGTERM received: saved step ")
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def test_two_processes_stop_on_budget_report_then_one_restores(smoke_corpus, tmp_path):
  """launch/local.sh 2 with a time budget on each process's own clock: both stop after the
  same step and save it; the end-of-run report is measured by both and written once by
  process 0; one process then resumes from that checkpoint."""
  _, overrides = smoke_corpus
  workdir = str(tmp_path / "mp")
  # The engine-driven parts of the report run on process 0 alone and are tested in
  # tests/test_probe.py; here they would only add a minute to each of the two runs.
  no_engine = ["--config.train.probe_free_running_conversations=0",
               "--config.train.delegate_calibration_conversations=0"]
  p = subprocess.run(["bash", "launch/local.sh", "2", *BASE, *overrides,
                      "--config.train.num_steps=200", "--config.train.checkpoint_every=1000",
                      "--config.train.time_budget_s=6", f"--workdir={workdir}", *no_engine],
                     cwd=ROOT, env=_env(PYTHON=sys.executable), capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  logs = [open(os.path.join(workdir, f"process_{i}.log")).read() for i in range(2)]
  assert "2 process(es)" in logs[0] and "'data': 2" in logs[0]
  step = _same_stop_step(logs, "reached at step ")
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
  with open(os.path.join(workdir, "report.md")) as f:
    assert f.read().startswith("# Training report (tiny)")
  assert os.path.getsize(os.path.join(workdir, "loss_curves.png")) > 0
  assert "validation" in json.load(open(os.path.join(workdir, "report.json")))
  p = run_train(workdir, overrides, f"--config.train.num_steps={step + 1}", *no_engine)
  assert f"resumed from step {step}" in p.stdout
  assert max(losses(workdir)) == step + 1


ENGINE_SCRIPT = textwrap.dedent("""
    import builtins, json, sys
    import numpy as np
    workdir = sys.argv[1]
    # Serving must not need the training dependencies: grain cannot be imported at all, and no
    # tml_jax module may import optax, clu or TensorFlow (flax.nnx itself imports optax, so
    # blocking optax outright would stop flax, not our code).
    sys.modules["grain"] = None
    real_import = builtins.__import__
    def guarded(name, globals=None, locals=None, fromlist=(), level=0):
      importer = (globals or {}).get("__name__") or ""
      if importer.startswith("tml_jax") and name.split(".")[0] in ("optax", "clu", "tensorflow"):
        raise ImportError(f"{importer} imports {name} on the serving path")
      return real_import(name, globals, locals, fromlist, level)
    builtins.__import__ = guarded
    import jax
    from flax import nnx
    from tml_jax.serve.engine import Engine
    engine = Engine.from_workdir(workdir, warmup=False)
    served = nnx.to_pure_dict(engine.stream.state)
    loaded = sorted(m for m in sys.modules if m.startswith("tml_jax.train"))
    builtins.__import__ = real_import
    del sys.modules["grain"]
    # The trainer's view of the same step: its whole state, restored as a resume would.
    import orbax.checkpoint as ocp
    from tml_jax.serve.engine import load_config
    from tml_jax.train import sharding as shd
    from tml_jax.train.checkpoint import Checkpointer
    from tml_jax.train.state import Setup
    config = load_config(workdir)
    setup = Setup(config, shd.make_mesh(config))
    ckpt = Checkpointer(workdir, keep=100, async_save=False)
    trained = ckpt.manager.restore(engine.step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(setup.abstract_state)))["state"]
    ckpt.close()
    a, b = jax.tree.leaves(served), jax.tree.leaves(trained["params"])
    same = len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    print(json.dumps(dict(step=engine.step, trained_step=int(trained["step"]), leaves=len(a),
                          same=same, loaded=loaded)))
""")


def test_engine_restores_the_trained_params_without_grain(reference_run):
  p = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, reference_run], cwd=ROOT,
                     env=_env(), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r["step"] == r["trained_step"] == 8, r  # the newest checkpoint
  assert r["same"] and r["leaves"] > 0, r
  # Serving loaded the abstract state and the checkpoint reader, never the training loop.
  assert "tml_jax.train.loop" not in r["loaded"], r["loaded"]


def test_restore_params_steps_and_errors(reference_run, tmp_path):
  import jax
  from flax import nnx
  from tml_jax.serve.engine import load_config
  from tml_jax.train.checkpoint import restore_params
  from tml_jax.train.state import params_abstract
  config = load_config(reference_run)
  _, abstract = params_abstract(config)
  params, step = restore_params(reference_run, nnx.to_pure_dict(abstract), step=3)
  assert step == 3 and len(jax.tree.leaves(params)) == len(jax.tree.leaves(abstract))
  with pytest.raises(FileNotFoundError, match="train first"):
    restore_params(str(tmp_path), nnx.to_pure_dict(abstract))
  with pytest.raises(FileNotFoundError, match=r"step=5 .*saved steps are \[3, 6, 8\]"):
    restore_params(reference_run, nnx.to_pure_dict(abstract), step=5)
  config.model.d_model //= 2
  _, wrong = params_abstract(config)
  with pytest.raises(ValueError, match="config.json"):
    restore_params(reference_run, nnx.to_pure_dict(wrong))


MESH_SCRIPT = textwrap.dedent("""
    import os, sys, json
    import jax, jax.numpy as jnp, numpy as np
    from configs.interaction import get_config
    from tml_jax.batch import random_batch
    from tml_jax.train import sharding as shd
    from tml_jax.train.losses import compute_losses
    from tml_jax.train.state import Setup
    config = get_config("tiny,smoke")
    config.model.moe_impl = sys.argv[1]
    config.model.num_layers = 1  # one block holds every sharded op; a second only adds compile
    config.train.batch_size = 8
    batch = random_batch(__import__("tml_jax.microturn", fromlist=["x"]).ChunkLayout.from_config(
        config.layout), batch=8, num_chunks=6, num_docs=2, pad_chunks=1, seed=int(sys.argv[2]))
    out = {}
    for name, mesh_cfg, devs in (("one", dict(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1]),
                                 ("mesh", dict(data=2, fsdp=2, expert=2, tensor=1), jax.devices())):
      config.mesh.update(mesh_cfg)
      mesh = shd.make_mesh(config, devs)
      setup = Setup(config, mesh)
      state = setup.init()
      b = shd.to_global(batch, setup.batch_sharding)
      def loss_fn(params):
        return compute_losses(setup.model(params), b, jax.random.key(0), setup.weights)[0]
      with jax.set_mesh(mesh):
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state["params"])
      out[name] = (float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)])
    (l1, g1), (l2, g2) = out["one"], out["mesh"]
    rel = max(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12)) for a, b in zip(g1, g2))
    print(json.dumps(dict(loss_one=l1, loss_mesh=l2, grad_rel=rel)))
""")


@pytest.mark.parametrize("impl", ["grouped"])  # dropless: expert-parallel all-to-all path
def test_mesh_2x2x2_matches_one_device(impl, rng):
  p = subprocess.run([sys.executable, "-c", MESH_SCRIPT, impl, str(int(rng.integers(1 << 30)))],
                     cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert abs(r["loss_one"] - r["loss_mesh"]) <= 1e-5 * abs(r["loss_one"]), r
  assert r["grad_rel"] < 1e-4, r


def test_config_mismatch_is_an_error_not_damage(tmp_path):
  """A resume with a config whose model differs from the saved run's raises an error naming
  the parameter and touches nothing: no quarantine, the checkpoint stays where it was."""
  import grain
  from tml_jax.train import sharding as shd
  from tml_jax.train.checkpoint import Checkpointer, ConfigMismatchError
  from tml_jax.train.state import Setup

  def loader():
    return iter(grain.DataLoader(data_source=list(range(8)), sampler=grain.samplers.IndexSampler(
        num_records=8, shuffle=False, num_epochs=1, seed=0)))

  config = get_config("tiny,smoke")
  setup = Setup(config, shd.make_mesh(config))
  ckpt = Checkpointer(str(tmp_path), keep=2, async_save=False)
  ckpt.save(3, setup.init(), loader(), force=True)
  ckpt.close()
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  other = get_config("tiny,smoke")
  other.model.speak_gate = not config.model.speak_gate
  ckpt = Checkpointer(str(tmp_path), keep=2, async_save=False)
  with pytest.raises(ConfigMismatchError, match="speak_"):
    ckpt.restore_latest(Setup(other, shd.make_mesh(other)).abstract_state, loader())
  step, _ = ckpt.restore_latest(setup.abstract_state, loader())
  ckpt.close()
  assert step == 3
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  assert not (tmp_path / "checkpoints_corrupt").exists()


def test_schedule_is_optax_and_a_run_time_input(rng):
  """The learning rate the step uses is optax's warmup-cosine schedule, and a run's length is
  not part of the compiled step: configs differing only in num_steps lower to one program
  (so every trainer in these tests can share one cached compilation)."""
  import jax
  import numpy as np
  import optax
  from tml_jax.plan.build import abstract_batch
  from tml_jax.train import sharding as shd
  from tml_jax.train.state import Setup, learning_rate

  for _ in range(3):
    peak = float(10 ** rng.uniform(-4.5, -2.5))
    warmup, decay = int(rng.integers(0, 40)), int(rng.integers(41, 400))
    end = peak * float(rng.uniform(0.0, 0.5))
    ref = optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps=warmup,
                                             decay_steps=decay, end_value=end)
    steps = np.concatenate([np.arange(0, 50), rng.integers(0, decay + 100, size=50)])
    numbers = np.asarray([peak, warmup, decay, end], np.float32)
    got = np.asarray([learning_rate(s, numbers) for s in steps])
    want = np.asarray([ref(int(s)) for s in steps])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 * peak)

  texts = []
  for n in (int(rng.integers(2, 50)), int(rng.integers(50, 5000))):
    config = get_config("tiny,smoke")
    config.train.num_steps = n
    setup = Setup(config, shd.make_mesh(config))
    _, batch = abstract_batch(config, setup.batch_sharding)
    with jax.set_mesh(setup.mesh):
      texts.append(setup._train_step_jit.lower(setup.abstract_state, batch, jax.random.key(0),
                                               setup.schedule_numbers).as_text())
  assert texts[0] == texts[1]


def test_delegate_terms_count_only_delegate_targets(rng):
  """The `delegate` term is the mean CE over DELEGATE targets alone; delegate_acc and
  delegate_false are greedy emissions at and away from them; validation averages the
  per-target metrics by their targets, and leaves them out when a split has none."""
  import jax.numpy as jnp
  from tml_jax.text import tokenizer as tok
  from tml_jax.train import loop
  from tml_jax.train.losses import cross_entropy, text_terms
  B, C, T, V = 2, 5, 4, tok.VOCAB_SIZE
  logits = rng.normal(size=(B, C, T, V)).astype(np.float32)
  target = rng.integers(0, 256, size=(B, C, T))
  target[..., -1] = tok.PAD
  target[0, 1, 0], target[1, 3, 2] = tok.DELEGATE, tok.DELEGATE
  logits[0, 1, 0, tok.DELEGATE] = 50.0  # emitted where it should be
  logits[1, 4, 1, tok.DELEGATE] = 50.0  # and once where it should not
  valid = np.ones((B, C), bool)
  m = {k: float(v) for k, v in text_terms(jnp.asarray(logits), jnp.asarray(target),
                                          jnp.asarray(valid)).items()}
  ce = np.asarray(cross_entropy(jnp.asarray(logits), jnp.asarray(target)))
  np.testing.assert_allclose(m["delegate"], (ce[0, 1, 0] + ce[1, 3, 2]) / 2, rtol=1e-5)
  assert m["delegate_targets"] == 2 and m["delegate_acc"] == 0.5
  np.testing.assert_allclose(m["delegate_false"], 1 / (B * C * (T - 1) - 2))
  none = target.copy()
  none[none == tok.DELEGATE] = 7
  m0 = text_terms(jnp.asarray(logits), jnp.asarray(none), jnp.asarray(valid))
  assert float(m0["delegate"]) == 0 and float(m0["delegate_targets"]) == 0

  class FakeSetup:  # evaluate() over three batches: 2, 0 and 1 DELEGATE targets
    batch_sharding = None
    batches = [dict(delegate=1.0, delegate_targets=2.0, delegate_acc=1.0, text=2.0),
               dict(delegate=0.0, delegate_targets=0.0, delegate_acc=0.0, text=4.0),
               dict(delegate=4.0, delegate_targets=1.0, delegate_acc=0.0, text=6.0)]

    def eval_step(self, state, batch, key):
      return self.batches[batch]

  import itertools
  from unittest import mock
  with mock.patch.object(loop.shd, "to_global", lambda b, s: b):
    val = loop.evaluate(FakeSetup(), None, lambda: itertools.count(), 3)
    np.testing.assert_allclose([val["delegate"], val["delegate_acc"], val["text"]],
                               [(2 * 1 + 4) / 3, 2 / 3, 4.0])
    FakeSetup.batches = [dict(b, delegate_targets=0.0) for b in FakeSetup.batches]
    val = loop.evaluate(FakeSetup(), None, lambda: itertools.count(), 3)
    assert "delegate" not in val and "delegate_acc" not in val and val["text"] == 4.0
