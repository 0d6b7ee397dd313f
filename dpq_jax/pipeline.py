"""Runs a config's stages in order and writes report.json / report.md into the workdir.

Each stage is a module of dpq_jax/stages with `check(config)` and `run(config, workdir, job) -> job`;
the Job (stages/job.py) carries the model, its quantized form and the report being built. The pipeline
owns what spans stages: the order, timings, and the lineage that lets a rerun skip the quantize /
compress / calibrate chain whose artifact it already wrote. Every input is checked before anything is
written, so a bad config fails with one line and leaves the workdir untouched; then the workdir is checked
(a writable directory), locked for this run and cleared of killed runs' temps (workdir.py); the model's
shapes are checked (a stage's `check_model`) before the first stage that writes DIR/quantized/. The workdir
may be a local directory or a gs:// URL (io_utils). In a multi-process run every process runs
every stage and only process 0 (distributed.is_writer) writes.
"""

from __future__ import annotations

import os
import time

import ml_collections
from absl import logging

from dpq_jax import compile_cache, distributed, errors, host_memory, io_utils
from dpq_jax import workdir as workdir_lib
from dpq_jax.calibrate import loop as calibrate_loop
from dpq_jax.evaluate import report as report_lib
from dpq_jax.quant import lineage, storage, surgery
from dpq_jax.stages import REGISTRY, Job, QuantizedModel

ConfigError = errors.ConfigError


NEEDS_MODEL = ('quantize', 'compress', 'calibrate', 'sample', 'compare')


def with_stages(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config with `stages` as the stages that run: a tuple and a comma-separated string alike ('load,quantize'),
  and `load` first where a stage needs a model and neither load nor train precedes it."""
  given = [config.stages] if isinstance(config.stages, str) else list(config.stages)
  stages = [name.strip() for item in given for name in str(item).split(',') if name.strip()]
  for name in stages:
    if name in ('load', 'train'):
      break
    if name in NEEDS_MODEL:
      stages.insert(0, 'load')
      break
  if tuple(stages) == tuple(config.stages):
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.stages = tuple(stages)
  return config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError with every problem found, one per line."""
  config = with_stages(config)
  stages = list(config.stages)
  errors = [
    f'config.stages: unknown stage {s!r}; expected one of {", ".join(REGISTRY)}' for s in stages if s not in REGISTRY
  ]
  errors += host_memory.check(config.get('malloc_mmap_threshold', host_memory.DEFAULT))
  if stages != ['evaluate']:  # scoring an existing sample batch alone needs no model
    errors += REGISTRY['load'].check(config)  # config.model, whichever stage makes the model
  for stage in dict.fromkeys(stages):
    if stage in REGISTRY and stage != 'load':
      errors += REGISTRY[stage].check(config)
  if errors:
    raise ConfigError('\n'.join(errors))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Checks the config and the workdir, runs the stages holding the workdir's lock, writes report.json and
  report.md; returns the report."""
  distributed.maybe_initialize()  # multi-host jobs: before anything touches a JAX backend
  config = with_stages(config)
  check_config(config)
  compile_cache.setup(config.get('compile_cache', ''))  # before the first compile of the job
  host_memory.configure(config.get('malloc_mmap_threshold', host_memory.DEFAULT))  # before the large buffers
  writer = distributed.is_writer()  # process 0 writes every output; the others compute alongside it
  if not writer:
    return _run_stages(config, workdir, writer)
  workdir_lib.check(workdir)
  created = not io_utils.exists(workdir)
  try:
    with workdir_lib.hold(workdir) as held:  # (object stores have no directories to make)
      return _run_stages(config, workdir, writer, held.check)
  except BaseException:
    if created and not io_utils.is_remote(workdir) and os.path.isdir(workdir) and not os.listdir(workdir):
      os.rmdir(workdir)  # A run that failed before writing anything leaves no trace.
    raise


def _run_stages(config: ml_collections.ConfigDict, workdir: str, writer: bool, still_held=lambda: None) -> dict:
  job = Job.start(config)
  skip: set[str] = set()
  for name in config.stages:
    still_held()  # WorkdirError once the workdir's lock is no longer this run's
    start = time.perf_counter()
    if name in lineage.CHAIN and job.chain is None:  # the first stage that writes DIR/quantized/
      job.chain = lineage.plan(config, job.fp_params)
      check_model(config, job)
      if 'calibrate' in config.stages:  # refused before quantize/compress rewrite the artifact
        calibrate_loop.check_checkpoints(workdir, lineage.fingerprint(job.links('calibrate')))
      if job.spec is not None and resume_chain(config, workdir, job):
        skip = {link['stage'] for link in job.chain}
    if name in skip:
      job.report['timings_s'][name] = 0.0
      continue
    job = REGISTRY[name].run(config, workdir, job)
    if name in lineage.CHAIN and writer:
      lineage.record(workdir, job.links(name), job.report, storage.digest(os.path.join(workdir, storage.ARTIFACT_DIR)))
    job.report['timings_s'][name] = round(time.perf_counter() - start, 3)
  if writer:
    report_lib.write(workdir, job.report, job.notes, config)
  return job.report


def check_model(config: ml_collections.ConfigDict, job: Job) -> None:
  """ConfigError with the problems that the model's shapes show (a stage's `check_model(config, params)`, e.g.
  an unreachable compression budget), before any stage of the chain computes or writes."""
  if job.fp_params is None:
    return
  problems = []
  for name in dict.fromkeys(config.stages):
    hook = getattr(REGISTRY.get(name), 'check_model', None)
    problems += hook(config, job.fp_params) if hook else []
  if problems:
    raise ConfigError('\n'.join(problems))


def resume_chain(config: ml_collections.ConfigDict, workdir: str, job: Job) -> bool:
  """Loads DIR/quantized/ as the output of the planned chain (quantize, compress, calibrate) when its lineage,
  its digest and DIR/lineage.json equal job.chain's (see quant/lineage.py); the report gets those stages'
  sections back. A damaged artifact is named and recomputed, never loaded. Returns whether it loaded it (the
  caller then skips the chain)."""
  artifact = os.path.join(workdir, storage.ARTIFACT_DIR)
  if not io_utils.exists(os.path.join(artifact, storage.INDEX)):
    return False
  stages = ', '.join(link['stage'] for link in job.chain)
  try:
    saved = lineage.finished(workdir, storage.load_meta(artifact), job.chain, storage.digest(artifact))
    if saved is None:
      return False
    meta, q = storage.load(artifact)
  except errors.ArtifactError as e:
    logging.warning('%s; recomputing %s', e, stages)
    job.notes.append(f'{stages}: the artifact of an earlier run is damaged ({e}): recomputed, not loaded')
    return False
  cfg = config.quant
  rules = surgery.default_rules(cfg.method, cfg.k, cfg.d, tuple(cfg.overrides), cfg.pattern)
  job.quantized = QuantizedModel(q, rules, meta)
  job.report.update(saved)
  job.notes.append(
    f"{stages}: {artifact} is the output of this job's {stages} (same config and weights; {lineage.FILE}): "
    'loaded, not recomputed'
  )
  return True
