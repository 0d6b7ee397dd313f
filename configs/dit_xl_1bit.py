r"""The paper's job: DiT-XL/2 256x256, product quantization at 1 bit of index per weight.

PQ with K=256 codewords over sub-vectors of d=8 (log2(256)/8 = 1 bit), a codebook per
sub-vector position of each of the 140 block layers; embedders and final layer full precision.
Codebook compression, calibration and evaluation stages join as they land.

  python -m dpq_jax.main --config=configs/dit_xl_1bit.py \
      --config.model.checkpoint=ckpt/dit_xl_2_256        # or DiT-XL-2-256x256.pt directly
  python -m dpq_jax.main --config=configs/dit_xl_1bit.py --config.model.init=random  # CPU smoke run

Variants by argument: `configs/dit_xl_1bit.py:method=vq` (one codebook per layer, VQ4DiT),
`:method=rtn` (1-bit round-to-nearest), `:k=16,d=4` (the other 1-bit PQ shape), `:runlocal`
(DiT-S/8 on 16x16 latents: the same stages in seconds).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, method='pq', k=256, d=8, bits=1, runlocal=False)
  return common.quant_job(f'dit_xl_1bit_{args.method}', args)
