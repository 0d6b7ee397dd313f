"""What calibration keeps alive during its steps (DiT-XL/2's peak RSS, issue 17): one train state (a checkpoint save
in flight must not stop the next step from donating it), and the quantized layers' fp kernels once (stacked as the
latent weights, not also per block in the job)."""

import collections
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from dpq_jax import tree_utils
from dpq_jax.calibrate import data as data_lib
from dpq_jax.calibrate import loop
from dpq_jax.calibrate import train_step as step_lib
from dpq_jax.quant import layers
from tests.calibrate.tiny import NUM_CLASSES, TinySpec, calib_config, runlocal, tiny_data, tiny_setup


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


def test_stage_holds_the_fp_kernels_once(tmp_path, monkeypatch):
  """Through the calibrate stage's steps the quantized layers' fp kernels are alive once, as the loop's stacked latent
  weights [depth, in, out]: the job's per-block kernels are lent to the loop, not kept beside that copy (DiT-XL/2:
  2.35 GiB), and job.fp_params has them back, bit for bit, after the stage."""
  from dpq_jax.stages import Job, QuantizedModel
  from dpq_jax.stages import calibrate as calibrate_stage

  fp, rules, params, q = tiny_setup()
  q = q.replace(rows=[
    {'name': r['name'], 'shape': [1, 1], 'k': 16, 'd': 4, 'index_bits': 4, 'bytes': 0, 'rel_mse': 1.0, 'sq_norm': 1.0}
    for r in q.rows])  # fmt: skip
  kernel_paths = {name: name.split('/') + ['kernel'] for name in q.pq}
  originals = {name: np.array(tree_utils.get_path(params, keys)) for name, keys in kernel_paths.items()}
  per_block = {(k.shape, 'float32') for k in originals.values()}  # the kernel shapes no other fp param has
  others = [
    x for path, x in jax.tree_util.tree_leaves_with_path(params) if [k.key for k in path] not in kernel_paths.values()
  ]
  per_block -= {(x.shape, str(x.dtype)) for x in others}
  before = _live()  # (tiny_setup's cached numpy views keep the arrays it made alive)
  fp_params = jax.tree.map(jnp.asarray, params)  # fresh arrays: only the job holds them
  lent = [weakref.ref(tree_utils.get_path(fp_params, keys)) for keys in kernel_paths.values()]
  depth = fp.depth
  seen = []  # after each step: (lent kernels alive, live arrays of a per-block kernel shape, of the stacked shapes)
  jit_step = step_lib.jit_step

  def recording_jit_step(*args, **kwargs):
    jitted, state_sh, frozen_sh = jit_step(*args, **kwargs)

    def step(state, frozen, batch):
      out = jax.block_until_ready(jitted(state, frozen, batch))
      live = _live()
      stacked = {((depth, *shape), dtype) for shape, dtype in per_block}
      seen.append(
        (sum(r() is not None for r in lent), sum(live[k] - before[k] for k in per_block), [live[k] for k in stacked])
      )
      return out

    return step, state_sh, frozen_sh

  monkeypatch.setattr(step_lib, 'jit_step', recording_jit_step)
  config = runlocal(**{'calibrate.steps': 2, 'calibrate.batch_size': max(4, jax.device_count()),
                       'calibrate.warmup': 0, 'data.num_samples': 8, 'quant.objective': 'weight'})  # fmt: skip
  config.model.init, config.model.input_size, config.data.source = 'checkpoint', 8, 'data_free'
  assert config.model.scan_blocks and config.calibrate.assignment == 'dynamic'
  job = Job(
    report={'num_params': 1000},
    spec=TinySpec(fp),
    fp_params=fp_params,
    quantized=QuantizedModel(q, rules, {'name': 't'}),
  )
  del fp_params
  job = calibrate_stage.run(config, str(tmp_path), job)
  assert per_block and len(seen) == 2
  for alive, per_block_live, stacked_live in seen:
    assert alive == 0  # the job's per-block kernels were freed during the steps ...
    assert per_block_live == 0  # ... and no other per-block copy is alive
    assert stacked_live == [1] * len(stacked_live)  # the stacked latents: once
  for name, keys in kernel_paths.items():
    back = tree_utils.get_path(job.fp_params, keys)
    assert isinstance(back, jax.Array)
    np.testing.assert_array_equal(back, originals[name])
