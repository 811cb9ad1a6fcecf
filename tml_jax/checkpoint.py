"""Checkpoints: orbax CheckpointManager (async, last k kept) holding the train state and the
grain iterator state, with fall-back past a damaged latest checkpoint.

A checkpoint that fails to restore is moved to `<workdir>/checkpoints_corrupt/` (never
deleted: it may be worth a look), a warning names it and the step used instead, and training
continues from the newest one that restores.
"""

from __future__ import annotations

import logging
import os
import shutil

import grain
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.corrupt_dir = os.path.abspath(os.path.join(workdir, "checkpoints_corrupt"))
    self.manager = ocp.CheckpointManager(
        self.dir, item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iter))
    return self.manager.save(step, args=args, force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def restore_latest(self, abstract_state, data_iter):
    """(step, state) of the newest checkpoint that restores, or (None, None) if none does.

    `data_iter` is restored in place.
    """
    self.manager.reload()
    steps = sorted(self.manager.all_steps(), reverse=True)
    failed = []
    for step in steps:
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iter)))
      except Exception as e:  # orbax raises many types for damaged files; all mean "unusable"
        restored = self._restore_state_only(step, abstract_state, e)
        if restored is None:
          failed.append((step, f"{type(e).__name__}: {str(e)[:200]}"))
          continue
      if failed:
        self._quarantine([s for s, _ in failed])
        logging.warning(
            "checkpoint(s) at step(s) %s in %s could not be restored (%s); moved to %s and "
            "resuming from the previous good checkpoint, step %d",
            [s for s, _ in failed], self.dir, failed[0][1], self.corrupt_dir, step)
        print(f"WARNING: latest checkpoint step {failed[0][0]} is damaged "
              f"({failed[0][1][:120]}); using step {step} instead. The damaged one is kept in "
              f"{self.corrupt_dir}.", flush=True)
      return step, restored["state"]
    if failed:
      self._quarantine([s for s, _ in failed])
      print(f"WARNING: no checkpoint in {self.dir} restores ({failed}); starting from scratch."
            f" The damaged ones are kept in {self.corrupt_dir}.", flush=True)
    return None, None

  def _restore_state_only(self, step, abstract_state, error):
    """The model state alone, when only the data iterator's state cannot be restored (e.g. a
    checkpoint written by 2 processes read by 1: grain keeps one state per process)."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception:
      return None
    print(f"WARNING: step {step}: the model state restored but the data iterator state did "
          f"not ({type(error).__name__}: {str(error)[:160]}); the data stream restarts from "
          "its seed.", flush=True)
    return restored

  def _quarantine(self, steps):
    import jax
    if jax.process_index() == 0:
      os.makedirs(self.corrupt_dir, exist_ok=True)
      for s in steps:
        src = os.path.join(self.dir, str(s))
        if os.path.exists(src):
          dst = os.path.join(self.corrupt_dir, str(s))
          if os.path.exists(dst):
            shutil.rmtree(dst)
          shutil.move(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("tml_jax checkpoint quarantine")
    self.manager.reload()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
