"""Stage `evaluate`: FID, sFID, Inception Score, precision and recall of the ADM sample batch (evaluate/scoring.py).

The samples are config.evaluate.samples, else the batch the sample stage of this run wrote, else
DIR/samples.npz of an earlier run (stages ['evaluate'] alone score an existing batch).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from dpq_jax import distributed
from dpq_jax.evaluate import sample_batch, scoring
from dpq_jax.stages.job import Job


def check(config: ml_collections.ConfigDict) -> list[str]:
  return scoring.check_config(config.evaluate, tuple(config.stages), config.get('vae'))


def run(config: ml_collections.ConfigDict, workdir: str, job: Job) -> Job:
  """Scores the samples. In a multi-process run process 0 evaluates alone, on its own devices (it reads the
  files it wrote and writes the feature cache); the others wait for its metrics, so every report agrees."""
  cfg = config.evaluate
  samples_path = cfg.samples or job.samples or os.path.join(workdir, sample_batch.SAMPLES_FILE)
  cache_dir = cfg.cache_dir or os.path.join(workdir, 'eval_cache')
  values = np.zeros(len(scoring.METRICS) + 1)  # [failed, metrics (nan = None)]
  failure = None
  if distributed.is_writer():
    try:
      out, details, notes = scoring.evaluate(cfg, samples_path, cache_dir, jax.local_devices())
      values[1:] = [np.nan if out[k] is None else out[k] for k in scoring.METRICS]
    except Exception as e:  # re-raised below, after the others learned of it (they must not wait forever)
      failure, values[0] = e, 1
  values = distributed.broadcast(values)
  if values[0]:
    raise failure or RuntimeError('the evaluate stage failed on process 0')
  if not distributed.is_writer():
    out, details, notes = {k: None if np.isnan(v) else float(v) for k, v in zip(scoring.METRICS, values[1:])}, {}, []
  job.report['metrics'].update(out)
  job.report['evaluate'] = details
  job.notes += notes
  return job
