"""Stage `compare`: every method of config.compare.rows on the same trained model, measured alike.

Each row is the full-precision model as stage `train` (or `load`) left it, run through the row's own
stages (quantize, compress, calibrate, taken from the stage registry, with the row's config overrides,
into DIR/rows/<name>/), then scored with the demo metrics on the same labels and starting noise.
A row whose definition names `after` starts from that earlier row's model instead (the sweep's calibrated rows
continue their uncalibrated row), as does a row whose config equals an earlier row's and whose stages extend it
(demo/rows.continued: the default `pq-1bit-calibrated` calibrates `pq-1bit-compressed`'s model; a note says so),
and config.compare.sweep.points, when set, are expanded into the rows first
(demo/sweep.py). Rows run config.compare.workers at a time on threads (a row and those continuing it in order on
one); the report keeps the config's order and the results do not depend on the number. report.json gets one entry
per row under `rows` (the single-run size keys + `name`, `metrics` (with the paired `class_logprob_vs_fp` and
`fd_vs_fp`: differences from the fp model's digits of the same noise), `ci95` (the bootstrap 95% interval of every
metric), `timings_s`, and `sweep` for sweep rows);
DIR/compare_grid.png shows the rows side by side and DIR/compare_plot.png the metrics against effective bits
per weight (the sweep: a line per method with its interval band).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures

import ml_collections

from dpq_jax.calibrate import checkpoint as ckpt_lib
from dpq_jax.demo import figures
from dpq_jax.demo import metrics as demo_metrics
from dpq_jax.demo import rows as rows_lib
from dpq_jax.demo import sweep as sweep_lib
from dpq_jax.quant import statistics
from dpq_jax.stages.job import Job

# Rows at a time where config.compare.workers is 0 (auto): measured on the 2-core machine (README, the demo).
AUTO_WORKERS = 2


def _registry():
  # The stage table; imported when used, as it lists this module too.
  from dpq_jax import stages

  return stages.REGISTRY


def check(config: ml_collections.ConfigDict) -> list[str]:
  """Problems with config.compare and with each row's config for the stages it runs."""
  config, errors = sweep_lib.expand(config)
  cfg = config.compare
  rows = list(cfg.rows)
  if not rows:
    errors.append('config.compare.rows is empty: expected row names from config.compare.row_defs')
  for name in rows:
    if name not in cfg.row_defs:
      errors.append(f'config.compare.rows: unknown row {name!r}; expected one of {", ".join(cfg.row_defs)}')
      continue
    try:
      row_cfg, stages = rows_lib.row_config(config, name)
    except (KeyError, AttributeError) as e:
      errors.append(f'config.compare.row_defs[{name!r}]: bad override {e}')
      continue
    after = cfg.row_defs[name].get('after')
    if after and (after not in rows or rows.index(after) > rows.index(name)):
      errors.append(f'config.compare.row_defs[{name!r}].after={after!r}: expected a row run before it')
    for stage in stages:
      if stage not in rows_lib.ROW_STAGES:
        errors.append(
          f'config.compare.row_defs[{name!r}].stages: {stage!r}; expected a subset of {rows_lib.ROW_STAGES}'
        )
      else:
        errors += [f'row {name}: {e}' for e in _registry()[stage].check(row_cfg)]
  if any(not isinstance(s, int) or s < 0 for s in cfg.curve_steps):
    errors.append(f'config.compare.curve_steps={tuple(cfg.curve_steps)}: expected calibration steps, integers >= 0')
  if not isinstance(cfg.workers, int) or cfg.workers < 0:
    errors.append(f'config.compare.workers={cfg.workers!r}: expected rows at a time, an integer >= 1 (0: auto)')
  if cfg.bootstrap_resamples < 2:
    errors.append(f'config.compare.bootstrap_resamples={cfg.bootstrap_resamples}: expected >= 2')
  if cfg.num_samples < 2:
    errors.append(
      f'config.compare.num_samples={cfg.num_samples}: expected >= 2 (the Frechet distance needs a covariance)'
    )
  return errors


class _Stopped(Exception):
  """A row stopped before its next stage: the main thread was signalled (compare runs rows in parallel)."""


def resolve_workers(workers: int) -> int:
  """config.compare.workers: rows run at a time; 0: one per core, at most AUTO_WORKERS."""
  return workers if workers > 0 else max(1, min(AUTO_WORKERS, os.cpu_count() or 1))


def _groups(names: list[str], continued: dict[str, tuple[str, tuple[str, ...]]]) -> list[list[str]]:
  """The rows grouped by the row whose model they start from (through any chain of continued rows), each group in
  the config's order: a group runs on one thread, one row after another."""
  root: dict[str, str] = {}
  groups: dict[str, list[str]] = {}
  for name in names:
    root[name] = root[continued[name][0]] if name in continued else name
    groups.setdefault(root[name], []).append(name)
  return list(groups.values())


def _cost(config: ml_collections.ConfigDict, names: list[str]) -> float:
  """A rough relative cost of a group of rows, for the order the groups start in (the longest first): one for each
  row's evaluation, two for each quantize or compress stage, one per 50 calibration steps."""
  total = 0.0
  for name in names:
    cfg, stages = rows_lib.row_config(config, name)
    total += 1 + 2 * sum(s in ('quantize', 'compress') for s in stages)
    total += cfg.calibrate.steps / 50 if 'calibrate' in stages else 0
  return total


def _run_groups(
  run_group: Callable, groups: list[list[str]], workers: int, stop: threading.Event, rows_dir: str
) -> dict[str, tuple[dict, object, list[str]]]:
  """run_group(names, row_done) of every group, `workers` at a time (threads: XLA releases the GIL, the rows share
  the compiled programs), with a progress bar over the rows.

  On SIGTERM/SIGINT the main thread's guard tells every calibration running on a worker (which saves a checkpoint
  and stops, as alone) and the other rows stop before their next stage; an error in one row stops the others the
  same way, and is raised once they have."""
  from tqdm.auto import tqdm

  bar = tqdm(total=sum(map(len, groups)), desc='compare', unit='row')
  out: dict = {}
  try:
    if workers <= 1:
      for names in groups:
        out.update(run_group(names, bar.update))
      return out
    with (
      ckpt_lib.PreemptionGuard() as guard,
      futures.ThreadPoolExecutor(workers, thread_name_prefix='compare-row') as pool,
    ):
      pending = {pool.submit(run_group, names, bar.update) for names in groups}
      try:
        while pending:
          finished, pending = futures.wait(pending, timeout=0.5, return_when=futures.FIRST_EXCEPTION)
          for f in finished:
            out.update(f.result())
          if guard.signum is not None:
            stop.set()
      except BaseException:
        stop.set()
        for f in pending:
          f.cancel()  # (those not started yet)
        futures.wait(pending)
        if guard.signum is not None and not isinstance(sys.exc_info()[1], ckpt_lib.Preempted):
          print(f'compare: signal {guard.signum}: the rows stopped before their next stage; the finished ones are '
                f'in {rows_dir}', file=sys.stderr)  # fmt: skip
          raise ckpt_lib.Preempted(128 + guard.signum) from None
        raise
    return out
  finally:
    bar.close()


def run(config: ml_collections.ConfigDict, workdir: str, job: Job) -> Job:
  config, _ = sweep_lib.expand(config)
  start_all = time.perf_counter()
  data = job.data
  model, variables = job.runtime(config)
  inputs = demo_metrics.fixed_noisy_inputs(data['heldout_images'], data['heldout_labels'], config.seed)
  reference_eps = demo_metrics.eps_prediction(model, variables, inputs)
  sample_cfg = copy.deepcopy(config.sample)
  sample_cfg.num_samples = config.compare.num_samples
  sample_cfg.batch_size = min(config.compare.num_samples, config.compare.batch_size)
  sample_cfg.labels = 'balanced'

  registry = _registry()
  continued = rows_lib.continued(config)  # {row: (the earlier row it starts from, the stages it still runs)}
  stop = threading.Event()  # set by the main thread on a signal: the rows stop before their next stage

  # The fp model's digits (the same noise and labels as every row's): each row's log p and fd are also given as paired
  # differences from them (demo/metrics.py); a row that runs no stage is this model, and reuses them.
  reference = demo_metrics.sample_outputs(model, variables, sample_cfg, job.classifier)

  def score(row_job: Job, cfg: ml_collections.ConfigDict, is_fp: bool = False) -> tuple[dict, dict, object]:
    row_model, row_variables = row_job.runtime(cfg)
    return demo_metrics.evaluate(
      row_model, row_variables, sample_cfg, job.classifier, data['heldout_images'], reference_eps, inputs,
      config.compare.bootstrap_resamples, reference=reference, outputs=reference if is_fp else None,
    )  # fmt: skip

  def run_group(names: list[str], row_done: Callable[[], object]) -> dict[str, tuple[dict, object, list[str]]]:
    """The rows of one group in order ({row: (its report.json entry, its images, its notes)}); a row that continues
    an earlier one starts from that row's model, which is let go after the last row that needs it."""
    kept = collections.Counter(continued[n][0] for n in names if n in continued)
    done, out = {}, {}
    for name in names:
      cfg, stages = rows_lib.row_config(config, name)
      row_def = config.compare.row_defs[name]
      base, notes = job, []
      if name in continued:  # the row continues where an earlier one stopped
        earlier, stages = continued[name]
        base = done[earlier]
        kept[earlier] -= 1
        if not kept[earlier]:
          del done[earlier]
        notes.append(f'{name}: continued from the model of row {earlier} (ran only {", ".join(stages)})')
      row = dataclasses.replace(base, report=copy.deepcopy(base.report), notes=[], chain=None, calibration_probe=None)
      row.report['timings_s'] = {}
      curve = []  # the calibration-budget curve: the row scored after each of config.compare.curve_steps
      if 'calibrate' in stages and config.compare.curve_steps:

        def probe(step: int, probe_job: Job, cfg=cfg, curve=curve) -> None:
          start = time.perf_counter()
          metrics, ci, _ = score(probe_job, cfg)
          curve.append({'step': step, 'metrics': metrics, 'ci95': ci, 'seconds': round(time.perf_counter() - start, 2)})

        steps = tuple(s for s in config.compare.curve_steps if s < cfg.calibrate.steps)
        row.calibration_probe = (steps, probe)
      row_dir = os.path.join(workdir, 'rows', name)
      for stage in stages:
        if stop.is_set():
          raise _Stopped()
        start = time.perf_counter()
        row = registry[stage].run(cfg, row_dir, row)
        row.report['timings_s'][stage] = round(time.perf_counter() - start, 2)
      start = time.perf_counter()
      is_fp = not stages and name not in continued and not row_def.get('overrides')  # the job's own model
      metrics, ci, image = score(row, cfg, is_fp)
      row.report['timings_s']['evaluate'] = round(time.perf_counter() - start, 2)
      rep = row.report
      entry = {'name': name, **{k: rep.get(k) for k in rows_lib.ROW_KEYS}, 'metrics': metrics, 'ci95': ci,
               'timings_s': rep['timings_s']}  # fmt: skip
      if row_def.get('sweep'):
        entry['sweep'] = row_def['sweep'].to_dict()
      if row.calibration_probe is not None:  # the last point: the row itself, after all its calibration steps
        entry['curve'] = curve + [{'step': rep['calibrate']['steps'], 'metrics': metrics, 'ci95': ci}]
        missed = sorted(set(row.calibration_probe[0]) - {p['step'] for p in curve})
        if missed:
          notes.append(f'{name}: no calibration-budget point at steps {missed}: its calibration resumed from a '
                       f'checkpoint in {row_dir} after them')  # fmt: skip
        row.calibration_probe = None
      if name in kept:
        done[name] = row
      out[name] = (entry, image, notes + [f'{name}: {n}' for n in row.notes])
      row_done()
    return out

  names = list(config.compare.rows)
  groups = _groups(names, continued)
  workers = min(resolve_workers(config.compare.workers), len(groups))
  if workers > 1:  # the groups in parallel, the longest first
    groups = sorted(groups, key=lambda g: _cost(config, g), reverse=True)
  else:  # one after another, in the config's order
    groups = [names]
  with statistics.shared():  # the rows' input statistics collected once per settings, not once per row
    results = _run_groups(run_group, groups, workers, stop, os.path.join(workdir, 'rows'))
  rows, images = [], {}
  for name in config.compare.rows:  # report order: the config's, whichever row finished first
    entry, images[name], notes = results[name]
    rows.append(entry)
    job.notes += notes
  if workers > 1:
    job.notes.append(f'compare: the rows ran {workers} at a time (config.compare.workers)')
  job.report['rows'] = rows
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
  job.report['compare'] = {
    'num_samples': sample_cfg.num_samples,
    'sampler': f'{sample_cfg.sampler} {sample_cfg.steps} steps, cfg {sample_cfg.cfg_scale}',
    'grid': 'compare_grid.png',
    'plot': 'compare_plot.png',
    'reading': sweep_lib.reading(rows) if sweep_lib.active(config) else rows_lib.reading(config, rows),
    'peak_rss_mib': round(peak_mib, 1),
    'seconds': round(time.perf_counter() - start_all, 1),
  }
  print(f'compare: {len(rows)} rows in {job.report["compare"]["seconds"]:.0f} s; peak memory (RSS) of the run so far '
        f'{peak_mib:.0f} MiB')  # fmt: skip
  figures.save_grid(os.path.join(workdir, 'compare_grid.png'), images, per_row=config.compare.grid_columns)
  if any('curve' in r for r in rows):
    figures.save_curves(os.path.join(workdir, 'compare_curves.png'), rows)
    job.report['compare']['curves'] = 'compare_curves.png'
  if sweep_lib.active(config):  # a line per method with its interval band
    figures.save_sweep_plot(os.path.join(workdir, 'compare_plot.png'), rows, rows_lib.budget_bits(config))
  else:
    figures.save_plot(os.path.join(workdir, 'compare_plot.png'), rows, rows_lib.budget_bits(config))
  return job
