r"""Smoke job: random-init DiT -> a few DDIM steps -> a sample grid. No downloads, CPU, seconds.

The embedded default of `python -m dpq_jax.main` until the digits demo lands. The same
stages run a real checkpoint:

  python -m dpq_jax.main --config=configs/smoke.py \
      --config.model.init=checkpoint --config.model.checkpoint=/path/DiT-XL-2-256x256.pt

get_config accepts a short argument string, e.g. `configs/smoke.py:model=DiT-B/4,steps=5`.
"""

import ml_collections

from configs import common


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
