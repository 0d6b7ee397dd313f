"""The embedded default job (`make demo`): the paper's result on a DiT trained here, on CPU, in minutes.

The config itself ships in the package, dpq_jax/configs/digits.py; this file keeps its path in a checkout
(`--config=configs/digits.py`, `from configs import digits`). Installed, `--config=digits` names it.
"""

from dpq_jax.configs.digits import get_config

__all__ = ['get_config']
