"""Every orbax call of the project lives here (orbax's API churns; one place to follow it).

A training checkpoint at step s holds these items:
  params     the trainable parameters (a nested dict of arrays, fp32)
  opt_state  the optimizer state (trainables only)
  data       the grain iterator's position, one JSON file per process
  meta       {"step", "config", ...} as JSON
  inherited  only when stage 2 freezes modules that stage 1 trained (a model trained from
             scratch): those modules' weights, so that inference can rebuild the model
Saves are asynchronous, every `save_every` steps (and whenever forced: end of run,
preemption), keeping the last `keep`. Every process calls save and restore: each writes the
shards it owns, and orbax's primary process finalises the directory, so a checkpoint is
written cooperatively. A save interrupted half-way (SIGKILL) leaves only a temporary
directory, which is never read back.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
import tempfile
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from frameselect_jax import errors

ITEMS = ("params", "opt_state", "data", "meta", "inherited")


def _handlers():
  return {
    "params": ocp.StandardCheckpointHandler(),
    "opt_state": ocp.StandardCheckpointHandler(),
    "data": grain.checkpoint.CheckpointHandler(),
    "meta": ocp.JsonCheckpointHandler(),
    "inherited": ocp.StandardCheckpointHandler(),
  }


class Checkpointer:
  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every,
      max_to_keep=keep,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=ITEMS, item_handlers=_handlers()
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(
    self,
    step: int,
    *,
    params,
    opt_state,
    data_iterator,
    meta: dict,
    inherited: dict | None = None,
    force: bool = False,
  ) -> bool:
    """Starts an asynchronous save; returns False when the interval says not now."""
    items = dict(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      meta=ocp.args.JsonSave(meta),
    )
    if inherited:
      items["inherited"] = ocp.args.StandardSave(inherited)
    args = ocp.args.Composite(**items)
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, *, abstract_params, abstract_opt_state, data_iterator):
    """Restores params and optimizer state onto the shardings of the abstract trees
    (jax.ShapeDtypeStruct with .sharding) and moves `data_iterator` to its saved position.
    Returns (params, opt_state, meta)."""
    args = ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params),
      opt_state=ocp.args.StandardRestore(abstract_opt_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator),
      meta=ocp.args.JsonRestore(),
    )
    try:
      with _stderr_dropped_on_failure():
        restored = self.manager.restore(step, args=args)
    except Exception as error:  # damaged files, or trees of another config
      raise DamagedCheckpointError(
        f"{self.directory}/{step}: cannot restore it (damaged, or written by another "
        f"config?): {errors.one_line(error, 200)}"
      ) from error
    return restored["params"], restored["opt_state"], restored["meta"]

  def wait(self):
    """Blocks until every started save is on disk."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def latest_step(directory: str) -> int | None:
  """The newest complete checkpoint step under `directory`, or None (missing directory too).

  Orbax writes a step into a temporary directory and renames it to the bare step number
  only when every item is committed, so integer-named directories are the complete ones.
  """
  if not os.path.isdir(directory):
    return None
  steps = [
    int(name)
    for name in os.listdir(directory)
    if name.isdigit() and os.path.isdir(os.path.join(directory, name))
  ]
  return max(steps) if steps else None


def load_params_numpy(directory: str, step: int | None = None) -> dict:
  """The `params` item as host numpy arrays, without knowing its structure (tests, tools)."""
  step = latest_step(directory) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {directory!r}")
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  path = os.path.join(os.path.abspath(directory), str(step), "params")
  metadata = checkpointer.metadata(path)
  tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  params = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  checkpointer.close()
  return params


@contextlib.contextmanager
def _stderr_dropped_on_failure(settle_s: float = 0.5):
  """orbax reads a checkpoint with many concurrent tensorstore operations. When one fails on a
  damaged file, the others' callbacks land on an event loop already closed and print
  tracebacks from C++ straight to file descriptor 2, after our one-line error. So fd 2 is
  captured during the read: replayed when the read succeeds, dropped (once the stragglers
  have had settle_s to finish) when it fails, since the error raised says what went wrong."""
  sys.stderr.flush()
  saved = os.dup(2)
  failed = False
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    except BaseException:
      failed = True
      time.sleep(settle_s)
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if not failed:
        capture.seek(0)
        if data := capture.read():
          os.write(2, data)


class DamagedCheckpointError(ValueError):
  """A checkpoint's files exist but cannot be read."""


def saved_tree(directory: str, step: int | None = None, item: str = "params"):
  """The saved item's tree of array metadata (shapes, dtypes), None when the step lacks the
  item; nothing is read but metadata."""
  step = latest_step(directory) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {directory!r}")
  path = os.path.join(os.path.abspath(directory), str(step), item)
  if not os.path.isdir(path):
    return None
  # The handler's own metadata: the Checkpointer's would also look for step metadata, which
  # an item folder does not have, and warn.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    with _stderr_dropped_on_failure():
      return handler.metadata(pathlib.Path(path)).tree
  except Exception as error:  # orbax and tensorstore raise many types for a damaged file
    raise DamagedCheckpointError(
      f"{path}: cannot read its metadata (damaged or incomplete?): {errors.one_line(error)}"
    ) from error
  finally:
    handler.close()


def restore_params(directory: str, abstract_params, step: int | None = None, item: str = "params"):
  """Only the `params` item of a checkpoint (e.g. stage 1's trainables to start stage 2), or
  another item of arrays (`inherited`).

  `abstract_params` may name a subset of what was saved: the rest is not read. A parameter
  that is missing or has another shape raises a ValueError naming it, before anything is
  read (orbax would fail part-way, with reads still in flight).
  Returns (params, step).
  """
  step = latest_step(directory) if step is None else step
  saved = saved_tree(directory, step, item)
  path = os.path.join(os.path.abspath(directory), str(step), item)
  if saved is None:
    raise FileNotFoundError(f"{path} does not exist")
  _check_saved_shapes(saved, abstract_params, path)
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  try:
    # Arrays come back in the abstract tree's dtype (e.g. fp32 trainables as a bf16 backbone).
    restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract_params
    )
    with _stderr_dropped_on_failure():
      params = checkpointer.restore(
        path,
        args=ocp.args.PyTreeRestore(
          item=abstract_params, restore_args=restore_args, partial_restore=True
        ),
      )
  except Exception as error:  # shapes were checked above: what is left is the files
    raise DamagedCheckpointError(
      f"{path}: cannot read its arrays (damaged or incomplete?): {errors.one_line(error, 160)}"
    ) from error
  finally:
    checkpointer.close()
  return params, step


def _check_saved_shapes(saved, abstract_params, path):
  for keys, want in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    node = saved
    for key in keys:
      name = getattr(key, "key", getattr(key, "idx", None))
      node = node.get(name, node.get(str(name))) if isinstance(node, dict) else None
      if node is None:
        raise ValueError(f"{path}: parameter {jax.tree_util.keystr(keys)} is not in the checkpoint")
    if tuple(node.shape) != tuple(want.shape):
      raise ValueError(
        f"{path}: parameter {jax.tree_util.keystr(keys)} has shape "
        f"{tuple(node.shape)}, the model expects {tuple(want.shape)}"
      )


def read_meta(directory: str, step: int) -> dict:
  checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler())
  meta = checkpointer.restore(os.path.join(os.path.abspath(directory), str(step), "meta"))
  checkpointer.close()
  return meta
