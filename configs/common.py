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

  config.quant = ml_collections.ConfigDict()
  config.quant.method = 'pq'  # 'pq' (codebook per sub-vector position) | 'vq' (one per layer) | 'rtn'
  config.quant.k = 256  # codewords per codebook
  config.quant.d = 8  # sub-vector length: index bits per weight = log2(k) / d
  config.quant.bits = 2  # rtn only
  config.quant.group_size = 0  # rtn only; 0 = one group per output channel
  config.quant.kmeans_iters = 25
  config.quant.seed = 0
  config.quant.codebook_dtype = 'float16'
  config.quant.dequantize = 'on_the_fly'  # 'on_the_fly' (PQDense) | 'load' (dense weights once)
  config.quant.pattern = r'blocks_\d+/(attn/(qkv|proj)|mlp/(fc1|fc2)|adaLN_modulation)'
  config.quant.overrides = ()  # ('regex=K:d', ...) tried before `pattern`

  config.sample = ml_collections.ConfigDict()
  config.sample.sampler = 'ddpm'  # 'ddpm' | 'ddim'
  config.sample.steps = 250
  config.sample.cfg_scale = 1.5
  config.sample.num_samples = 8
  config.sample.batch_size = 8
  config.sample.labels = 'random'  # 'random' | 'balanced' | comma-separated class ids
  config.sample.seed = 0
  return config


def quant_job(name: str, args: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """DiT-XL/2 -> quantize -> sample, with the paper's sampling protocol (DDPM 250, cfg 1.5)."""
  config = base_config()
  config.name = name
  config.stages = ('load', 'quantize', 'sample')
  config.model.name = 'DiT-XL/2'
  config.model.input_size = 32
  config.quant.method = args.method
  config.quant.k = args.k
  config.quant.d = args.d
  config.quant.bits = args.bits
  config.sample.sampler = 'ddpm'
  config.sample.steps = 250
  config.sample.cfg_scale = 1.5
  config.sample.num_samples = 8
  config.sample.batch_size = 8
  config.sample.labels = '207,360,387,974,88,979,417,279'  # the original sample.py's classes
  if args.runlocal:  # the same stages on a small model, seconds on a CPU
    config.model.name = 'DiT-S/8'
    config.model.input_size = 16
    config.model.init = 'random'
    config.quant.kmeans_iters = 5
    config.sample.sampler = 'ddim'
    config.sample.steps = 3
    config.sample.num_samples = 4
    config.sample.batch_size = 4
  return config
