"""The cluster launchers, run for real against stub gcloud / srun / scancel / scontrol / fuser
(tests/stubs/fake_cluster.py): 2 local CPU trainer processes stand in for 2 TPU workers or
2 Slurm tasks, so quoting, environment, logs, clearing the TPU, requeue and resume are
checked end to end without a cluster."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import JIT_CACHE_ENV  # the trainers share one compilation cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUBS = os.path.join(ROOT, "tests", "stubs", "fake_cluster.py")
COMMANDS = ("gcloud", "srun", "scancel", "scontrol", "sudo", "fuser", "trainer-python")
BASE = ["--config=configs/interaction.py:tiny,smoke", "--config.train.log_every=1",
        "--config.train.eval_every=1000"]
# Trainers run until SIGTERM (preemption; the Slurm job's requeue) and save then: no end-of-run
# report, whose evaluation costs more than the training here.
TRAIN = ["--config.train.num_steps=200", "--config.train.checkpoint_every=1000"]
GPU_FLAG = "--xla_gpu_enable_latency_hiding_scheduler=true"
USER_FLAG = "--xla_cpu_enable_fast_math=false"  # a harmless flag the user set

pytestmark = pytest.mark.skipif(shutil.which("bash") is None,
                                reason="the launchers are bash scripts")


class Cluster:
  """A bin folder of stubs first on PATH, their call log and their state."""

  def __init__(self, tmp):
    self.bin = tmp / "bin"
    self.bin.mkdir()
    source = open(STUBS).read().split("\n", 1)[1]
    for name in COMMANDS:
      path = self.bin / name
      path.write_text(f"#!{sys.executable}\n{source}")
      path.chmod(0o755)
    self.log, self.state = tmp / "calls.jsonl", tmp / "stub_state"
    self.python = str(self.bin / "trainer-python")

  def env(self, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CUDA_VISIBLE_DEVICES")}
    env.update(PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}", STUB_LOG=str(self.log),
               STUB_STATE=str(self.state), STUB_REAL_PYTHON=sys.executable,
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **JIT_CACHE_ENV, **extra)
    return env

  def calls(self, cmd):
    if not self.log.exists():
      return []
    return [r for r in json_lines(self.log) if r["cmd"] == cmd]


@pytest.fixture
def cluster(tmp_path):
  return Cluster(tmp_path)


def corpus_with_spaces(smoke_corpus, tmp_path):
  """The smoke overrides with the corpus behind a path that has spaces and parentheses: the
  trainer only finds its data if such an argument arrives intact."""
  _, overrides = smoke_corpus
  assert overrides[0].startswith("--config.data.dir=")
  odd = tmp_path / "corpus (a b)"
  odd.symlink_to(overrides[0].split("=", 1)[1])
  return [f"--config.data.dir={odd}", *overrides[1:]]


def wait_for(pred, timeout, what):
  t0 = time.time()
  while not pred():
    if time.time() - t0 > timeout:
      raise TimeoutError(what)
    time.sleep(0.2)


def json_lines(path) -> list[dict]:
  """The complete lines of a JSON-lines file that another process may be appending to."""
  out = []
  for line in open(path).read().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      pass  # the line being written
  return out


def max_step(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  return max((r["step"] for r in json_lines(path)), default=0) if os.path.exists(path) else 0


def kill_group(pid):
  try:
    os.killpg(pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def stop(trainers, sig=signal.SIGTERM):
  """Sends `sig` to the recorded trainer processes that are still trainers."""
  for t in trainers:
    try:
      with open(f"/proc/{t['pid']}/cmdline") as f:
        if "tml_jax.train" in f.read():
          os.kill(t["pid"], sig)
    except (FileNotFoundError, ProcessLookupError):
      pass


def slurm_xla_flags() -> str:
  """The XLA_FLAGS gpu_slurm.sbatch gives its trainers when the user set USER_FLAG. XLA_FLAGS
  are part of the compilation cache key: the TPU test's trainers get the same, and the Slurm
  test then loads every program from the cache instead of compiling it again."""
  text = open(os.path.join(ROOT, "launch", "gpu_slurm.sbatch")).read()
  block = text.split("GPU_XLA_FLAGS=(", 1)[1].split(")", 1)[0]
  flags = [line.split("#")[0].strip() for line in block.splitlines()]
  return " ".join([f for f in flags if f] + [USER_FLAG])


# ---------------------------------------------------------------- TPU pod slice

def test_tpu_pod_ships_clears_detaches_logs_and_reruns(smoke_corpus, cluster, tmp_path):
  args = [*BASE, *corpus_with_spaces(smoke_corpus, tmp_path), *TRAIN,
          "--config.train.time_budget_s=900"]
  bucket = tmp_path / "bucket (x y)"
  workdir = f"{bucket}/tml_jax/tml-test/interaction-tiny-smoke"  # RUN_NAME from --config
  homes = [tmp_path / "workers" / f"w{i}" for i in range(2)]
  device, lockfile = tmp_path / "accel0", tmp_path / "libtpu_lockfile"
  device.write_text("")
  lockfile.write_text("")
  runs = os.path.join(ROOT, "runs")
  made_runs = not os.path.isdir(runs)
  sentinel = os.path.join(runs, f"test_launch_sentinel_{os.getpid()}")
  os.makedirs(runs, exist_ok=True)
  open(sentinel, "w").close()  # so that "runs/ is not shipped" has something to leave out
  # An earlier run's process that still holds the TPU (this process must not hold it too).
  with open(device) as dev:
    holder = subprocess.Popen(["sleep", "600"], stdin=dev)
  env = cluster.env(PROJECT="proj", ZONE="zone-a", TPU_NAME="tml-test", ACCELERATOR="v5p-16",
                    BUCKET=str(bucket), REMOTE_PYTHON=cluster.python, TPU_DEVICES=str(device),
                    TPU_LOCKFILE=str(lockfile), CLEAR_WAIT_S="20", XLA_FLAGS=slurm_xla_flags(),
                    FORWARD_ENV="XLA_FLAGS", STUB_TPU_MISSING="1",
                    STUB_WORKERS=str(tmp_path / "workers"),
                    STUB_REMOTE_ENV=" ".join(["PYTHONUNBUFFERED", "STUB_LOG", "STUB_STATE",
                                              "STUB_REAL_PYTHON", *JIT_CACHE_ENV]))
  launcher = ["bash", os.path.join(ROOT, "launch", "tpu_pod.sh")]
  logs = [h / "tml_jax_logs" / "interaction-tiny-smoke" / f"worker_{i}.log"
          for i, h in enumerate(homes)]
  done = "trainer exited with status"

  def all_logs_say(text):
    return all(log.exists() and text in log.read_text() for log in logs)

  try:
    # A broken DETACH=1 would wait for 200 steps: the timeout catches it.
    p = subprocess.run([*launcher, *args], env=dict(env, DETACH="1"), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "launch/tpu_pod.sh --logs" in p.stdout, p.stdout
    assert not any(log.exists() and done in log.read_text() for log in logs)
    wait_for(lambda: len(cluster.calls("trainer-python")) == 2 and max_step(workdir) >= 2,
             300, "the detached trainers never reached step 2")
    stop(cluster.calls("trainer-python"))  # a preemption: both save and exit
    wait_for(lambda: all_logs_say(done), 120, "the detached trainers did not exit on SIGTERM")
  finally:
    os.remove(sentinel)
    if made_runs:
      os.rmdir(runs)
    holder.kill()
    stop(cluster.calls("trainer-python"), signal.SIGKILL)

  calls = cluster.calls("gcloud")
  verbs = [c["argv"][3] for c in calls]
  assert verbs == ["describe", "create", "scp", "ssh"], verbs
  for c in calls:
    assert "--zone=zone-a" in c["argv"] and "--project=proj" in c["argv"], c["argv"]
  create = calls[1]["argv"]
  assert "--accelerator-type=v5p-16" in create and "--version=v2-alpha-tpuv5" in create, create
  assert "--worker=all" in calls[2]["argv"] and "--worker=all" in calls[3]["argv"]
  assert "tml-test:~/" in calls[2]["argv"], calls[2]["argv"]

  # Shipped: the code, without runs/, the venv, git or byte code.
  for h in homes:
    code = h / "tml_jax"
    assert (code / "tml_jax" / "train" / "__main__.py").exists()
    assert (code / "configs" / "interaction.py").exists()
    for junk in ("runs", ".venv", ".git"):
      assert not (code / junk).exists(), f"{junk} was shipped to {h.name}"
    names = subprocess.run(["tar", "-tzf", str(h / "tml_jax_src.tgz")], capture_output=True,
                           text=True, check=True).stdout.split()
    assert "launch/tpu_pod.sh" in names
    bad = [n for n in names if n.startswith(("runs/", ".venv/", ".git/", "data/"))
           or "__pycache__" in n]
    assert not bad, bad[:5]

  # What each worker's trainer received: the arguments intact, the slice's environment.
  trainers = cluster.calls("trainer-python")
  assert len(trainers) == 2, [t["cwd"] for t in trainers]
  expected = ["-m", "tml_jax.train", *args, f"--workdir={workdir}"]
  coordinators = set()
  for t in trainers:
    assert t["argv"] == expected, (t["argv"], expected)
    e = t["env"]
    i = int(e["TPU_WORKER_ID"])
    assert t["cwd"] == str(homes[i] / "tml_jax")  # the shipped copy runs
    assert e["TML_JAX_DISTRIBUTED"] == "auto"
    assert e["JAX_PROCESS_ID"] == str(i) and e["JAX_NUM_PROCESSES"] == "2"
    coordinators.add(e["JAX_COORDINATOR_ADDRESS"])
    assert e["XLA_FLAGS"] == slurm_xla_flags()  # FORWARD_ENV, spaces and all
    assert "PROJECT" not in e  # the worker's environment, not this machine's
  assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")

  # The TPU was cleared: the holder got SIGTERM, the lock file is gone.
  assert holder.wait(timeout=10) == -signal.SIGTERM
  assert any("-k" in c["argv"] and "-TERM" in c["argv"] and str(device) in c["argv"]
             for c in cluster.calls("fuser"))
  assert not lockfile.exists()

  # Per-worker logs, and the run itself.
  saved = "SIGTERM received: saved step "
  for i, log in enumerate(logs):
    text = log.read_text()
    assert f"{done} 0" in text and "2 process(es)" in text and saved in text, text[-3000:]
    assert (homes[i] / "tml_jax_logs" / "latest").resolve() == log.parent.resolve()
  step = int(logs[0].read_text().split(saved)[1].split()[0])
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))

  p = subprocess.run([*launcher, "--logs"], env=dict(env, FOLLOW="0", LOG_LINES="5"),
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr
  assert "worker_0.log" in p.stdout and "worker_1.log" in p.stdout, p.stdout
  assert p.stdout.count(f"{done} 0") == 2, p.stdout

  # The same command again, in the foreground: the slice exists (no create), the code is
  # shipped again and each worker's log gets a second run appended. The trainer that runs
  # is a recording stand-in: resuming from the workdir is the trainer's own, tested through
  # the Slurm launcher below and tests/test_train.py, and a second real start costs a minute.
  stand_in = tmp_path / "stand-in-trainer"
  stand_in.write_text(f"#!{shutil.which('bash')}\necho \"stand-in trainer: $*\"\n")
  stand_in.chmod(0o755)
  p = subprocess.run([*launcher, *args], env=dict(env, STUB_REAL_PYTHON=str(stand_in)),
                     cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert [c["argv"][3] for c in cluster.calls("gcloud")][4:] == ["ssh", "describe", "scp", "ssh"]
  rerun = cluster.calls("trainer-python")[2:]
  assert len(rerun) == 2 and all(t["argv"] == expected for t in rerun), rerun
  for log in logs:
    text = log.read_text()
    assert text.count("=== ") == 2 and text.count(f"{done} 0") == 2, text[-2000:]
    assert "stand-in trainer: -m tml_jax.train" in text.split("=== ")[-1], text[-2000:]


FAKE_PYTHONS = {
    # The image's Python 3.10: too old; `pip install --user uv` puts the fake uv in place.
    "python3": """echo "python3 $*" >>"$CALLS"
case "$1" in
  -c) exit 1 ;;
  --version) echo "Python 3.10.12" ;;
  -m) mkdir -p "$HOME/.local/bin"; cp "$STORE/uv" "$HOME/.local/bin/uv" ;;
esac""",
    "uv": """echo "uv $*" >>"$CALLS"
[ "$2" = install ] && exit "${UV_FAILS:-0}"
echo "$STORE/py312\"""",
    "py312": """echo "py312 $*" >>"$CALLS"
case "$1" in
  --version) echo "Python 3.12.9" ;;
  -m) mkdir -p "$3/bin"; cp "$STORE/venv-python" "$3/bin/python" ;;
esac""",
    "venv-python": """echo "venv cwd=$PWD dist=${TML_JAX_DISTRIBUTED:-} $*" >>"$CALLS\"""",
    "old-python": """exit 1""",
}
TOOLS = ("bash", "env", "tar", "gzip", "find", "mkdir", "rm", "ln", "tee", "date", "id", "cat",
         "dirname", "basename", "cp", "grep")


def test_tpu_pod_worker_installs_python_312_with_uv(tmp_path):
  """The worker side on an image whose python3 is 3.10: an old venv is replaced, uv installs
  Python 3.12, the venv gets tml_jax and jax[tpu], the trainer runs; if uv fails too, the
  worker stops and says what to do. PATH holds only basic tools and the fakes."""
  store, path = tmp_path / "store", tmp_path / "path"
  store.mkdir()
  path.mkdir()
  for name, body in FAKE_PYTHONS.items():
    (store / name).write_text(f"#!{shutil.which('bash')}\n{body}\n")
    (store / name).chmod(0o755)
  shutil.copy(store / "python3", path / "python3")
  for tool in TOOLS:
    if shutil.which(tool):  # a missing one shows as the script's own error
      (path / tool).symlink_to(shutil.which(tool))
  src = tmp_path / "src"
  src.mkdir()
  (src / "constraints.txt").write_text("jax==0.11.2\n")

  def worker(name, uv_fails="0"):
    home = tmp_path / name
    home.mkdir()
    subprocess.run(["tar", "-C", str(src), "-czf", str(home / "tml_jax_src.tgz"), "."], check=True)
    calls = tmp_path / f"{name}.calls"
    env = dict(PATH=str(path), HOME=str(home), CALLS=str(calls), STORE=str(store),
               UV_FAILS=uv_fails, TPU_WORKER_ID="0", TML_POD_RUN_NAME="r", TML_POD_DETACH="0",
               TML_POD_PYTHON="", TML_POD_DEVICES="", TML_POD_LOCKFILE=str(home / "lock"),
               TML_POD_CLEAR_WAIT_S="1")
    return home, calls, env

  launcher = ["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--on-worker"]
  home, calls, env = worker("w")
  (home / "tml_jax" / ".venv" / "bin").mkdir(parents=True)  # from an older launcher: 3.10
  shutil.copy(store / "old-python", home / "tml_jax" / ".venv" / "bin" / "python")
  p = subprocess.run([*launcher, "--config=c.py:v", "--workdir=w d"], env=env, cwd=home,
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stdout + p.stderr
  assert "replacing" in p.stdout and "older than 3.12" in p.stdout, p.stdout
  code = home / "tml_jax"
  assert calls.read_text().splitlines() == [
      "python3 -c import sys; sys.exit(sys.version_info < (3, 12))",
      "python3 -m pip install -q --user --upgrade uv",
      "uv python install 3.12", "uv python find 3.12",
      "py312 --version", f"py312 -m venv {code}/.venv",
      f"venv cwd={home} dist= -m pip install -q --upgrade pip",
      f'venv cwd={code} dist= -m pip install -q -c constraints.txt -e .[tf] jax[tpu]',
      f"venv cwd={code} dist=auto -m tml_jax.train --config=c.py:v --workdir=w d"]
  log = (home / "tml_jax_logs" / "r" / "worker_0.log").read_text()
  assert "trainer exited with status 0" in log and "no TPU device files" in log, log

  home, calls, env = worker("w_no_uv", uv_fails="1")
  p = subprocess.run([*launcher, "--config=c.py:v"], env=env, cwd=home, capture_output=True,
                     text=True, timeout=60)
  assert p.returncode != 0
  assert "no Python >= 3.12 here" in p.stderr + p.stdout and "REMOTE_PYTHON" in p.stdout
  assert "tml_jax.train" not in calls.read_text()


def test_tpu_pod_says_what_is_missing(cluster, tmp_path):
  launcher = ["bash", os.path.join(ROOT, "launch", "tpu_pod.sh")]
  env = cluster.env()
  for k in ("PROJECT", "ZONE", "TPU_NAME", "BUCKET", "WORKDIR", "RUN_NAME"):
    env.pop(k, None)
  p = subprocess.run([*launcher, *BASE], env=env, capture_output=True, text=True)
  assert p.returncode != 0 and "set PROJECT" in p.stderr, p.stderr
  env.update(PROJECT="p", ZONE="z", TPU_NAME="t")
  p = subprocess.run([*launcher, *BASE], env=env, capture_output=True, text=True)
  assert p.returncode != 0 and "set BUCKET=gs://" in p.stderr, p.stderr
  p = subprocess.run([*launcher, "--config.train.num_steps=3"], env=dict(env, BUCKET="gs://b"),
                     capture_output=True, text=True)
  assert p.returncode != 0 and "pass --config=" in p.stderr, p.stderr
  assert not cluster.calls("gcloud")  # nothing was created or copied


# ---------------------------------------------------------------- Slurm

def test_gpu_slurm_requeues_on_usr1_and_resumes(smoke_corpus, cluster, tmp_path):
  workdir = str(tmp_path / "slurm run (1)")
  args = [*BASE, *corpus_with_spaces(smoke_corpus, tmp_path), *TRAIN, f"--workdir={workdir}"]
  spool = tmp_path / "spool"  # sbatch runs a copy of the script, from its own folder
  spool.mkdir()
  script = spool / "slurm_script"
  shutil.copy(os.path.join(ROOT, "launch", "gpu_slurm.sbatch"), script)
  env = cluster.env(SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_ID="4242", SLURM_NTASKS="2",
                    SLURM_JOB_NUM_NODES="1", PYTHON=cluster.python, XLA_FLAGS=USER_FLAG)

  def submit(out, until):
    """Runs the batch script until `until()`, then sends SIGUSR1 to its process group (the
    batch shell, srun and the tasks, as Slurm may) and returns its status and output."""
    with open(out, "w") as f:
      proc = subprocess.Popen(["bash", str(script), *args], cwd=spool, env=env, stdout=f,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
      wait_for(lambda: until() or proc.poll() is not None, 300, "the trainers never got going")
      assert proc.poll() is None, open(out).read()[-3000:]
      os.killpg(proc.pid, signal.SIGUSR1)
      proc.wait(timeout=180)
    finally:
      kill_group(proc.pid)
    return proc.returncode, open(out).read()

  rc, out = submit(tmp_path / "job1.out", lambda: max_step(workdir) >= 2)
  assert rc == 0, out[-3000:]
  assert "SIGTERM received: saved step " in out, out[-3000:]
  step = int(out.split("SIGTERM received: saved step ")[1].split()[0])
  assert 2 <= step < 200 and os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
  assert [c["argv"] for c in cluster.calls("scancel")] == [["--signal=TERM", "4242"]]
  assert [c["argv"] for c in cluster.calls("scontrol")] == [["requeue", "4242"]]

  trainers = cluster.calls("trainer-python")
  assert len(trainers) == 2
  for t in trainers:
    assert t["argv"] == ["-m", "tml_jax.train", *args], t["argv"]
    assert t["cwd"] == ROOT  # the submit directory
    e = t["env"]
    assert e["CUDA_VISIBLE_DEVICES"] == "0,1", "the job masked the node's GPUs"
    flags = e["XLA_FLAGS"].split()
    assert GPU_FLAG in flags and flags[-1] == USER_FLAG, flags
    assert float(e["XLA_PYTHON_CLIENT_MEM_FRACTION"]) > 0

  # The requeued job runs the same command again, and is requeued again on the next USR1.
  # Its trainers are recording stand-ins that wait for the signal: resuming from the
  # workdir is the trainer's own (tests/test_train.py), and a second real start costs a
  # minute of the suite.
  stand_in = tmp_path / "stand-in-trainer"
  stand_in.write_text(f"#!{shutil.which('bash')}\n"
                      "trap 'echo stand-in trainer: TERM; exit 0' TERM\n"
                      "echo \"stand-in trainer: $*\"\nsleep 120 & wait\n")
  stand_in.chmod(0o755)
  env["STUB_REAL_PYTHON"] = str(stand_in)
  job2 = tmp_path / "job2.out"
  rc, out = submit(job2, lambda: job2.exists() and job2.read_text().count(
      "stand-in trainer: -m tml_jax.train") == 2)
  assert rc == 0, out[-3000:]
  assert out.count("stand-in trainer: TERM") == 2, out[-3000:]
  rerun = cluster.calls("trainer-python")[2:]
  assert len(rerun) == 2 and all(t["argv"] == ["-m", "tml_jax.train", *args] for t in rerun)
  assert [c["argv"] for c in cluster.calls("scontrol")] == [["requeue", "4242"]] * 2


def test_gpu_slurm_says_what_is_missing(cluster, tmp_path):
  script = os.path.join(ROOT, "launch", "gpu_slurm.sbatch")
  env = cluster.env(SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_ID="7")
  p = subprocess.run(["bash", script, *BASE], env=env, capture_output=True, text=True)
  assert p.returncode != 0 and "pass --workdir=DIR" in p.stderr, p.stderr
  p = subprocess.run(["bash", script, *BASE, f"--workdir={tmp_path}"],
                     env=dict(env, PYTHON=str(tmp_path / "nope")), capture_output=True,
                     text=True)
  assert p.returncode != 0 and "no Python at" in p.stderr, p.stderr
  assert not cluster.calls("srun")
