"""Shared config pieces: the base every job overrides, and the `key=value,...` argument parser."""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'variant=XL/2,bits=1,runlocal' (big_vision style) over typed defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in out:
      raise ValueError(f'unknown config argument {key!r}; expected one of {", ".join(sorted(out))}')
    default = out[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ('', '1', 'true', 'yes')
    else:
      out[key] = type(default)(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every key a stage reads, with the original DiT's defaults."""
  config = ml_collections.ConfigDict()
  config.name = 'job'
  config.seed = 0
  config.stages = ('load', 'sample')

  config.model = ml_collections.ConfigDict()
  config.model.name = 'DiT-XL/2'
  config.model.init = 'checkpoint'  # 'checkpoint' | 'random'
  config.model.checkpoint = ''  # converted dir, original .pt, or diffusers folder
  config.model.input_size = 32  # latent size: 32 for 256x256 images, 64 for 512x512
  config.model.num_classes = 1000
  config.model.learn_sigma = True
  config.model.dtype = 'float32'  # compute dtype; params stay float32

  config.sample = ml_collections.ConfigDict()
  config.sample.sampler = 'ddpm'  # 'ddpm' | 'ddim'
  config.sample.steps = 250
  config.sample.cfg_scale = 1.5
  config.sample.num_samples = 8
  config.sample.batch_size = 8
  config.sample.labels = 'random'  # 'random' | 'balanced' | comma-separated class ids
  config.sample.seed = 0
  return config
