"""report.json and report.md (keys as in DESIGN.md)."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from dpq_jax import io_utils


def full_precision_summary(spec, params) -> dict[str, Any]:
  """Size keys of an unquantized model: everything is full precision float32."""
  n = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  return {
    'model': spec.name,
    'input_size': spec.input_size,
    'method': 'fp',
    'num_params': n,
    'index_bits_per_weight': None,
    'effective_bits_per_weight': 32.0,
    'bytes': {'codes': 0, 'codebooks': 0, 'full_precision': 4 * n, 'total': 4 * n},
    'fp32_bytes': 4 * n,
    'compression_ratio': 1.0,
    'compression_ratio_model': 1.0,
    'weight_rel_mse': 0.0,
    'layers': [],
  }


def _fmt(v: Any) -> str:
  if v is None:
    return 'n/a'
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


def rows_table(rows: list[dict[str, Any]]) -> list[str]:
  """The compare rows as a markdown table: sizes (effective bits include codebooks), metrics (with their 95%
  interval where the row has one), seconds."""
  metric_keys = list(dict.fromkeys(k for r in rows for k in r.get('metrics', {})))
  head = ['row', 'index bits', 'eff. bits (quantized layers)', 'x vs fp32 (quantized layers)', 'x vs fp32 (model)',
          'bytes', 'weight rel. MSE', *metric_keys, 'seconds']  # fmt: skip
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [
      r['name'],
      _fmt(r.get('index_bits_per_weight')),
      _fmt(r.get('effective_bits_per_quantized_weight')),
      _fmt(r.get('compression_ratio')),
      _fmt(r.get('compression_ratio_model')),
      f'{r["bytes"]["total"]:,}' if r.get('bytes') else 'n/a',
      _fmt(r.get('weight_rel_mse')),
      *(_metric_cell(r, k) for k in metric_keys),
      ', '.join(f'{k} {v:.1f}' for k, v in r.get('timings_s', {}).items()),
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def _metric_cell(row: dict[str, Any], key: str) -> str:
  """The metric, with its 95% interval `[low, high]` where the row has one (rows' `ci95`)."""
  value, ci = row.get('metrics', {}).get(key), row.get('ci95', {}).get(key)
  return _fmt(value) + (f' [{_fmt(float(ci[0]))}, {_fmt(float(ci[1]))}]' if ci and value is not None else '')


def to_markdown(report: dict[str, Any], notes: list[str]) -> str:
  lines = [f'# dpq_jax report: {report.get("config_name", "")}', '']
  keys = [
    'model',
    'method',
    'num_params',
    'index_bits_per_weight',
    'effective_bits_per_weight',
    'fp32_bytes',
    'compression_ratio',
    'compression_ratio_model',
    'weight_rel_mse',
  ]
  lines += ['| key | value |', '|---|---|']
  lines += [f'| {k} | {_fmt(report[k])} |' for k in keys if k in report]
  if 'bytes' in report:
    lines.append('| bytes | ' + ', '.join(f'{k} {v:,}' for k, v in report['bytes'].items()) + ' |')
  if report.get('metrics'):
    lines += ['', '## Metrics', '', '| metric | value |', '|---|---|']
    lines += [f'| {k} | {_fmt(v)} |' for k, v in report['metrics'].items()]
  if report.get('samples'):
    s = report['samples']
    lines += ['', '## Samples', '']
    lines.append(
      f'{s["num_samples"]} samples, {s["sampler"]} {s["steps"]} steps, cfg {s["cfg_scale"]}; latents `{s["latents"]}`.'
    )
    lines += ['', f'![samples]({s["grid"]})']
  if report.get('rows'):
    lines += ['', '## Rows', ''] + rows_table(report['rows'])
    compare = report.get('compare', {})
    if compare.get('reading'):
      lines += ['', '## Reading', ''] + [f'- {r}' for r in compare['reading']]
    if compare.get('grid'):
      lines += ['', f'![rows side by side]({compare["grid"]})', '', f'![metrics vs effective bits]({compare["plot"]})']
    if compare.get('peak_rss_mib'):
      lines += ['', f'Peak memory (RSS) of the run: {compare["peak_rss_mib"]:.0f} MiB.']
  lines += ['', '## Wall time per stage (s)', '', '| stage | seconds |', '|---|---|']
  lines += [f'| {k} | {v:.2f} |' for k, v in report['timings_s'].items()]
  if notes:
    lines += ['', '## Notes', ''] + [f'- {n}' for n in notes]
  return '\n'.join(lines) + '\n'


def write(workdir: str, report: dict[str, Any], notes: list[str], config: ml_collections.ConfigDict) -> None:
  io_utils.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  io_utils.write_json(os.path.join(workdir, 'report.json'), report)
  io_utils.write_text(os.path.join(workdir, 'report.md'), to_markdown(report, notes))
