r"""DiT-XL/2 256x256 at 2 bits of index per weight: PQ K=256, d=4 (RTN variant: 2 bits).

python -m dpq_jax.main --config=dit_xl_2bit --config.model.checkpoint=ckpt/dit_xl_2_256
python -m dpq_jax.main --config=dit_xl_2bit:method=vq,smoke   # CPU smoke run (common.smoke)
"""

import ml_collections

from dpq_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, method='pq', k=256, d=4, bits=2, runlocal=False, smoke=False)
  config = common.quant_job(f'dit_xl_2bit_{args.method}', args)
  return common.smoke(config) if args.smoke else config
