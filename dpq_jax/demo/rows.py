"""The demo's comparison rows: each row's config and stages, and the reading computed from their metrics."""

from __future__ import annotations

import copy

import ml_collections

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
  'output_rel_err',
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
