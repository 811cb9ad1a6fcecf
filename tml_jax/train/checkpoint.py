"""Checkpoints: orbax CheckpointManager (async, last k kept) holding the train state and the
grain iterator state, with fall-back past a damaged latest checkpoint.

Layout: <workdir>/checkpoints/<step>/{state,data}; `state` is dict(step, params, opt)
(tml_jax.train.state), `data` the grain iterator state (one per process).

A checkpoint that fails to restore is moved to `<workdir>/checkpoints_corrupt/` (never
deleted: it may be worth a look), a warning names it and the step used instead, and training
continues from the newest one that restores.

`restore_params` is the serving path: the `params` subtree alone (an orbax partial restore),
without the optimizer state and without grain, which is imported only by the training path.
"""

from __future__ import annotations

import logging
import time

import orbax.checkpoint as ocp

from tml_jax import paths

ITEMS = ("state", "data")


def checkpoint_dir(workdir: str) -> str:
  """W/checkpoints; a remote workdir (gs://...) stays remote (orbax writes there itself)."""
  return paths.join(workdir, "checkpoints")


class ConfigMismatchError(ValueError):
  """The saved run's parameters do not match the config's model."""


RETRY_PAUSES_S = (0.5, 2.0)  # a read that fails is tried again after these pauses


def restore_with_retry(restore, step: int, *, pauses=None):
  """`restore()`, tried again after each pause when it raises: a transient read error (a
  network filesystem, a busy disk) must not get a good checkpoint declared damaged. The last
  error is raised when every try fails."""
  pauses = RETRY_PAUSES_S if pauses is None else pauses
  for i, pause in enumerate((*pauses, None)):
    try:
      return restore()
    except Exception as e:  # orbax/tensorstore raise many types; we cannot tell them apart
      if pause is None:
        raise
      logging.warning("restoring checkpoint step %d failed (%s: %s); trying again in %.1f s "
                      "(%d of %d)", step, type(e).__name__, str(e)[:200], pause, i + 2,
                      len(pauses) + 1)
      time.sleep(pause)


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.dir = checkpoint_dir(workdir)
    self.corrupt_dir = paths.join(workdir, "checkpoints_corrupt")
    self.manager = ocp.CheckpointManager(
        self.dir, item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    import grain  # training only (the module docstring)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iter))
    return self.manager.save(step, args=args, force=force)

  def save_once(self, step: int, state, data_iter):
    """Save `step` unless it is already saved (the periodic save may have written it)."""
    if step not in self.manager.all_steps():
      self.save(step, state, data_iter, force=True)

  def wait(self):
    self.manager.wait_until_finished()

  def restore_latest(self, abstract_state, data_iter):
    """(step, state) of the newest checkpoint that restores, or (None, None) if none does.

    `data_iter` is restored in place.
    """
    import grain  # training only
    self.manager.reload()
    steps = sorted(self.manager.all_steps(), reverse=True)
    failed = []
    for step in steps:
      # A config that does not describe the saved run is the user's to fix, not damage:
      # say which parameter differs and touch nothing.
      reader = _reader(self.dir)  # the training manager has no metadata handler for `state`
      try:
        mismatch = _params_mismatch(reader, step, abstract_state["params"])
      finally:
        reader.close()
      if mismatch:
        raise ConfigMismatchError(
            f"the checkpoint at step {step} in {self.dir} was trained with another model "
            f"config ({mismatch}). Nothing was changed. Fix: rerun with the config the run was "
            "trained with (its config.json; e.g. --config.model.speak_gate=False for runs "
            "saved before the speak gate existed), or use a new --workdir.")
      try:
        restored = restore_with_retry(lambda: self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iter))), step)
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
      paths.makedirs(self.corrupt_dir)
      for s in steps:
        src = paths.join(self.dir, str(s))
        if paths.exists(src):
          dst, n = paths.join(self.corrupt_dir, str(s)), 1
          while paths.exists(dst):  # never delete an earlier quarantined copy
            dst, n = paths.join(self.corrupt_dir, f"{s}.{n}"), n + 1
          paths.replace(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("tml_jax checkpoint quarantine")
    self.manager.reload()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _reader(ckpt_dir: str):
  # read_only: serving may read a workdir a trainer is writing; it must never clean up.
  return ocp.CheckpointManager(ckpt_dir, item_names=("state",),
                               item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(
                                   read_only=True, enable_async_checkpointing=False))


def restore_params(workdir: str, abstract_params, *, step: int | None = None,
                   skipped: list | None = None):
  """(params, step): the `params` subtree of the newest checkpoint in `workdir` that restores
  into `abstract_params` (a pure-dict tree of jax.ShapeDtypeStruct with shardings, e.g.
  `nnx.to_pure_dict` of tml_jax.train.state.params_abstract), or of `step` when given.

  When newer checkpoints fail and an older one is used, that is logged as a warning and each
  skipped one is appended to `skipped` as {"step", "error"}: a score must name its weights.

  Only the parameters are read: the optimizer state and the data iterator state are skipped
  on disk (orbax partial restore), so this needs neither optax nor grain.
  """
  ckpt_dir = checkpoint_dir(workdir)
  if not paths.isdir(ckpt_dir):
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train first "
                            f"(python -m tml_jax.train --config=... --workdir={workdir}).")
  manager = _reader(ckpt_dir)
  try:
    return _restore_params(manager, ckpt_dir, workdir, abstract_params, step,
                           [] if skipped is None else skipped)
  finally:
    manager.close()


def _restore_params(manager, ckpt_dir: str, workdir: str, abstract_params, step, skipped):
  saved = sorted(manager.all_steps(), reverse=True)
  if not saved:
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train first "
                            f"(python -m tml_jax.train --config=... --workdir={workdir}).")
  if step is not None and step not in saved:
    raise FileNotFoundError(f"no checkpoint for step={step} in {ckpt_dir}; saved steps are "
                            f"{sorted(saved)}. Pass one of them, or step=None for the newest.")
  item = {"params": abstract_params}
  # partial_restore: the rest of `state` (step, opt) is skipped on disk, not read and dropped.
  args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))
  errors = []
  for s in [step] if step is not None else saved:  # a damaged latest one is skipped
    mismatch = _params_mismatch(manager, s, abstract_params)
    if mismatch:
      errors.append(f"step {s}: {mismatch}")
      skipped.append(dict(step=int(s), error=mismatch))
      continue
    try:
      params = restore_with_retry(lambda: manager.restore(s, args=args), s)["state"]["params"]
    except Exception as e:  # orbax raises many types for damaged or mismatched files
      errors.append(f"step {s}: {type(e).__name__}: {str(e)[:300]}")
      skipped.append(dict(step=int(s), error=f"{type(e).__name__}: {str(e)[:300]}"))
      continue
    if skipped:
      logging.warning("restored the OLDER checkpoint step %d of %s: the newer ones failed (%s)",
                      s, ckpt_dir, "; ".join(errors))
    return params, s
  raise ValueError(f"no checkpoint in {ckpt_dir} matches the config's parameters "
                   f"({errors[0]}). Fix: build the abstract parameters from the config the run "
                   "was trained with (the workdir's config.json; for the engine, pass that "
                   "config with --config or keep config.json in the workdir).")


def _flat_shapes(tree) -> dict:
  import jax
  key = lambda k: str(getattr(k, "key", getattr(k, "idx", k)))
  return {"/".join(key(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _params_mismatch(manager, step: int, abstract_params) -> str | None:
  """The first parameter whose saved shape differs from `abstract_params` (or that one side
  lacks), from the checkpoint's metadata: a wrong config is named before any array is read."""
  try:
    saved = _flat_shapes(manager.item_metadata(step)["state"].tree["params"])
  except Exception:  # unreadable metadata: let the restore itself report the damage
    return None
  wanted = _flat_shapes(abstract_params)
  for path in sorted(set(saved) | set(wanted)):
    if saved.get(path) != wanted.get(path):
      return (f"parameter {path}: saved shape {saved.get(path, 'absent')}, the config's "
              f"{wanted.get(path, 'absent')}")
  return None
