"""Stage `load`: the model of config.model (a checkpoint, or random weights for smoke runs) in full precision."""

from __future__ import annotations

import ml_collections

from dpq_jax.evaluate import report as report_lib
from dpq_jax.models import load as load_lib
from dpq_jax.stages.job import Job


def check(config: ml_collections.ConfigDict) -> list[str]:
  return load_lib.check_config(config.model)


def run(config: ml_collections.ConfigDict, workdir: str, job: Job) -> Job:
  del workdir
  job.spec, _, job.fp_params = load_lib.load_model(config.model, config.seed)
  job.report.update(report_lib.full_precision_summary(job.spec, job.fp_params))
  return job
