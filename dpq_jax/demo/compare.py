"""Stage `compare`: every method of config.compare.rows on the same trained model, measured alike.

Each row is the model as stage `train` (or `load`) left it, run through the row's own stages
(quantize, compress, calibrate: the pipeline's stage functions, with the row's config overrides,
into DIR/rows/<name>/), then scored with the demo metrics on the same labels and starting noise.
report.json gets one entry per row under `rows` (the single-run size keys + `name`, `metrics`,
`timings_s`); DIR/compare_grid.png shows the rows side by side and DIR/compare_plot.png the
metrics against effective bits per weight.
"""

from __future__ import annotations

import copy
import os
import resource
import time

import ml_collections
import numpy as np

from dpq_jax import io_utils
from dpq_jax.demo import metrics as demo_metrics
from dpq_jax.evaluate import grid as grid_lib

ROW_KEYS = (
  'model',
  'method',
  'index_bits_per_weight',
  'effective_bits_per_weight',
  'effective_bits_per_quantized_weight',
  'bytes',
  'fp32_bytes',
  'compression_ratio',
  'compression_ratio_model',
  'weight_rel_mse',
)
ROW_STAGES = ('quantize', 'compress', 'calibrate')


def row_config(config: ml_collections.ConfigDict, name: str) -> tuple[ml_collections.ConfigDict, tuple[str, ...]]:
  """(the job's config with the row's overrides, the row's stages)."""
  row = config.compare.row_defs[name]
  out = copy.deepcopy(config)
  for section, values in row.get('overrides', {}).items():
    for key, value in values.items():
      out[section][key] = value
  return out, tuple(row.get('stages', ()))


def check_config(config: ml_collections.ConfigDict, check_stage) -> list[str]:
  """Problems with config.compare; `check_stage(config, stage)` checks one stage's section."""
  cfg, errors = config.compare, []
  rows = list(cfg.rows)
  if not rows:
    errors.append('config.compare.rows is empty: expected row names from config.compare.row_defs')
  for name in rows:
    if name not in cfg.row_defs:
      errors.append(f'config.compare.rows: unknown row {name!r}; expected one of {", ".join(cfg.row_defs)}')
      continue
    try:
      row_cfg, stages = row_config(config, name)
    except (KeyError, AttributeError) as e:
      errors.append(f'config.compare.row_defs[{name!r}]: bad override {e}')
      continue
    for stage in stages:
      if stage not in ROW_STAGES:
        errors.append(f'config.compare.row_defs[{name!r}].stages: {stage!r}; expected a subset of {ROW_STAGES}')
      else:
        errors += [f'row {name}: {e}' for e in check_stage(row_cfg, stage)]
  if cfg.num_samples < 2:
    errors.append(
      f'config.compare.num_samples={cfg.num_samples}: expected >= 2 (the Frechet distance needs a covariance)'
    )
  return errors


def run(config: ml_collections.ConfigDict, workdir: str, state: dict) -> dict:
  from dpq_jax import pipeline  # the stage table; imported here as the pipeline imports this module

  data = state['data']
  inputs = demo_metrics.fixed_noisy_inputs(data['heldout_images'], data['heldout_labels'], config.seed)
  reference_eps = demo_metrics.eps_prediction(state['model'], state['variables'], inputs)
  sample_cfg = copy.deepcopy(config.sample)
  sample_cfg.num_samples = config.compare.num_samples
  sample_cfg.batch_size = min(config.compare.num_samples, config.compare.batch_size)
  sample_cfg.labels = 'balanced'
  base = {k: copy.deepcopy(v) for k, v in state.items() if k not in ('report', 'report_notes')}

  from tqdm.auto import tqdm

  rows, images = [], {}
  for name in tqdm(config.compare.rows, desc='compare', unit='row'):
    cfg, stages = row_config(config, name)
    row_state = {**base, 'report': copy.deepcopy(state['report']), 'report_notes': []}
    row_state['report']['timings_s'] = {}
    row_dir = os.path.join(workdir, 'rows', name)
    for stage in stages:
      start = time.perf_counter()
      row_state = pipeline.STAGES[stage](cfg, row_dir, row_state)
      row_state['report']['timings_s'][stage] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    metrics, images[name] = demo_metrics.evaluate(
      row_state['model'], row_state['variables'], sample_cfg, state['classifier'], data['heldout_images'],
      reference_eps, inputs,
    )  # fmt: skip
    row_state['report']['timings_s']['evaluate'] = round(time.perf_counter() - start, 2)
    rep = row_state['report']
    rows.append({'name': name, **{k: rep.get(k) for k in ROW_KEYS}, 'metrics': metrics, 'timings_s': rep['timings_s']})
    state['report_notes'] += [f'{name}: {n}' for n in row_state['report_notes']]
  state['report']['rows'] = rows
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
  state['report']['compare'] = {
    'num_samples': sample_cfg.num_samples,
    'sampler': f'{sample_cfg.sampler} {sample_cfg.steps} steps, cfg {sample_cfg.cfg_scale}',
    'grid': 'compare_grid.png',
    'plot': 'compare_plot.png',
    'reading': reading(config, rows),
    'peak_rss_mib': round(peak_mib, 1),
  }
  print(f'compare: {len(rows)} rows; peak memory (RSS) of the run so far {peak_mib:.0f} MiB')
  save_grid(os.path.join(workdir, 'compare_grid.png'), images, per_row=config.compare.grid_columns)
  save_plot(os.path.join(workdir, 'compare_plot.png'), rows, budget_bits(config))
  return state


def budget_bits(config: ml_collections.ConfigDict) -> float | None:
  """Effective bits per quantized weight the compressed rows' budget allows (32 / ratio), if a ratio."""
  budgets = [
    row.get('overrides', {}).get('compress', {}).get('budget')
    for row in config.compare.row_defs.values()
    if 'compress' in row.get('stages', ())
  ]
  budgets = [b for b in budgets if b]
  return 32.0 / max(budgets) if budgets else None


def reading(config: ml_collections.ConfigDict, rows: list[dict]) -> list[str]:
  """Plain sentences computed from the rows (nothing hard-coded): which 1-bit row keeps the model best,
  which rows fit the compression budget and how they rank, and what calibration changed."""
  by_name = {r['name']: r for r in rows}
  stages = {r['name']: row_config(config, r['name'])[1] for r in rows}
  out = []

  def fmt(r: dict) -> str:
    m = r['metrics']
    bits = r['effective_bits_per_quantized_weight']
    return (f'{r["name"]} (fd {m["fd"]:.1f}, class acc. {m["class_accuracy"]:.3f}, eps err. {m["eps_rel_error"]:.3f}, '
            f'{bits:.2f} eff. bits)' if bits else f'{r["name"]} (fd {m["fd"]:.1f}, class acc. {m["class_accuracy"]:.3f})')  # fmt: skip

  one_bit = [r for r in rows if r['index_bits_per_weight'] and r['index_bits_per_weight'] <= 1.0 + 1e-9
             and 'calibrate' not in stages[r['name']]]  # fmt: skip
  if 'fp' in by_name:
    out.append(f'Full precision: {fmt(by_name["fp"])}.')
  if one_bit:
    ranked = sorted(one_bit, key=lambda r: r['metrics']['fd'])
    out.append('At <= 1 index bit without calibration, by fd: ' + '; '.join(fmt(r) for r in ranked) + '.')
  limit = budget_bits(config)
  if limit:
    fits = sorted((r for r in rows if r['effective_bits_per_quantized_weight'] and
                   r['effective_bits_per_quantized_weight'] <= limit + 1e-9), key=lambda r: r['metrics']['fd'])  # fmt: skip
    out.append(f'Within the compression budget ({limit:.3f} eff. bits per quantized weight, codebooks included), by '
               'fd: ' + ('; '.join(fmt(r) for r in fits) if fits else 'no row') + '.')  # fmt: skip
  overrides = {r['name']: config.compare.row_defs[r['name']].get('overrides', {}) for r in rows}
  for r in rows:
    if 'calibrate' not in stages[r['name']]:
      continue
    uncalibrated = tuple(s for s in stages[r['name']] if s != 'calibrate')
    before = [b for b in rows if stages[b['name']] == uncalibrated and overrides[b['name']] == overrides[r['name']]]
    if before:
      b, m0, m1 = before[0], before[0]['metrics'], r['metrics']
      out.append(f'Calibration ({r["name"]} vs {b["name"]}): fd {m0["fd"]:.1f} -> {m1["fd"]:.1f}, class acc. '
                 f'{m0["class_accuracy"]:.3f} -> {m1["class_accuracy"]:.3f}, eps err. {m0["eps_rel_error"]:.3f} -> '
                 f'{m1["eps_rel_error"]:.3f}.')  # fmt: skip
  return out


def save_grid(path: str, images: dict[str, np.ndarray], per_row: int) -> None:
  """One line of samples per method (same labels and noise in every line), the name on the left."""
  from PIL import Image, ImageDraw

  scale, pad, label_w = 4, 2, 150
  lines = []
  for name, imgs in images.items():
    tiles = grid_lib.to_uint8(imgs[:per_row])[..., 0]  # [n, 8, 8] grey
    line = grid_lib.make_grid(tiles[..., None], nrow=per_row, padding=pad, pad_value=255)[..., 0]
    lines.append((name, line.repeat(scale, 0).repeat(scale, 1)))
  h, w = lines[0][1].shape
  canvas = Image.new('L', (label_w + w, h * len(lines)), 255)
  draw = ImageDraw.Draw(canvas)
  for i, (name, line) in enumerate(lines):
    canvas.paste(Image.fromarray(line), (label_w, i * h))
    draw.text((4, i * h + h // 2 - 6), name, fill=0)
  io_utils.atomic_write(path, lambda tmp: canvas.save(tmp, format='PNG'))


def save_plot(path: str, rows: list[dict], budget: float | None = None) -> None:
  """fd (log scale), class accuracy and eps error against effective bits per quantized weight (codes +
  codebooks + scales): a point per quantized row (marker: plain / compressed / calibrated / unscaled),
  the full-precision row as a dashed line, the compression budget (if any) as a dotted one; one legend."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fp = [r for r in rows if not r['effective_bits_per_quantized_weight']]
  quantized = [r for r in rows if r['effective_bits_per_quantized_weight']]
  colors = plt.get_cmap('tab20').colors
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
  for ax, key in zip(axes, ('fd', 'class_accuracy', 'eps_rel_error')):
    for i, row in enumerate(quantized):
      ax.scatter([row['effective_bits_per_quantized_weight']], [row['metrics'][key]], s=40, label=row['name'],
                 color=colors[i % len(colors)], marker=_marker(row['name']), zorder=3)  # fmt: skip
    for row in fp:
      ax.axhline(row['metrics'][key], color='k', linestyle='--', linewidth=1, label=f'{row["name"]} (32 bits)')
    if budget:
      ax.axvline(
        budget, color='grey', linestyle=':', linewidth=1, label=f'{32 / budget:.4g}x budget ({budget:.3f} bits)'
      )
    if key == 'fd':
      ax.set_yscale('log')
    ax.set_xlabel('effective bits per quantized weight (codebooks included)')
    ax.set_title(key + (' (log scale)' if key == 'fd' else ''))
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='center left', bbox_to_anchor=(0.83, 0.5), fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0, 0.83, 1))
  io_utils.atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=110))
  plt.close(fig)


def _marker(name: str) -> str:
  for part, marker in (('calibrated', '*'), ('compressed', 's'), ('unscaled', 'x')):
    if part in name:
      return marker
  return 'o'
