"""Test-only: every process of a multi-process test run writes its own persistent-cache
entries.

JAX writes compilation-cache entries from process 0 only (`jax._src.compiler._cache_write`:
shared file systems such as GCS would see every host write the same file), and on CPU the
processes' keys differ (the device assignment is part of them), so without this process 1
of every two-process test (SIGTERM, budget, Slurm, TPU pod) compiled the smoke programs
again, ~30 s each on 2 cores. The tests' cache is a local folder and each process writes
its own keys, so there is no contention.

tests/conftest.py puts this folder on PYTHONPATH of the subprocesses it starts, with
TML_TEST_JIT_CACHE_EVERY_PROCESS=1; the patch is applied when `jax._src.compiler` is first
imported, so Python processes that never import JAX (the cluster stubs) pay nothing.
"""

import importlib.abc
import importlib.util
import os
import sys

_MODULE = "jax._src.compiler"


def _patch(compiler):
  write = compiler._cache_write

  def cache_write_from_any_process(*args, **kwargs):
    from jax._src import distributed
    state = distributed.global_state
    process_id, state.process_id = state.process_id, 0
    try:
      return write(*args, **kwargs)
    finally:
      state.process_id = process_id

  compiler._cache_write = cache_write_from_any_process


class _PatchOnImport(importlib.abc.MetaPathFinder):

  def find_spec(self, name, path=None, target=None):
    if name != _MODULE:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    run = spec.loader.exec_module

    def exec_module(module):
      run(module)
      _patch(module)

    spec.loader.exec_module = exec_module
    return spec


if os.environ.get("TML_TEST_JIT_CACHE_EVERY_PROCESS") == "1":
  sys.meta_path.insert(0, _PatchOnImport())
