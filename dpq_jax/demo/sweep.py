"""The rate-distortion sweep (`--config=digits:sweep`): every method at a ladder of byte budgets, each point
uncalibrated and calibrated with the same step budget, expanded into compare rows before any work.

A point is (method, target bits per quantized weight: codes + codebooks + scales, as measured on disk). How each
method spends the point's bytes:
  pqc  PQ K=256, d=8 (int8 codebook values) compressed by stage `compress` to compress.budget_bits = target: the
       stage measures the artifact it writes and meets the budget (biases included, so codes + codebooks land a
       little under it).
  pq   PQ (int8 codebooks): the (K, d) of GRIDS['pq'] with the most bytes that fit the target, by estimate_bytes
       (the storage format's byte count, exact: no padding in the files).
  vq   VQ: likewise over GRIDS['vq'] (K <= 1024 keeps k-means in seconds on the demo's layers).
  rtn  round-to-nearest with one fp16 scale and offset per output channel: the most bits that fit; below
       1 bit + its scales a point is unreachable and named before any work.
Row names: '<method>[-w]@<target>', the target's point written p ('pq@1p125': ConfigDict keys have no dots; -w:
the data-blind weight objective) and '...-cal' (+ calibration).
RTN has no codebooks to calibrate: its points are uncalibrated only.
"""

from __future__ import annotations

import copy
import math
import re

import jax
import ml_collections

from dpq_jax.models import dit
from dpq_jax.quant import packing, surgery

METHODS = ('rtn', 'vq', 'pq', 'pqc')
GRIDS = {
  'rtn': tuple({'bits': b} for b in (1, 2, 3, 4)),
  'vq': tuple({'k': 2**e, 'd': d} for d in (4, 8, 16) for e in range(1, 11)),
  'pq': tuple({'k': k, 'd': d} for d in (2, 4, 8, 16) for k in (4, 8, 16, 32, 64, 256)),
}
CODEBOOK_DTYPE = 'int8'  # every codebook method of the sweep stores int8 values + one fp16 scale per codebook
SIDE_BYTES = 2  # fp16 channel scales, RTN scale and offset


def layer_shapes(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
  """(C_out, C_in) of every layer config.quant.pattern selects in config.model, from shapes only (no init)."""
  m = config.model
  model = dit.create_model(m.name, input_size=m.input_size, num_classes=m.num_classes, in_channels=1)
  params = jax.eval_shape(lambda k: dit.init_params(model, k), jax.random.key(0))
  return [
    (int(k.shape[1]), int(k.shape[0]))
    for path, k in surgery.module_kernels(params)
    if re.fullmatch(config.quant.pattern, '/'.join(path))
  ]


def estimate_bytes(method: str, setting: dict, shapes: list[tuple[int, int]]) -> int | None:
  """Codes + codebooks (+ channel scales, int8 codebook scales, RTN scale/offset) of the quantized layers as
  storage.save writes them; None where a layer's C_in is not a multiple of d."""
  total = 0
  for c_out, c_in in shapes:
    if method == 'rtn':
      total += packing.packed_nbytes(c_out * c_in, setting['bits']) + 2 * SIDE_BYTES * c_out
      continue
    k, d = setting['k'], setting['d']
    if c_in % d:
      return None
    m = c_in // d
    books = 1 if method == 'vq' else m
    total += packing.packed_nbytes(c_out * m, packing.index_bits(k))
    total += books * k * d + SIDE_BYTES * books  # int8 values + a fp16 scale per codebook
    total += SIDE_BYTES * c_out  # the per-output-channel scale
  return total


def choose(
  method: str, target: float, shapes: list[tuple[int, int]], pqc: tuple[int, int] = (256, 8)
) -> tuple[dict, float] | None:
  """(setting, its estimated effective bits) with the most bytes within `target` bits per quantized weight, or
  None where no setting fits. pqc: PQ (K, d) = `pqc` to the compress stage's own budget, reachable where its
  codes alone (one live codeword per codebook: 0 index bits) fit."""
  if method == 'pqc':
    floor = estimate_bytes('pq', {'k': 1, 'd': pqc[1]}, shapes)
    weights = sum(a * b for a, b in shapes)
    if floor is None or 8 * floor / weights > target:
      return None
    return {'k': pqc[0], 'd': pqc[1], 'budget_bits': target}, target
  weights = sum(a * b for a, b in shapes)
  best = None
  for setting in GRIDS[method]:
    nbytes = estimate_bytes(method, setting, shapes)
    if nbytes is not None and 8 * nbytes / weights <= target + 1e-12 and (best is None or nbytes > best[1]):
      best = (setting, nbytes)
  return (best[0], 8 * best[1] / weights) if best else None


def _least_bits(method: str, shapes: list[tuple[int, int]], pqc: tuple[int, int]) -> float:
  weights = sum(a * b for a, b in shapes)
  if method == 'pqc':
    return 8 * estimate_bytes('pq', {'k': 1, 'd': pqc[1]}, shapes) / weights
  sizes = [estimate_bytes(method, s, shapes) for s in GRIDS[method]]
  return min(8 * b / weights for b in sizes if b is not None)


def _overrides(method: str, setting: dict, objective: str) -> dict:
  quant = {'method': 'pq' if method == 'pqc' else method, 'codebook_dtype': CODEBOOK_DTYPE, 'objective': objective}
  quant['rtn_clip'] = 'mse' if objective == 'output' else 'minmax'
  if objective != 'output':  # error feedback and the output-energy scale need the output objective's statistics
    quant.update(error_feedback=False, scale_rule='norm')
  if method == 'rtn':
    quant['bits'] = setting['bits']
  else:
    quant.update(k=setting['k'], d=setting['d'])
  out = {'quant': quant}
  if method == 'pqc':
    out['compress'] = {'budget_bits': setting['budget_bits'], 'budget_bytes': 0,
                       'distortion': 'loss' if objective == 'output' else 'relative'}  # fmt: skip
  return out


def describe(method: str, setting: dict) -> str:
  if method == 'rtn':
    return f'{setting["bits"]}-bit RTN, fp16 scale + offset per output channel'
  if method == 'pqc':
    return f'PQ K={setting["k"]}, d={setting["d"]} compressed to {setting["budget_bits"]:g} bits (stage compress)'
  return f'{method.upper()} K={setting["k"]}, d={setting["d"]} ({math.log2(setting["k"]) / setting["d"]:g} index bits)'


def expand(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list[str]]:
  """(config with compare.rows / row_defs holding the sweep's rows, problems). Unreachable points are problems
  naming the method and target; the config comes back unchanged where config.compare.sweep has no points."""
  sweep = config.compare.sweep
  points = {m: tuple(float(t) for t in ts) for m, ts in sweep.points.items() if ts}
  if not points:
    return config, []
  problems = [f'config.compare.sweep.points: unknown method {m!r}; expected one of {", ".join(METHODS)}'
              for m in points if m not in METHODS]  # fmt: skip
  if problems:
    return config, problems
  shapes = layer_shapes(config)
  out = copy.deepcopy(config)
  out.unlock()  # main locks the config; the sweep's rows are new keys of row_defs
  rows = ['fp'] if 'fp' in config.compare.row_defs else []
  for method, targets in points.items():
    for target in targets:
      chosen = choose(method, target, shapes, tuple(sweep.pqc))
      if chosen is None:
        problems.append(
          f'config.compare.sweep.points[{method!r}]: {target:g} bits per quantized weight is unreachable for '
          f'{method} on {config.model.name} (the least it can spend is '
          f'{_least_bits(method, shapes, tuple(sweep.pqc)):.3f})'
        )
        continue
      setting, bits = chosen
      for objective in sweep.objectives:
        name = f'{method}{"" if objective == "output" else "-w"}@{target:g}'.replace('.', 'p')  # no dots in keys
        stages = ('quantize', 'compress') if method == 'pqc' else ('quantize',)
        row = {'stages': stages, 'overrides': _overrides(method, setting, objective),
               'sweep': {'method': method, 'objective': objective, 'target_bits': target, 'estimated_bits': bits,
                         'setting': describe(method, setting), 'calibrated': False}}  # fmt: skip
        out.compare.row_defs[name] = row
        rows.append(name)
        if method != 'rtn' and sweep.calibrate:
          cal = copy.deepcopy(row)
          cal.update(stages=('calibrate',), after=name)
          cal['sweep']['calibrated'] = True
          out.compare.row_defs[f'{name}-cal'] = cal
          rows.append(f'{name}-cal')
  out.compare.rows = tuple(rows)
  return out, problems


def active(config: ml_collections.ConfigDict) -> bool:
  return any(config.compare.sweep.points.get(m) for m in config.compare.sweep.points)


def reading(rows: list[dict]) -> list[str]:
  """Per point (best first, a difference called only where 95% intervals separate), the rows told apart from fp by
  their paired differences, then PQ compressed against every other method at the same point, objective and
  calibration, on each metric (log p, fd, eps error)."""
  from dpq_jax.demo import rows as rows_lib

  swept = [r for r in rows if r.get('sweep')]
  out = [f'Every point below: {rows_lib.RANK_RULE}.']
  out += [f'Full precision: {rows_lib.describe_row(r)}.' for r in rows if r['name'] == 'fp']
  paired = rows_lib.paired_reading(rows)  # the rows told apart from fp on digits of the same noise and labels
  if paired:
    out.append(paired)
  for target in sorted({r['sweep']['target_bits'] for r in swept}, reverse=True):
    for calibrated in (False, True):
      at = [r for r in swept if r['sweep']['target_bits'] == target and r['sweep']['calibrated'] == calibrated]
      if at:
        state = 'calibrated' if calibrated else 'uncalibrated'
        out.append(f'{target:g} bits, {state}: {rows_lib.ranked(at)}.')
  pqc = [r for r in swept if r['sweep']['method'] == 'pqc']
  for key, label, _ in rows_lib.METRICS:
    calls: dict[str, list[str]] = {'better': [], 'worse': [], 'not resolved': []}
    for r in pqc:
      for other in swept:
        s, o = r['sweep'], other['sweep']
        if o['method'] != 'pqc' and all(s[k] == o[k] for k in ('target_bits', 'objective', 'calibrated')):
          calls[rows_lib.verdict(r, other, key)].append(f'{r["name"]} vs {other["name"]}')
    if any(calls.values()):
      out.append(f'PQ compressed against the other methods at the same point, objective and calibration, on {label}: '
                 + '; '.join(f'{k}: {", ".join(v) if v else "none"}' for k, v in calls.items()) + '.')  # fmt: skip
  return out
