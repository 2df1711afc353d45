"""Checkpoints: an Orbax `CheckpointManager` over the composite `{state, data_iter}`.

`state` is the `TrainState` (saved with `StandardSave`, restored into an abstract target that
carries the *current* mesh's shardings, so a run saved on one mesh resumes on another);
`data_iter` is the Grain iterator's state, so a resumed run replays no example and skips none.
Saves are asynchronous; the last `keep` checkpoints are kept plus every one whose step divides
by `keep_every`. A checkpoint that cannot be restored is reported with its step and path, and
older ones are tried only when `fallback_to_previous` is set.

In a single-process run on CPU, `jax.Array`s are written without Orbax's replica-parallel
slicing (see `_single_process_array_writes`): the same values, each replicated array written
whole by its first replica instead of in one slice per replica.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store


class CheckpointRestoreError(RuntimeError):
  """A checkpoint exists but cannot be restored."""


_ARRAY_WRITES_SET = False


def _single_process_array_writes() -> None:
  """Single process: Orbax's `jax.Array` handler without replica-parallel writes.

  Replica-parallel saving (Orbax's default off GPU) splits each replicated array into one slice
  per replica so that several hosts share its writing; every slice is an XLA computation,
  compiled per shape and device (on the tests' 8 CPU devices a 150-step audio2mesh run compiled
  200 of them, ~5 s of its first save). With one process on CPU every replica is in the same
  host memory and one process writes them all anyway, so the slicing buys nothing. The values
  saved and restored are the same; only the stored chunking differs (a replicated array is one
  chunk instead of one per replica), which restoring reads either way. Multi-process runs, and
  accelerators (where the slices spread device-to-host copies over the devices), keep Orbax's
  default. The registry is Orbax's global one (a `StandardCheckpointHandler` takes no registry
  of its own), so this applies to every Orbax save of this process, e.g. `fdjax.pretrained`'s.
  """
  global _ARRAY_WRITES_SET
  if _ARRAY_WRITES_SET or jax.process_count() > 1 or jax.default_backend() != "cpu":
    return
  _ARRAY_WRITES_SET = True
  if type(ocp.type_handlers.get_type_handler(jax.Array)) is not ocp.type_handlers.ArrayHandler:
    return  # a handler of the user's own: theirs to configure
  ocp.type_handlers.register_type_handler(
    jax.Array,
    ocp.type_handlers.ArrayHandler(
      use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()
    ),
    override=True,
  )


class Checkpointer:
  """Saves and restores `{state, data_iter}` under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, checkpoint_config: Any):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.config = checkpoint_config
    _single_process_array_writes()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=checkpoint_config.keep or None,
      keep_period=checkpoint_config.keep_every or None,
      enable_async_checkpointing=checkpoint_config.use_async,
      create=True,
    )
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data_iter": grain.checkpoint.CheckpointHandler(),
      },
    )

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, *, force: bool = False) -> bool:
    """Starts saving (in the background when async). Returns whether a save was started."""
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(data_iter)
    )
    return self.manager.save(step, args=args, force=force)

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """True on every process once any received SIGTERM (multi-host agreement through JAX)."""
    return self.manager.reached_preemption(step)

  def restore(
    self, abstract_state: Any, data_iter: Any, step: int | None = None
  ) -> tuple[int, Any]:
    """Restores the latest (or given) step into `abstract_state`'s shapes and shardings.

    `data_iter` is restored in place (None: the state only, e.g. for evaluation). Returns
    `(step, state)`. With no checkpoint, raises `FileNotFoundError`.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None:
      steps = [step]
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    errors = []
    for candidate in steps:
      try:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
          items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
        if errors:
          logging.warning("restored the older checkpoint at step %d instead", candidate)
        return candidate, restored["state"]
      except Exception as e:  # noqa: BLE001  Orbax raises many kinds for unreadable files.
        message = (
          f"checkpoint at step {candidate} ({self.path(candidate)}) cannot be restored: "
          f"{type(e).__name__}: {e}"
        )
        logging.error(message)
        errors.append(message)
        if not self.config.fallback_to_previous:
          raise CheckpointRestoreError(
            message + "\nSet --config.checkpoint.fallback_to_previous=True to try the "
            "previous checkpoint instead."
          ) from e
    raise CheckpointRestoreError("no checkpoint could be restored:\n" + "\n".join(errors))

  def wait(self) -> None:
    """Blocks until background saves have finished."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
