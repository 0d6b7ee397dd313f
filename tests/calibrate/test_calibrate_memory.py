"""What calibration keeps alive during its steps (DiT-XL/2's peak RSS, issue 17): one train state (a checkpoint save
in flight must not stop the next step from donating it)."""

import collections

import jax
import jax.numpy as jnp

from dpq_jax.calibrate import data as data_lib
from dpq_jax.calibrate import loop
from dpq_jax.calibrate import train_step as step_lib
from dpq_jax.quant import layers
from tests.calibrate.tiny import NUM_CLASSES, calib_config, tiny_data, tiny_setup


def _live() -> collections.Counter:
  return collections.Counter((tuple(a.shape), str(a.dtype)) for a in jax.live_arrays())


def test_steps_hold_one_state(tmp_path, monkeypatch):
  fp, rules, params, q = tiny_setup()
  seen = []  # the live arrays after each step, by (shape, dtype)
  jit_step = step_lib.jit_step

  def recording_jit_step(*args, **kwargs):
    jitted, state_sh, frozen_sh = jit_step(*args, **kwargs)

    def step(state, frozen, batch):
      out = jax.block_until_ready(jitted(state, frozen, batch))
      seen.append(_live())
      return out

    return step, state_sh, frozen_sh

  monkeypatch.setattr(step_lib, 'jit_step', recording_jit_step)
  model = fp.clone(scan_blocks=True)
  x, y = tiny_data(8)
  loop.calibrate(
    dynamic_model=model.clone(dense=layers.dense_factory(rules, 'dynamic')),
    frozen_model=model.clone(dense=layers.dense_factory(rules, 'frozen')),
    params=q.variables()['params'],
    quant=q.variables()['quant'],
    fp_params=jax.tree.map(jnp.asarray, params),  # nothing else holds these arrays
    source=data_lib.ArraySource(x, y),
    cfg=calib_config(steps=2, batch_size=4, checkpoint_every=1, log_every=1),
    num_classes=NUM_CLASSES,
    workdir=str(tmp_path),
    progress=False,
  )
  # Step 1's checkpoint was still being written when step 2 ran: step 2 donated the state all the same (on CPU
  # orbax's host copy is a view of the state: without the wait, both states are alive after step 2).
  stacked_codebooks = ((2, 32, 16, 4), 'float32')  # fc2's codebooks [depth, M, K, d]: params, adam mu and nu
  assert [c[stacked_codebooks] for c in seen] == [3, 3]
