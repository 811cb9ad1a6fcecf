"""The systems the harness runs: the model (the streaming engine) and the baselines.

A system writes, per sample, output.wav (time-aligned with input.wav, same length) and may
write monologue.json (the words it meant to say, in the benchmark's transcript shape). It
never writes output.json: the harness writes that from the ASR of output.wav, for every
system alike (`tml_jax.eval.harness`).

Any object with `.name` and `.run_sample(sample, out_dir)` is a system too (e.g. a test
oracle).
"""

from __future__ import annotations

import os

from tml_jax.audio import io as audio_io
from tml_jax.eval import baselines


class ModelUnavailable(RuntimeError):
  pass


def engine_class():
  """The streaming engine, imported only when the model runs (baselines need no JAX model).
  tml_jax.serve first: tml_jax.interact defines absl flags that clash with ours."""
  try:
    from tml_jax.serve.engine import Engine
  except ImportError:
    from tml_jax.interact import Engine
  return Engine


class ModelSystem:
  """The streaming engine of tml_jax.interact, loaded once from a training workdir.

  `step` is the checkpoint step the engine restored (None when it does not say), and
  `skipped` the newer checkpoints it could not load, both recorded in report.json so a score
  names the weights it scored.
  """
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
    self.workdir = workdir
    step = getattr(self.engine, "step", None)
    self.step = int(step) if step is not None else None
    # Newer checkpoints the engine could not load (it fell back to an older one).
    self.skipped = list(getattr(self.engine, "skipped_checkpoints", []))

  def run_sample(self, sample, out_dir: str):
    os.makedirs(out_dir, exist_ok=True)
    # The folder, not input.wav: the engine also reads a sample's video (video.npy, frames/)
    # and what the user typed (annotations.json), which is input too (TEXT_IN).
    self.engine.run_file(sample.folder, out_dir)


class BaselineSystem:
  def __init__(self, name: str):
    self.impl = baselines.make(name)
    self.name = name

  def run_sample(self, sample, out_dir: str):
    wav, sr = audio_io.load_wav(sample.input_path)
    self.impl.respond(audio_io.check_wav(wav, sr, name="input.wav"), out_dir)


def make_system(spec, workdir: str | None, config=None):
  """A system by name, or `spec` itself when it is an object with .name and .run_sample."""
  if not isinstance(spec, str):
    return spec
  return ModelSystem(workdir, config) if spec == "model" else BaselineSystem(spec)
