"""Checkpoints: SIGKILL + rerun and SIGTERM + rerun end bitwise equal to an uninterrupted run.

A subprocess driver runs the calibration loop on the tiny quantized DiT of tiny.py;
its data source sleeps per example so that a run can be SIGKILLed mid-way, and can send the
process a SIGTERM while it loads its n-th example (a preemption at a known step). The runs share
a persistent compilation cache (the same executables, so results stay bitwise comparable).
"""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from dpq_jax import errors
from dpq_jax.calibrate import checkpoint as ckpt_lib
from tests import helpers

STEPS = 10
BATCH = 4

DRIVER = r"""
import os, signal, sys, time
import grain, jax, numpy as np
from tests.calibrate import tiny
from dpq_jax.calibrate import data as data_lib, loop
from dpq_jax.quant import layers

workdir, delay, sigterm_at = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
fetched = 0

class Slow(data_lib.ArraySource):
  def __getitem__(self, i):
    global fetched
    fetched += 1
    if fetched == sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(delay)
    return super().__getitem__(i)

# One reader thread and no read-ahead, so the sleeps pace the steps and the signal lands on a known step.
orig_loader = data_lib.train_loader
loop.data_lib.train_loader = lambda *a: orig_loader(*a, read_options=grain.ReadOptions(num_threads=1,
                                                                                      prefetch_buffer_size=1))
fp, rules, params, q = tiny.tiny_setup()
x, y = tiny.tiny_data(32)
cfg = tiny.calib_config(steps=%d, batch_size=%d, checkpoint_every=2, keep=2, lr=3e-2, log_every=1)
out = loop.calibrate(
  dynamic_model=fp.clone(dense=layers.dense_factory(rules, 'dynamic')),
  frozen_model=fp.clone(dense=layers.dense_factory(rules, 'frozen')),
  params=q.variables()['params'], quant=q.variables()['quant'], fp_params=params, source=Slow(x, y), cfg=cfg, num_classes=tiny.NUM_CLASSES,
  workdir=workdir, progress=False,
)
flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(out)
        if p[0].key in ('params', 'quant')}
np.savez(workdir + '/final.npz', **flat)
""" % (STEPS, BATCH)


def _start(workdir, delay: float, cache: str, sigterm_at: int = 0) -> subprocess.Popen:
  env = dict(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', XLA_FLAGS='')  # fmt: skip
  return helpers.start_python('-c', DRIVER, workdir, delay, sigterm_at, env=env)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
  end = time.time() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'driver exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}')
    if time.time() > end:
      proc.kill()
      raise AssertionError('timed out waiting for the driver')
    time.sleep(0.05)


def _steps_logged(workdir) -> list[int]:
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line)['step'] for line in path.read_text().splitlines() if line.strip()]


def _final(workdir) -> dict:
  with np.load(workdir / 'final.npz') as f:
    return {k: f[k] for k in f.files}


def test_kill_and_sigterm_then_resume_equal_an_uninterrupted_run(tmp_path):
  cache = str(tmp_path / 'jax_cache')
  ref_dir, run_dir = tmp_path / 'ref', tmp_path / 'run'
  rc, err = _finish(_start(ref_dir, 0.0, cache))
  assert rc == 0, err[-3000:]
  ref = _final(ref_dir)

  # 1. SIGKILL once the step-4 checkpoint is committed (the run is mid-way through a later step).
  proc = _start(run_dir, 0.1, cache)
  _wait_for(lambda: (run_dir / 'checkpoints' / '4').is_dir(), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (run_dir / 'final.npz').exists()
  resumed = max(int(d) for d in os.listdir(run_dir / 'checkpoints') if d.isdigit())
  assert 4 <= resumed < STEPS - 3, resumed

  # 2. Rerun the same command; a SIGTERM arrives while it reads its 9th example (3rd batch): it
  # finishes the step it is in, saves it (a forced save) and exits with 128 + 15.
  proc = _start(run_dir, 0.0, cache, sigterm_at=2 * BATCH + 1)
  rc, err = _finish(proc)
  assert rc == 128 + signal.SIGTERM, err[-3000:]
  assert 'SIGTERM at step' in err and 'run the same command to resume' in err
  stopped = int(err.split('SIGTERM at step ')[1].split(':')[0])
  assert resumed < stopped <= resumed + 3  # grain reads ahead, so the signal may come a step early
  assert (run_dir / 'checkpoints' / str(stopped)).is_dir()  # saved even off the every-2 grid

  # 3. Rerun to the end: the final codebooks and codes equal the uninterrupted run's, bitwise.
  rc, err = _finish(_start(run_dir, 0.0, cache))
  assert rc == 0, err[-3000:]
  out = _final(run_dir)
  assert out.keys() == ref.keys()
  for k in ref:
    np.testing.assert_array_equal(out[k], ref[k], err_msg=k)
  assert _steps_logged(run_dir) == list(range(1, STEPS + 1))  # one metrics line per step, no duplicates


def test_incompatible_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'c'), every=1, keep=2, async_save=False)
  ckpt.save(1, {'w': np.zeros((3,), np.float32)}, {'iterator': '{}'})
  ckpt.wait()
  good = jax.ShapeDtypeStruct((3,), np.float32)
  state, data, step = ckpt.restore({'w': good})
  assert step == 1 and data == {'iterator': '{}'} and state['w'].shape == (3,)
  with pytest.raises(errors.CheckpointError, match='different config'):
    ckpt.restore({'w': jax.ShapeDtypeStruct((4,), np.float32)})
  with pytest.raises(errors.CheckpointError, match='different'):
    ckpt.restore({'v': good})
  for root, _, files in os.walk(tmp_path / 'c' / '1' / 'state'):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  with pytest.raises(errors.CheckpointError, match=r'c/1 cannot be restored'):
    ckpt.restore({'w': good})
  ckpt.close()


def test_a_guard_on_another_thread_hears_the_main_threads_signal():
  """PreemptionGuard entered on a worker thread (the demo's rows in parallel) installs no handler (only the main
  thread may); a SIGTERM the main thread's guard catches sets every guard entered at the time, and the handlers
  in place before are back once the main thread's guard exits."""
  import threading

  before = signal.getsignal(signal.SIGTERM)
  entered, release, seen = threading.Event(), threading.Event(), []

  def worker():
    with ckpt_lib.PreemptionGuard() as guard:
      entered.set()
      release.wait(10)
      seen.append(guard.signum)

  with ckpt_lib.PreemptionGuard() as main_guard:
    thread = threading.Thread(target=worker)
    thread.start()
    assert entered.wait(10)
    os.kill(os.getpid(), signal.SIGTERM)
    release.set()
    thread.join(10)
    assert main_guard.signum == signal.SIGTERM
  assert seen == [signal.SIGTERM]
  assert signal.getsignal(signal.SIGTERM) is before
  # alone on a thread, a guard touches no handler
  out = []

  def alone():
    with ckpt_lib.PreemptionGuard() as guard:
      out.append(guard._old)

  thread = threading.Thread(target=alone)
  thread.start()
  thread.join(10)
  assert out == [{}] and signal.getsignal(signal.SIGTERM) is before and not ckpt_lib.PreemptionGuard._entered
