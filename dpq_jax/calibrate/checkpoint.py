"""Calibration checkpoints: an orbax CheckpointManager, and SIGTERM/SIGINT -> save and stop.

A checkpoint holds the train state (trainable params, optimizer state, step, rng, mutable
`quant` collection) and, as JSON, the data iterator's state and the fingerprint of the calibration that
wrote it (quant/lineage.py): each checkpoint says which job it belongs to, and one of another job, or
without a fingerprint, is refused rather than resumed. `save` is called after every step
and the manager decides (save_interval_steps), so a forced preemption save is never skipped;
orbax commits a step atomically (temporary directory, then rename), so a save killed half-way
never replaces the last good checkpoint. A save that fails for a reason the user fixes (a full disk: orbax
raises it from its writer threads as a ValueError carrying the errno) is one WriteError naming the step's
directory and the last complete step; its temporary directory is removed at once (a killed run's is removed by
the next run on the workdir: workdir.remove_stale).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import types
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from dpq_jax import errors, io_utils

TMP_SUFFIX = '.orbax-checkpoint-tmp'  # orbax's name for a step being written: '<step>.orbax-checkpoint-tmp[-<time>]'


class Checkpointer:
  """CheckpointManager over DIR with items 'state' (StandardSave) and 'data' (JSON)."""

  def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
    self.directory = io_utils.abspath(directory)  # a gs:// URL stays one: orbax writes there itself
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(int(every), 1),
      max_to_keep=int(keep) if keep > 0 else None,
      enable_async_checkpointing=async_save,
      create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'data'))
    self._saving: int | None = None  # the step of the save in flight (orbax finishes it in the background)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether save(step) without force would write a checkpoint."""
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
    with self._faults():  # (a save first waits for the one in flight: its fault shows here)
      started = self.manager.save(step, args=args, force=force)
    if started:
      self._saving = step
    return started

  @contextlib.contextmanager
  def _faults(self) -> Iterator[None]:
    """A user fault of the save in flight (a full disk) -> WriteError naming its step; its temp dir removed."""
    try:
      yield
    except Exception as e:
      step, self._saving = self._saving, None
      where = os.path.join(self.directory, str(step)) if step is not None else self.directory
      fault = errors.write_fault(e, where)
      if fault is None:
        raise
      io_utils.join_threads_of('orbax.')
      self.remove_temps()
      if not io_utils.is_remote(self.directory):  # what a rerun resumes from, read from the disk
        done = [int(n) for n in os.listdir(self.directory) if n.isdigit()] if os.path.isdir(self.directory) else []
        fault = errors.write_fault(e, where, f'; the same command resumes from checkpoint {max(done)}, the last '
                                   'complete one' if done else '; no checkpoint was completed')  # fmt: skip
      raise fault from e

  def remove_temps(self) -> list[str]:
    """Removes orbax's temporary step directories of unfinished saves (local directories; none is in flight)."""
    if io_utils.is_remote(self.directory) or not os.path.isdir(self.directory):
      return []
    out = [os.path.join(self.directory, n) for n in os.listdir(self.directory) if TMP_SUFFIX in n]
    for path in out:
      shutil.rmtree(path, ignore_errors=True)
    return out

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """(state, data_state, step) of checkpoint `step` (default the latest).

    Raises:
      CheckpointError naming the checkpoint when it cannot be read or does not match
      `abstract_state` (ShapeDtypeStructs carrying the target shardings).
    """
    step = self.latest_step() if step is None else step
    where = os.path.join(self.directory, str(step))
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    try:
      restored = self.manager.restore(step, args=args)
    except Exception as e:  # orbax raises many types; all mean the same thing here
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
      raise errors.CheckpointError(
        f'checkpoint {where} cannot be restored into this run ({type(e).__name__}: {first}); '
        'it is corrupt or was written by a different config: delete it or use another --workdir'
      ) from None
    state = restored['state']
    want = jax.tree_util.tree_structure(abstract_state)
    if jax.tree_util.tree_structure(state) != want:
      raise errors.CheckpointError(
        f'checkpoint {where} holds a different tree than this run expects; use another --workdir'
      )
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(abstract_state), jax.tree.leaves(state)):
      if tuple(a.shape) != tuple(np.shape(b)) or np.dtype(a.dtype) != np.dtype(b.dtype):
        raise errors.CheckpointError(
          f'checkpoint {where}: {jax.tree_util.keystr(path)} is {np.dtype(b.dtype).name}{list(np.shape(b))}, '
          f'this run expects {np.dtype(a.dtype).name}{list(a.shape)}; it was written by a different config'
        )
    return state, dict(restored['data']), int(step)

  def check_fingerprint(self, step: int, fingerprint: str) -> None:
    """CheckpointError unless checkpoint `step` was written by the calibration `fingerprint` names."""
    where = os.path.join(self.directory, str(step))
    try:
      data = dict(self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))['data'])
    except Exception as e:  # orbax raises many types; all mean the same thing here
      raise errors.CheckpointError(f'checkpoint {where} cannot be read ({type(e).__name__}); delete it') from None
    old = data.get('fingerprint')
    if old is None:
      raise errors.CheckpointError(
        f'{self.directory} holds a checkpoint without a fingerprint (step {step}: written by an older dpq_jax or '
        'another program); delete it to start over'
      )
    if old != fingerprint:
      raise errors.CheckpointError(
        f'{self.directory} holds checkpoints of another calibration (step {step}: fingerprint {old}, this job '
        f'{fingerprint}: the weights or the quant/compress/calibrate/data config differ); delete it to start over, '
        "or rerun with that job's config to resume it"
      )

  def in_flight(self) -> bool:
    """Whether a save was started and not waited for (it may still be writing)."""
    return self._saving is not None

  def wait(self) -> None:
    with self._faults():
      self.manager.wait_until_finished()
    self._saving = None

  def close(self) -> None:
    with self._faults():  # (orbax's close waits for the save in flight too)
      self.manager.close()


class PreemptionGuard:
  """Context manager: SIGTERM/SIGINT set `signum` instead of killing the process.

  The train loop checks `requested()` after each step, saves, and stops. Across processes the
  request is OR-ed, so every host stops at the same step. Signal handlers can only be installed by the
  main thread: a guard entered on another thread (the demo's rows run in parallel, stages/compare.py) installs
  none and is told of a signal by the main thread's guard, which tells every guard entered at the time.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)
  _entered: list[PreemptionGuard] = []  # the guards entered now, on any thread

  def __init__(self):
    self.signum: int | None = None
    self._old: dict[int, Any] = {}

  def _handler(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    for guard in list(PreemptionGuard._entered) + [self]:
      guard.signum = signum

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._old[s] = signal.signal(s, self._handler)
    PreemptionGuard._entered.append(self)
    return self

  def __exit__(self, *exc) -> None:
    PreemptionGuard._entered.remove(self)
    for s, h in self._old.items():
      signal.signal(s, h)

  def requested(self) -> bool:
    flag = self.signum is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
    return flag


class Preempted(SystemExit):
  """Raised after the preemption checkpoint is written; exits with 128 + the signal number."""
