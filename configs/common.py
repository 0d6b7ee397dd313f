"""The base config and argument parser of every job: dpq_jax/configs/common.py, re-exported for configs written
against this path (`from configs import common`)."""

from dpq_jax.configs.common import base_config, parse_arg, quant_job, smoke

__all__ = ['base_config', 'parse_arg', 'quant_job', 'smoke']
