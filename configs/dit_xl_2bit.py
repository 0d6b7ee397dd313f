"""DiT-XL/2 256x256 at 2 bits of index per weight: PQ K=256, d=4 (RTN variant: 2 bits).

The config itself ships in the package, dpq_jax/configs/dit_xl_2bit.py; this file keeps its path in a checkout
(`--config=configs/dit_xl_2bit.py`, `from configs import dit_xl_2bit`). Installed, `--config=dit_xl_2bit` names it.
"""

from dpq_jax.configs.dit_xl_2bit import get_config

__all__ = ['get_config']
