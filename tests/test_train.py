"""The trainer as users run it: subprocesses, kills, restarts, several processes, a mesh."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--config=configs/interaction.py:tiny,smoke", "--config.train.log_every=1",
        "--config.train.eval_every=1000", "--config.train.checkpoint_every=3",
        "--config.train.final_report=False"]


# Trainer subprocesses compile the same smoke programs again and again: share a persistent
# compilation cache between them (per test session).
_CACHE = os.path.join(__import__("tempfile").gettempdir(), f"tml_jax_test_jit_{os.getppid()}")


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=_CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)
  return env


def train_cmd(workdir, overrides, *extra):
  return [sys.executable, "-m", "tml_jax.train", *BASE, *overrides, f"--workdir={workdir}",
          *extra]


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
  _, overrides = smoke_corpus
  workdir = str(tmp_path_factory.mktemp("ref"))
  run_train(workdir, overrides, "--config.train.num_steps=8")
  return workdir


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
  p = run_train(workdir, overrides, f"--config.train.num_steps={latest + 2}")
  out = p.stdout + p.stderr
  assert f"latest checkpoint step {latest} is damaged" in out and f"using step {previous}" in out
  assert os.path.isdir(os.path.join(workdir, "checkpoints_corrupt", str(latest)))
  assert f"resumed from step {previous}" in out


def test_injected_nan_stops_with_a_checkpoint(smoke_corpus, tmp_path):
  _, overrides = smoke_corpus
  workdir = str(tmp_path / "nan")
  p = run_train(workdir, overrides, "--config.train.num_steps=8",
                "--config.train.inject_nan_step=4", check=False)
  assert p.returncode != 0
  assert "non-finite loss or gradient at step 4" in p.stderr
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  assert max(losses(workdir)) == 4  # nothing logged after the bad step


def test_sigterm_saves_and_exits(smoke_corpus, tmp_path):
  _, overrides = smoke_corpus
  workdir = str(tmp_path / "term")
  proc = subprocess.Popen(train_cmd(workdir, overrides, "--config.train.num_steps=200"),
                          cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")) and
           max(losses(workdir), default=0) >= 2, 300, "trainer never reached step 2")
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-2000:]
  assert "SIGTERM received: saved step" in out
  step = int(out.split("SIGTERM received: saved step ")[1].split()[0])
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def test_two_processes_train_then_one_restores(smoke_corpus, tmp_path):
  _, overrides = smoke_corpus
  workdir = str(tmp_path / "mp")
  p = subprocess.run(["bash", "launch/local.sh", "2", *BASE, *overrides,
                      "--config.train.num_steps=3", f"--workdir={workdir}"],
                     cwd=ROOT, env=_env(PYTHON=sys.executable), capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  log0 = open(os.path.join(workdir, "process_0.log")).read()
  assert "2 process(es)" in log0 and "'data': 2" in log0
  p = run_train(workdir, overrides, "--config.train.num_steps=4")
  assert "resumed from step 3" in p.stdout
  assert max(losses(workdir)) == 4


MESH_SCRIPT = textwrap.dedent("""
    import os, sys, json
    import jax, jax.numpy as jnp, numpy as np
    from configs.interaction import get_config
    from tml_jax import sharding as shd
    from tml_jax.batch import random_batch
    from tml_jax.losses import compute_losses
    from tml_jax.trainer import Setup, to_global
    config = get_config("tiny,smoke")
    config.model.moe_impl = sys.argv[1]
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
      b = to_global(batch, setup.batch_sharding)
      def loss_fn(params):
        return compute_losses(setup.model(params), b, jax.random.key(0), setup.weights)[0]
      with jax.set_mesh(mesh):
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state["params"])
      out[name] = (float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)])
    (l1, g1), (l2, g2) = out["one"], out["mesh"]
    rel = max(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12)) for a, b in zip(g1, g2))
    print(json.dumps(dict(loss_one=l1, loss_mesh=l2, grad_rel=rel)))
""")


@pytest.mark.parametrize("impl", ["pallas"])  # dropless: expert-parallel all-to-all path
def test_mesh_2x2x2_matches_one_device(impl, rng):
  p = subprocess.run([sys.executable, "-c", MESH_SCRIPT, impl, str(int(rng.integers(1 << 30)))],
                     cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert abs(r["loss_one"] - r["loss_mesh"]) <= 1e-5 * abs(r["loss_one"]), r
  assert r["grad_rel"] < 1e-4, r
