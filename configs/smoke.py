"""Smoke job: random-init DiT -> a few DDIM steps -> a sample grid. No downloads, CPU, seconds.

The config itself ships in the package, dpq_jax/configs/smoke.py; this file keeps its path in a checkout
(`--config=configs/smoke.py`, `from configs import smoke`). Installed, `--config=smoke` names it.
"""

from dpq_jax.configs.smoke import get_config

__all__ = ['get_config']
