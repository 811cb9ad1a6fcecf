import os

# Tests are CPU-only and must not grab every core of a shared machine for threads.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite compiles hundreds of programs and runs each for a few steps: without LLVM's
# optimisation passes XLA:CPU compiles them about a fifth faster (tests/test_engine.py and
# test_evaluate.py: 169 s -> 133 s on 2 cores) and runs them slower, a trade that only
# pays in tests. The HLO, and with it the buffers and memory the plans assert on, is the
# same. Subprocesses that set XLA_FLAGS of their own (device counts) prepend these.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()

import fcntl  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Implicit rank promotion hides shape bugs; the library spells its broadcasts out.
jax.config.update("jax_numpy_rank_promotion", "raise")


# Subprocesses (trainers, launchers, ablations, notebook kernels) compile the same smoke
# programs again and again: one persistent compilation cache for the test session (xdist
# workers share their parent's pid). The workers use it too, for programs that take a
# second or more to compile (a module's fixtures run on both workers under `-n 2`).
JIT_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"tml_jax_test_jit_{os.getppid()}")
# Every process of a multi-process subprocess writes its own entries (process 1 would
# otherwise recompile in every two-process test): tests/jit_cache_every_process.
_EVERY_PROCESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jit_cache_every_process")
JIT_CACHE_ENV = dict(JAX_COMPILATION_CACHE_DIR=JIT_CACHE_DIR,
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                     TML_TEST_JIT_CACHE_EVERY_PROCESS="1",
                     PYTHONPATH=os.pathsep.join(
                         p for p in (_EVERY_PROCESS, os.environ.get("PYTHONPATH")) if p))
jax.config.update("jax_compilation_cache_dir", JIT_CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@pytest.fixture
def rng(request):
  """A fresh generator per test; the seed is printed so a failure can be replayed
  (TML_TEST_SEED=<seed> pytest tests/...::<test>)."""
  seed = int(os.environ.get("TML_TEST_SEED") or np.random.SeedSequence().entropy % (2**31))
  print(f"\n[{request.node.name}] seed={seed}")
  return np.random.default_rng(seed)


def built_once(tmp_path_factory, name: str, build) -> str:
  """A folder that `build(folder)` fills once per test session and that every pytest-xdist
  worker reads: a module fixture runs on each worker whose tests need it, and a trained run
  or an evaluated export costs ~30 s. The first worker to ask builds it under a lock; the
  others wait for it. Tests must not change what is in it."""
  base = tmp_path_factory.getbasetemp()
  if "PYTEST_XDIST_WORKER" in os.environ:
    base = base.parent  # the session's folder, above the workers' own
  folder, built = base / f"shared_{name}", base / f"shared_{name}.built"
  with open(f"{folder}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not built.exists():
      shutil.rmtree(folder, ignore_errors=True)  # a build of ours that failed half-way
      folder.mkdir()
      build(str(folder))
      built.touch()
  return str(folder)


@pytest.fixture(scope="session")
def smoke_corpus(tmp_path_factory):
  """A few short conversations built once per test session; returns (config, overrides)
  that point a `tiny,smoke` config at them."""
  from configs.interaction import get_config
  from tml_jax.data import tml_duplex
  config = get_config("tiny,smoke")
  config.data.update(dict(num_train=8, num_validation=2, num_test=2, conversation_s=6.0,
                          workers=1))

  def build(data_dir):
    config.data.dir = data_dir
    tml_duplex.build(data_dir, config.data, workers=1)

  data_dir = config.data.dir = built_once(tmp_path_factory, "corpus", build)
  overrides = [f"--config.data.dir={data_dir}", "--config.data.num_train=8",
               "--config.data.num_validation=2", "--config.data.num_test=2",
               "--config.data.conversation_s=6.0"]
  return config, overrides


@pytest.fixture(scope="session")
def random_workdir(tmp_path_factory):
  """A trainer workdir as the trainer leaves it, of an untrained tiny model: config.json +
  an orbax checkpoint at step 4."""
  import orbax.checkpoint as ocp
  from configs.interaction import get_config
  from tml_jax.train import sharding as shd
  from tml_jax.train.checkpoint import Checkpointer
  from tml_jax.train.state import Setup
  w = str(tmp_path_factory.mktemp("workdir"))
  config = get_config("tiny,smoke")
  config.seed = 3
  with open(os.path.join(w, "config.json"), "w") as f:
    f.write(config.to_json(indent=1))
  setup = Setup(config, shd.make_mesh(config))
  ckpt = Checkpointer(w, keep=1, async_save=False)
  ckpt.manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(setup.init())))
  ckpt.close()
  return w


# The longest tests (minutes each on 2 cores, `--durations`) go first, so that under
# `pytest -n 2` no worker is left running one of them alone at the end while the other
# sits idle. Order: longest first; everything else keeps its collection order.
SLOW_FIRST = (
    "test_ablate.py::test_smoke_grid_trains_evaluates_tabulates_and_resumes",
    "test_train.py::test_two_processes_stop_on_budget_report_then_one_restores",
    "test_plan.py::test_cpu_plan_of_small",
    "test_train.py::test_two_processes_stop_together_on_sigterm_to_one",
    "test_train.py::test_mesh_2x2x2_matches_one_device",
    "test_launch.py::test_tpu_pod_ships_clears_detaches_logs_and_reruns",
    "test_notebooks.py::test_notebook_runs_top_to_bottom[03_train_and_listen.ipynb]",
    "test_launch.py::test_gpu_slurm_requeues_on_usr1_and_resumes",
)


def pytest_collection_modifyitems(config, items):
  def rank(item):
    name = item.nodeid.split("/")[-1]
    return next((i for i, s in enumerate(SLOW_FIRST) if name.startswith(s)), len(SLOW_FIRST))
  items.sort(key=rank)  # stable: the rest keep their order
