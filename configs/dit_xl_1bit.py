"""The paper's job: DiT-XL/2 256x256, product quantization at 1 bit of index per weight.

The config itself ships in the package, dpq_jax/configs/dit_xl_1bit.py; this file keeps its path in a checkout
(`--config=configs/dit_xl_1bit.py`, `from configs import dit_xl_1bit`). Installed, `--config=dit_xl_1bit` names it.
"""

from dpq_jax.configs.dit_xl_1bit import get_config

__all__ = ['get_config']
