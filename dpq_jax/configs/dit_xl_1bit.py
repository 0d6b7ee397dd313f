r"""The paper's job: DiT-XL/2 256x256, product quantization at 1 bit of index per weight.

PQ with K=256 codewords over sub-vectors of d=8 (log2(256)/8 = 1 bit), a codebook per
sub-vector position of each of the 140 block layers; embedders and final layer full precision. The codebooks
minimise each layer's output error under its inputs' statistics (quant.objective='output', the fp model on one
batch of the calibration data + 1024 (t, y) pairs for adaLN; configs/common.py quant_job).
Codebook compression (stage `compress`, on by default: >= 24x vs fp32 for the quantized layers) runs
between quantize and calibrate. Calibration (stage `calibrate`) then trains the codebooks on the DDPM
loss with assignments recomputed in every forward, on ImageNet latents (config.data.data_dir: a tfds dir
with imagenet2012 prepared; config.vae.checkpoint: the SD VAE that encodes them once into a cache);
its `:smoke` variant runs random weights for 3 steps on data-free samples instead (no dataset needed).

  python -m dpq_jax.main --config=dit_xl_1bit \
      --config.model.checkpoint=ckpt/dit_xl_2_256        # or DiT-XL-2-256x256.pt directly
  python -m dpq_jax.main --config=dit_xl_1bit:smoke  # CPU smoke run

Variants by argument: `dit_xl_1bit:method=vq` (one codebook per layer, VQ4DiT),
`:method=rtn` (1-bit round-to-nearest), `:k=16,d=4` (the other 1-bit PQ shape), `:runlocal`
(DiT-S/8 on 16x16 latents: the same stages in seconds), `:smoke` (DiT-XL/2 shapes, random weights, every
loop cut to seconds: common.smoke), `:compress=0` (no codebook compression).
"""

import ml_collections

from dpq_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, method='pq', k=256, d=8, bits=1, runlocal=False, compress=True, smoke=False)
  config = common.quant_job(f'dit_xl_1bit_{args.method}', args)
  if args.compress and args.method != 'rtn':
    # Codebook compression right after quantize: the 28 blocks' codes + codebooks + fp biases in at most
    # 106 MiB, i.e. >= 24x smaller than their 2553 MiB in fp32 (24.1x leaves the rounding margin).
    stages = list(config.stages)
    stages.insert(stages.index('quantize') + 1, 'compress')
    config.stages = tuple(stages)
    config.compress.budget = 24.1
  return common.smoke(config) if args.smoke else config
