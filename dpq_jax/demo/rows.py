"""The demo's comparison rows: each row's config and stages, and the reading computed from their metrics."""

from __future__ import annotations

import copy

import ml_collections

from dpq_jax.demo import intervals

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


def continued(config: ml_collections.ConfigDict) -> dict[str, tuple[str, tuple[str, ...]]]:
  """{row: (earlier row, the stages it still runs)} for the rows of config.compare.rows that continue an earlier
  row's model: its `after` (row_defs[...].after: the row's own stages are what is left), or else the latest earlier
  row with the same effective config (row_config) whose stages are a proper prefix of this row's, so that
  `pq-1bit-calibrated` calibrates what `pq-1bit-compressed` already quantized and compressed instead of doing both
  again. An earlier row that itself continues another is not a prefix (its stages are only the rest)."""
  rows = list(config.compare.rows)
  made = {name: row_config(config, name) for name in rows if name in config.compare.row_defs}
  out = {}
  for i, name in enumerate(rows):
    if name not in made:
      continue
    after = config.compare.row_defs[name].get('after')
    cfg, stages = made[name]
    if after:
      out[name] = (after, stages)
      continue
    for earlier in reversed(rows[:i]):
      if earlier not in made or earlier in out:
        continue
      earlier_cfg, done = made[earlier]
      if done and len(done) < len(stages) and stages[: len(done)] == done and earlier_cfg.to_dict() == cfg.to_dict():
        out[name] = (earlier, stages[len(done) :])
        break
  return out


def budget_bits(config: ml_collections.ConfigDict) -> float | None:
  """Effective bits per quantized weight the compressed rows' budget allows (32 / ratio), if a ratio."""
  budgets = [
    row.get('overrides', {}).get('compress', {}).get('budget')
    for row in config.compare.row_defs.values()
    if 'compress' in row.get('stages', ())
  ]
  budgets = [b for b in budgets if b]
  return 32.0 / max(budgets) if budgets else None


# The headline metric first; higher is better only for the log-probability and the accuracy.
METRICS = (('class_logprob', 'log p', '.3f'), ('fd', 'fd', '.1f'), ('eps_rel_error', 'eps err.', '.3f'))
HIGHER_IS_BETTER = {'class_logprob': True, 'class_accuracy': True, 'fd': False, 'eps_rel_error': False}


def _interval(r: dict, key: str) -> tuple[float, float]:
  ci = r.get('ci95', {}).get(key)
  value = r['metrics'][key]
  return (ci[0], ci[1]) if ci else (value, value)


def verdict(a: dict, b: dict, key: str) -> str:
  """'better' / 'worse' when the 95% intervals of row a and row b on `key` separate, else 'not resolved'."""
  if not intervals.separated(_interval(a, key), _interval(b, key)):
    return 'not resolved'
  return 'better' if (a['metrics'][key] > b['metrics'][key]) == HIGHER_IS_BETTER[key] else 'worse'


def ranked(rows: list[dict], key: str = 'class_logprob') -> str:
  """Rows best first on `key`, joined by ' > ' where neighbours' intervals separate and ' ~ ' where they do not."""
  ordered = sorted(rows, key=lambda r: r['metrics'][key], reverse=HIGHER_IS_BETTER[key])
  out = describe_row(ordered[0])
  for prev, r in zip(ordered, ordered[1:]):
    out += (' > ' if intervals.separated(_interval(prev, key), _interval(r, key)) else ' ~ ') + describe_row(r)
  return out


def describe_row(r: dict) -> str:
  parts = []
  for key, label, spec in METRICS:
    lo, hi = _interval(r, key)
    parts.append(f'{label} {r["metrics"][key]:{spec}} [{lo:{spec}}, {hi:{spec}}]')
  bits = r['effective_bits_per_quantized_weight']
  return f'{r["name"]} (' + ', '.join(parts) + (f', {bits:.2f} eff. bits)' if bits else ')')


RANK_RULE = ("best first by the classifier's mean log-probability of the asked class, with 95% intervals; '>' where "
             "neighbours' intervals separate, '~' where they overlap (not resolved by these samples)")  # fmt: skip


def reading(config: ml_collections.ConfigDict, rows: list[dict]) -> list[str]:
  """Plain sentences computed from the rows (nothing hard-coded): which 1-bit rows keep the model best, which
  rows fit the compression budget and how they rank, which rows stay within fp's intervals, and what calibration
  changed. A difference is called only where the 95% intervals separate."""
  by_name = {r['name']: r for r in rows}
  stages = {r['name']: row_config(config, r['name'])[1] for r in rows}
  out = []
  one_bit = [r for r in rows if r['index_bits_per_weight'] and r['index_bits_per_weight'] <= 1.0 + 1e-9
             and 'calibrate' not in stages[r['name']]]  # fmt: skip
  if 'fp' in by_name:
    out.append(f'Full precision: {describe_row(by_name["fp"])}.')
  if one_bit:
    out.append(f'At <= 1 index bit without calibration ({RANK_RULE}): {ranked(one_bit)}.')
  limit = budget_bits(config)
  if limit:
    fits = [r for r in rows if r['effective_bits_per_quantized_weight'] and
            r['effective_bits_per_quantized_weight'] <= limit + 1e-9]  # fmt: skip
    out.append(f'Within the compression budget ({limit:.3f} eff. bits per quantized weight, codebooks included; '
               f'{RANK_RULE}): ' + (ranked(fits) if fits else 'no row') + '.')  # fmt: skip
  if 'fp' in by_name:
    quantized = [r for r in rows if r['name'] != 'fp']
    fp = by_name['fp']
    same = [r['name'] for r in quantized if all(verdict(r, fp, k) == 'not resolved' for k in ('class_logprob', 'fd'))]
    if quantized:
      out.append('Not told apart from fp on log p and fd (95% intervals overlap on both): '
                 + (', '.join(same) if same else 'no row')
                 + '; every other row is separated from fp on at least one.')  # fmt: skip
    paired = paired_reading(rows)
    if paired:
      out.append(paired)
  overrides = {r['name']: config.compare.row_defs[r['name']].get('overrides', {}) for r in rows}
  for r in rows:
    if 'calibrate' not in stages[r['name']]:
      continue
    uncalibrated = tuple(s for s in stages[r['name']] if s != 'calibrate')
    before = [b for b in rows if stages[b['name']] == uncalibrated and overrides[b['name']] == overrides[r['name']]]
    if before:
      b = before[0]
      changes = [f'{label} {b["metrics"][key]:{spec}} -> {r["metrics"][key]:{spec}} ({verdict(r, b, key)})'
                 for key, label, spec in METRICS]  # fmt: skip
      out.append(f'Calibration ({r["name"]} vs {b["name"]}): ' + ', '.join(changes) + '.')
  return out + curve_reading(rows)


# The paired differences from fp (demo/metrics.py): row minus fp on digits from the same noise and labels.
PAIRED = (('class_logprob_vs_fp', 'log p', '.4f'), ('fd_vs_fp', 'fd', '.2f'))


def paired_reading(rows: list[dict]) -> str | None:
  """The rows told apart from fp by their paired differences (the 95% interval of row minus fp leaves 0 out on
  log p or fd) and those not, each with its differences; None where the rows have no paired metrics."""
  apart, same = [], []
  for r in rows:
    if r['name'] == 'fp' or not all(k in r['metrics'] for k, _, _ in PAIRED):
      continue
    cells, told = [], False
    for key, label, spec in PAIRED:
      lo, hi = _interval(r, key)
      cells.append(f'{label} {r["metrics"][key]:+{spec}} [{lo:+{spec}}, {hi:+{spec}}]')
      told = told or intervals.excludes_zero((lo, hi))
    (apart if told else same).append(f'{r["name"]} ({", ".join(cells)})')
  if not apart and not same:
    return None
  return ("Paired with fp (every row's digits come from the same noise and labels as fp's; row minus fp, with the "
          '95% bootstrap interval of the difference): told apart from fp, the interval leaving 0 out on log p or fd: '
          + ('; '.join(apart) or 'no row') + '; not told apart: ' + ('; '.join(same) or 'no row') + '.')  # fmt: skip


CURVE_KEYS = ('class_logprob', 'fd')


def first_reaching(curve: list[dict], target: dict, keys: tuple[str, ...] = CURVE_KEYS) -> int | None:
  """The first step of `curve` (points {'step', 'metrics', 'ci95'}) not worse than `target` on every key (its
  95% interval better than or overlapping target's), or None."""
  for point in sorted(curve, key=lambda p: p['step']):
    if all(verdict(point, target, k) != 'worse' for k in keys):
      return point['step']
  return None


def curve_reading(rows: list[dict]) -> list[str]:
  """Sentences from the calibration-budget curves: each curve's path, the first step whose log p and fd are not
  worse than its own last point's, and where a row's `-w` counterpart (the quantizers blind to the data) has a
  curve too, the first step at which the row reaches the `-w` row's final quality."""
  curved = {r['name']: r for r in rows if r.get('curve')}
  out = []
  for name, r in curved.items():
    pts = sorted(r['curve'], key=lambda p: p['step'])
    last = pts[-1]
    path = ', '.join(f'{p["step"]}: {p["metrics"]["class_logprob"]:.4f} / {p["metrics"]["fd"]:.2f}' for p in pts)
    out.append(f'Calibration budget ({name}; step: log p / fd): {path}; not worse than its step-{last["step"]} '
               f'quality on log p and fd (95% intervals) from step {first_reaching(pts, last)}.')  # fmt: skip
    other = curved.get(f'{name}-w')
    if other:
      target = sorted(other['curve'], key=lambda p: p['step'])[-1]
      step = first_reaching(pts, target)
      out.append(
        f"{name} reaches {name}-w's quality after {target['step']} steps (log p and fd, 95% intervals) "
        + (f'at step {step}.' if step is not None else f'at none of its steps ({pts[-1]["step"]} the last).')
      )
  return out
