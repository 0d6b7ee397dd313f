"""Runs a config's stages in order and writes report.json / report.md into the workdir.

Each stage is `run(config, workdir, state) -> state` in its own module; `state` carries the
model, its params and the report being built. Every input is checked before anything is
written, so a bad config fails with one line and leaves the workdir untouched. The workdir
may be a local directory or a gs:// URL (io_utils). In a multi-process run every process runs
every stage and only process 0 (distributed.is_writer) writes.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import ml_collections

from dpq_jax import errors, io_utils
from dpq_jax.calibrate import distributed
from dpq_jax.calibrate import loop as calibrate_loop
from dpq_jax.calibrate import stage as calibrate_stage
from dpq_jax.demo import compare as compare_stage
from dpq_jax.demo import train as train_stage
from dpq_jax.evaluate import evaluate_stage
from dpq_jax.evaluate import report as report_lib
from dpq_jax.evaluate import sample as sample_stage
from dpq_jax.models import load as load_stage
from dpq_jax.quant import lineage
from dpq_jax.quant import stage as quantize_stage
from dpq_jax.stages import compress as compress_stage

ConfigError = errors.ConfigError


def _load(config: ml_collections.ConfigDict, workdir: str, state: dict) -> dict:
  del workdir
  spec, model, params = load_stage.load_model(config.model, config.seed)
  state.update(spec=spec, model=model, variables={'params': params})
  state['report'].update(report_lib.full_precision_summary(spec, params))
  return state


STAGES: dict[str, Callable[[ml_collections.ConfigDict, str, dict], dict]] = {
  'load': _load,
  'train': train_stage.run,
  'quantize': quantize_stage.run,
  'compress': compress_stage.run,
  'calibrate': calibrate_stage.run,
  'sample': sample_stage.run,
  'evaluate': evaluate_stage.run,
  'compare': compare_stage.run,
}


def stage_errors(config: ml_collections.ConfigDict, stage: str) -> list[str]:
  """Problems with the config section(s) one stage reads (the `compare` stage checks its rows with it)."""
  stages = tuple(config.stages)
  if stage == 'train':
    return train_stage.check_config(config)
  if stage == 'quantize':
    return quantize_stage.check_config(config.quant)
  if stage == 'compress':
    return compress_stage.check_config(config.compress, config.quant.method)
  if stage == 'calibrate':
    return calibrate_stage.check_config(config)
  if stage == 'sample':
    return sample_stage.check_config(config.sample, config.model.num_classes, config.get('vae'))
  if stage == 'evaluate':
    return evaluate_stage.check_config(config.evaluate, stages, config.get('vae'))
  if stage == 'compare':
    return compare_stage.check_config(config, stage_errors)
  return []


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError with every problem found, one per line."""
  stages = list(config.stages)
  errors = [
    f'config.stages: unknown stage {s!r}; expected one of {", ".join(STAGES)}' for s in stages if s not in STAGES
  ]
  if stages != ['evaluate']:  # scoring an existing sample batch alone needs no model
    if stages and stages[0] not in ('load', 'train'):
      errors.append(
        f"config.stages={stages}: the first stage must be 'load' or 'train' (or the stages be just ['evaluate'])"
      )
    errors += load_stage.check_config(config.model)
  for stage in dict.fromkeys(stages):
    errors += stage_errors(config, stage)
  if errors:
    raise ConfigError('\n'.join(errors))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Checks the config, runs its stages, writes report.json and report.md; returns the report."""
  distributed.maybe_initialize()  # multi-host jobs: before anything touches a JAX backend
  check_config(config)
  writer = distributed.is_writer()  # process 0 writes every output; the others compute alongside it
  created = writer and not io_utils.exists(workdir)
  if writer:
    io_utils.makedirs(workdir)  # (object stores have no directories to make)
  state = {
    'report': {'config_name': config.name, 'stages': list(config.stages), 'metrics': {}, 'timings_s': {}},
    'report_notes': [],
  }
  try:
    for name in config.stages:
      start = time.perf_counter()
      if name in lineage.CHAIN and 'plan' not in state:  # the first stage that writes DIR/quantized/
        state['plan'] = lineage.plan(config, state.get('fp_params'))
        if 'calibrate' in config.stages:  # refused before quantize/compress rewrite the artifact
          calibrate_loop.check_checkpoints(workdir, lineage.fingerprint(lineage.of_state(state, 'calibrate')))
        if 'spec' in state and quantize_stage.resume_chain(config, workdir, state):
          state['skip'] = {link['stage'] for link in state['plan']}
      if name in state.get('skip', ()):
        state['report']['timings_s'][name] = 0.0
        continue
      state = STAGES[name](config, workdir, state)
      if name in ('load', 'train'):  # the fp model: calibrate's latent weights, data-free samples, distillation
        state['fp_params'] = state['variables']['params']
      if name in lineage.CHAIN and writer:
        lineage.record(workdir, lineage.of_state(state, name), state['report'])
      state['report']['timings_s'][name] = round(time.perf_counter() - start, 3)
  except BaseException:
    if created and not io_utils.is_remote(workdir) and not os.listdir(workdir):
      os.rmdir(workdir)  # A run that failed before writing anything leaves no trace.
    raise
  if writer:
    report_lib.write(workdir, state['report'], state['report_notes'], config)
  return state['report']
