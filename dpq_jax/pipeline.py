"""Runs a config's stages in order and writes report.json / report.md into the workdir.

Each stage is `run(config, workdir, state) -> state` in its own module; `state` carries the
model, its params and the report being built. Every input is checked before anything is
written, so a bad config fails with one line and leaves the workdir untouched.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import ml_collections

from dpq_jax import errors
from dpq_jax.evaluate import report as report_lib
from dpq_jax.evaluate import sample as sample_stage
from dpq_jax.models import load as load_stage
from dpq_jax.quant import stage as quantize_stage

ConfigError = errors.ConfigError


def _load(config: ml_collections.ConfigDict, workdir: str, state: dict) -> dict:
  del workdir
  spec, model, params = load_stage.load_model(config.model, config.seed)
  state.update(spec=spec, model=model, variables={'params': params})
  state['report'].update(report_lib.full_precision_summary(spec, params))
  return state


STAGES: dict[str, Callable[[ml_collections.ConfigDict, str, dict], dict]] = {
  'load': _load,
  'quantize': quantize_stage.run,
  'sample': sample_stage.run,
}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError with every problem found, one per line."""
  stages = list(config.stages)
  errors = [
    f'config.stages: unknown stage {s!r}; expected one of {", ".join(STAGES)}' for s in stages if s not in STAGES
  ]
  if stages and stages[0] != 'load':
    errors.append(f"config.stages={stages}: the first stage must be 'load'")
  errors += load_stage.check_config(config.model)
  if 'quantize' in stages:
    errors += quantize_stage.check_config(config.quant)
  if 'sample' in stages:
    errors += sample_stage.check_config(config.sample, config.model.num_classes)
  if errors:
    raise ConfigError('\n'.join(errors))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Checks the config, runs its stages, writes report.json and report.md; returns the report."""
  check_config(config)
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  state = {
    'report': {'config_name': config.name, 'stages': list(config.stages), 'metrics': {}, 'timings_s': {}},
    'report_notes': [],
  }
  try:
    for name in config.stages:
      start = time.perf_counter()
      state = STAGES[name](config, workdir, state)
      state['report']['timings_s'][name] = round(time.perf_counter() - start, 3)
  except BaseException:
    if created and not os.listdir(workdir):
      os.rmdir(workdir)  # A run that failed before writing anything leaves no trace.
    raise
  report_lib.write(workdir, state['report'], state['report_notes'], config)
  return state['report']
