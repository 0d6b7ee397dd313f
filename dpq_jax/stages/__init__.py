"""The stages of a job, in the order a config may list them.

Each stage module exposes `check(config) -> list[str]` (problems with the config sections it reads, one
line each, found before anything runs) and `run(config, workdir, job) -> job` (job.py: the typed hand-off).
A stage imports libraries, never another stage; the pipeline loops over REGISTRY.
"""

from __future__ import annotations

from dpq_jax.stages import calibrate, compare, compress, evaluate, load, quantize, sample, train
from dpq_jax.stages.job import Job, QuantizedModel

REGISTRY = {
  'load': load,
  'train': train,
  'quantize': quantize,
  'compress': compress,
  'calibrate': calibrate,
  'sample': sample,
  'evaluate': evaluate,
  'compare': compare,
}

__all__ = ['REGISTRY', 'Job', 'QuantizedModel']
