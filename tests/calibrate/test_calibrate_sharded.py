"""The same train step on 8 CPU devices (data 4 x fsdp 2) equals the single-device step.

Each test reruns itself in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
(helpers.rerun_with_devices) unless this process already has 8 devices. The flag is never set in this
process's environment: every later subprocess of the suite (the CLI tests) would inherit 8 devices.
"""

import jax
import numpy as np
import pytest

from dpq_jax import pipeline
from tests import helpers
from tests.calibrate import tiny


def test_sharded_step_equals_single_device():
  if jax.device_count() < 8:
    return helpers.rerun_with_devices(__file__, 'test_sharded_step_equals_single_device')
  setup = tiny.tiny_setup()
  x, y = tiny.tiny_data(8)
  batch = {'latents': x, 'labels': y}
  one, s1, f1, _ = tiny.build(
    tiny.calib_config(lr=1e-2, mesh=(('data', 1), ('fsdp', 1))), setup, devices=jax.devices()[:1]
  )
  many, s8, f8, _ = tiny.build(
    tiny.calib_config(lr=1e-2, mesh=(('data', 4), ('fsdp', 2))), setup, devices=jax.devices()
  )
  cb = s8['params']['blocks_0']['mlp']['fc1']['codebooks']  # [num_codebooks=8, K=16, d=4]
  assert 'fsdp' in cb.sharding.spec and len(cb.sharding.device_set) == 8
  assert cb.addressable_shards[0].data.size == cb.size // 2  # split over fsdp: no full copy per device
  latent = f8['quant']['blocks_0']['mlp']['fc1']['latent']  # the fp weight: sharded too
  assert latent.addressable_shards[0].data.size == latent.size // 2
  for _ in range(3):
    s1, m1 = one(s1, f1, batch)
    s8, m8 = many(s8, f8, batch)
    for k in ('loss', 'mse', 'vb', 'grad_norm', 'changed'):
      np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=2e-5, atol=1e-7, err_msg=k)
  a, b = jax.device_get(s1), jax.device_get(s8)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(v, u, rtol=1e-4, atol=1e-6), a['params'], b['params'])
  jax.tree.map(np.testing.assert_array_equal, a['quant'], b['quant'])
  assert int(b['step']) == 3


def test_batch_not_divisible_by_the_mesh_fails_before_any_step():
  if jax.device_count() < 8:
    return helpers.rerun_with_devices(__file__, 'test_batch_not_divisible_by_the_mesh_fails_before_any_step')
  config = tiny.runlocal(**{'calibrate.batch_size': 6})
  config.calibrate.mesh = (('data', -1), ('fsdp', 2))
  with pytest.raises(pipeline.ConfigError, match=r'batch_size=6 is not divisible by the data-parallel size 8'):
    pipeline.check_config(config)
  config.calibrate.mesh = (('data', 3), ('fsdp', 2))
  with pytest.raises(pipeline.ConfigError, match=r'6 devices needed, 8 present'):
    pipeline.check_config(config)
