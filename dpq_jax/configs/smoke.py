r"""Smoke job: random-init DiT -> a few DDIM steps -> a sample grid. No downloads, CPU, seconds.

The same stages run a real checkpoint:

  python -m dpq_jax.main --config=smoke \
      --config.model.init=checkpoint --config.model.checkpoint=/path/DiT-XL-2-256x256.pt

get_config accepts a short argument string, e.g. `smoke:model=DiT-B/4,steps=5`.
"""

import ml_collections

from dpq_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, model='DiT-S/2', steps=4, samples=8)
  config = common.base_config()
  config.name = 'smoke'
  config.stages = ('load', 'sample')
  config.model.name = args.model
  config.model.init = 'random'
  config.model.input_size = 32
  config.sample.num_samples = args.samples
  config.sample.batch_size = args.samples
  config.sample.sampler = 'ddim'
  config.sample.steps = args.steps
  config.sample.cfg_scale = 1.5
  return config
