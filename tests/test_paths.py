"""Remote workdirs stay remote: gs:// paths through a fake bucket, file:// URLs as local."""

import json
import os

import numpy as np
import pytest

from tml_jax import paths


def test_spellings():
  assert paths.resolve("gs://b/runs/x/") == "gs://b/runs/x"
  assert paths.join("gs://b/runs", "x", "checkpoints") == "gs://b/runs/x/checkpoints"
  assert paths.parent("gs://b/runs/x") == "gs://b/runs"
  assert paths.resolve("file:///tmp/a/b") == "/tmp/a/b"
  assert paths.resolve("rel/dir") == os.path.abspath("rel/dir")
  assert paths.is_remote("s3://b/x") and not paths.is_remote("file:///x")
  with pytest.raises(ValueError, match="bucket root"):
    paths.parent("gs://b")
  with pytest.raises(ValueError, match="absolute path"):
    paths.resolve("file://relative/x")
  assert paths.local_folder("gs://b/runs/x", root="/tmp/m") == "/tmp/m/gs/b/runs/x"


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  """gs:// served by a local folder through epath's backend, without append (as GCS)."""
  from etils.epath import backend as backend_lib
  from etils.epath import gpath
  root = tmp_path / "bucket_store"
  root.mkdir()
  calls = []

  def local(p):
    p = os.fspath(p)
    if p.startswith(str(root)):  # the os backend's own calls (replace checks exists)
      return p
    assert p.startswith("gs://"), p
    calls.append(p)
    return str(root / p[len("gs://"):])

  class FakeGCS(backend_lib._OsPathBackend):  # pylint: disable=protected-access
    def open(self, path, mode):
      if "a" in mode:
        raise OSError("append is not supported on this store")
      os.makedirs(os.path.dirname(local(path)), exist_ok=True)  # object stores have no dirs
      return super().open(local(path), mode)

  for name in ("exists", "isdir", "listdir", "glob", "remove", "rmtree", "stat"):
    setattr(FakeGCS, name, (lambda n: lambda self, p, *a, **k: getattr(
        backend_lib._OsPathBackend, n)(self, local(p), *a, **k))(name))
  for name in ("makedirs", "mkdir"):
    setattr(FakeGCS, name, (lambda n: lambda self, p, **k: getattr(
        backend_lib._OsPathBackend, n)(self, local(p), **k))(name))
  for name in ("rename", "replace"):
    setattr(FakeGCS, name, (lambda n: lambda self, p, d: getattr(
        backend_lib._OsPathBackend, n)(self, local(p), local(d)))(name))
  fake = FakeGCS()
  real = gpath._GPath._backend  # pylint: disable=protected-access
  monkeypatch.setattr(gpath._GPath, "_backend", property(  # pylint: disable=protected-access
      lambda self: fake if self._uri_scheme == "gs" else real.fget(self)))
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield root, calls
  assert os.listdir(cwd) == [], "a remote path was written to the local disk"


def test_run_files_go_to_the_bucket(fake_bucket):
  from configs.interaction import get_config
  from tml_jax.data import tml_duplex
  from tml_jax.serve.engine import calibrated_threshold, load_config
  from tml_jax.train import loop
  from tml_jax.train import report as report_lib
  from tml_jax.train.checkpoint import checkpoint_dir
  root, calls = fake_bucket
  w = "gs://bkt/runs/tiny"
  config = get_config("tiny,smoke")
  loop.write_config(config, w)
  assert json.load(open(root / "bkt/runs/tiny/config.json"))["variant"] == "tiny"
  loop.write_config(config, w)  # unchanged: no history copy
  config.seed = 3
  loop.write_config(config, w)  # changed: the old one is kept as config.1.json
  assert json.load(open(root / "bkt/runs/tiny/config.1.json"))["seed"] == 0
  assert load_config(w).seed == 3
  for step in (1, 2):  # the store has no append: the log is rewritten, nothing lost
    paths.append_line(paths.join(w, "metrics.jsonl"), json.dumps(dict(step=step, text=1.0 / step)))
  assert [r["step"] for r in report_lib.read_metrics(w)] == [1, 2]
  assert calibrated_threshold(w, "delegate") == 1.0  # none calibrated: plain decoding
  loop.write_threshold(w, "speak", 5, dict(threshold=0.7, onset_recall=1.0,
                                           false_onset_rate=0.0))
  loop.write_threshold(w, "delegate", 5, dict(threshold=0.04, recall=0.5, false_rate=0.0))
  assert calibrated_threshold(w) == 0.7 and calibrated_threshold(w, "delegate") == 0.04
  val = dict(text=0.5, text_acc=0.4, text_byte_acc=0.3, audio_l1=0.6, audio=0.2, balance=1.0)
  base = dict(text_unigram_ce=2.0, text_majority_acc=0.1, audio_l1_channel_median=1.5,
              audio_l1_silence=1.6)
  out = report_lib.write_report(w, variant="tiny", step=2, validation=val, baselines=base,
                                samples=["a"],
                                rows=report_lib.read_metrics(w))
  assert out["report_md"] == "gs://bkt/runs/tiny/report.md"
  for name in ("report.md", "report.json", "loss_curves.png"):
    assert (root / "bkt/runs/tiny" / name).stat().st_size > 0, name
  assert checkpoint_dir(w) == "gs://bkt/runs/tiny/checkpoints"
  assert tml_duplex.default_dir(config.data, w) == "gs://bkt/runs/data"
  with pytest.raises(FileNotFoundError, match="gs://bkt/runs/data"):
    tml_duplex.dataset_dir("gs://bkt/runs/data", config.data)
  assert all(c.startswith("gs://bkt/") for c in calls)


def _scalars(folder) -> dict:
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  ea = EventAccumulator(str(folder))
  ea.Reload()
  return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_tensorboard_scalars_locally_and_in_the_bucket(fake_bucket, tmp_path, rng):
  """The trainer's TensorBoard writer (no TensorFlow) writes files TensorBoard reads, into a
  local folder by appending and into a bucket (no append) by rewriting."""
  from tml_jax.train.tensorboard import ScalarWriter
  root, _ = fake_bucket
  values = rng.normal(size=(4, 2)).astype(np.float32)
  for logdir, where in ((str(tmp_path / "local_run"), tmp_path / "local_run"),
                        ("gs://bkt/tb", root / "bkt" / "tb")):
    w = ScalarWriter(logdir)
    for step, (a, b) in enumerate(values):
      w.write_scalars(step, {"loss": a, "lr": b})
      w.flush()
    w.close()
    (name,) = os.listdir(where)
    assert name.startswith("events.out.tfevents.")
    got = _scalars(where)
    assert [s for s, _ in got["loss"]] == list(range(4))
    np.testing.assert_allclose([v for _, v in got["loss"]], values[:, 0])
    np.testing.assert_allclose([v for _, v in got["lr"]], values[:, 1])
