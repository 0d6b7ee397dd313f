"""The paper's evaluation protocol: DiT-XL/2 256x256, DDPM 250 steps, cfg 1.5, random labels, ADM metrics.

The config itself ships in the package, dpq_jax/configs/dit_xl_eval.py; this file keeps its path in a checkout
(`--config=configs/dit_xl_eval.py`, `from configs import dit_xl_eval`). Installed, `--config=dit_xl_eval` names it.
"""

from dpq_jax.configs.dit_xl_eval import get_config

__all__ = ['get_config']
