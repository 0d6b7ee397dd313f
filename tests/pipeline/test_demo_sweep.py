"""The rate-distortion sweep: its byte accounting against the artifact on disk, its row expansion, and its refusal
of an unreachable point before any work."""

import jax
import numpy as np
import pytest

from dpq_jax.configs import digits as digits_config
from dpq_jax.demo import sweep
from dpq_jax.quant import storage, surgery
from tests import helpers


@pytest.mark.parametrize(
  'method, setting',
  [('rtn', {'bits': 2}), ('rtn', {'bits': 1}), ('vq', {'k': 64, 'd': 8}), ('pq', {'k': 16, 'd': 4}),
   ('pq', {'k': 32, 'd': 2})],
)  # fmt: skip
def test_estimate_bytes_equals_the_artifact_on_disk(tmp_path, method, setting):
  rng = np.random.default_rng(0)
  shapes = [(48, 32), (96, 32), (32, 64)]  # (C_out, C_in)
  params = {f'blocks_{i}': {'mlp': {'fc1': {'kernel': rng.normal(size=(c_in, c_out)).astype(np.float32),
                                             'bias': np.zeros(c_out, np.float32)}}}
            for i, (c_out, c_in) in enumerate(shapes)}  # fmt: skip
  rules = surgery.default_rules(method, setting.get('k', 1), setting.get('d', 1), pattern=r'blocks_\d+/mlp/fc1')
  q = surgery.quantize_params(params, rules, jax.random.key(0), method=method, iters=2, rtn_bits=setting.get('bits', 2),
                              codebook_dtype='int8', channel_scale=True, progress=False)  # fmt: skip
  sizes = storage.save(str(tmp_path / 'q'), q, {'name': 'test'}, codebook_dtype='int8')
  assert sweep.estimate_bytes(method, setting, shapes) == sizes['codes'] + sizes['codebooks']


def test_choose_spends_the_most_bytes_within_the_target():
  shapes = [(640, 640), (2560, 640), (640, 2560)]
  weights = sum(a * b for a, b in shapes)
  for method in ('rtn', 'vq', 'pq'):
    for target in (2.25, 1.5, 1.125, 0.8, 0.55):
      chosen = sweep.choose(method, target, shapes)
      fits = [8 * b / weights for s in sweep.GRIDS[method] if (b := sweep.estimate_bytes(method, s, shapes))]
      fits = [bits for bits in fits if bits <= target]
      if not fits:
        assert chosen is None
        continue
      setting, bits = chosen
      assert bits == max(fits) <= target
      assert bits == 8 * sweep.estimate_bytes(method, setting, shapes) / weights
  assert sweep.choose('rtn', 0.55, shapes) is None  # below 1 bit + scales


def test_sweep_rows_expand_per_point_objective_and_calibration():
  config, problems = sweep.expand(digits_config.get_config('sweep'))
  assert problems == []
  rows = config.compare.rows
  assert rows[0] == 'fp' and 'pqc@0p55' in rows and 'pqc-w@0p55-cal' in rows and 'rtn@2p25-cal' not in rows
  cal = config.compare.row_defs['vq@1p125-cal']
  assert cal.after == 'vq@1p125' and tuple(cal.stages) == ('calibrate',)
  assert cal.overrides.to_dict() == config.compare.row_defs['vq@1p125'].overrides.to_dict()
  assert config.compare.row_defs['pqc-w@0p8'].overrides.compress.budget_bits == 0.8
  # every row's setting within its point's bytes
  for name in rows[1:]:
    s = config.compare.row_defs[name].sweep
    assert s.estimated_bits <= s.target_bits


def test_unreachable_sweep_point_is_refused_before_any_work(tmp_path):
  r = helpers.run_main(tmp_path / 'run', '--config.compare.sweep.points.rtn=(0.5,)', config='digits:tiny,sweep')
  helpers.assert_refused(r, tmp_path / 'run', "config.compare.sweep.points['rtn']: 0.5 bits per quantized weight is "
                                              'unreachable for rtn')  # fmt: skip


@pytest.mark.slow
def test_tiny_sweep_end_to_end_within_budgets_on_disk(tmp_path):
  import json

  # RTN (bytes by estimate) and compressed PQ (bytes by stage compress) with its calibrated row: the plumbing; VQ's and
  # PQ's estimates are held to the disk by test_estimate_bytes_equals_the_artifact_on_disk, in seconds.
  off = ('--config.compare.sweep.points.vq=()', '--config.compare.sweep.points.pq=()')
  r = helpers.run_main(tmp_path, *off, config='digits:tiny,sweep', timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads((tmp_path / 'report.json').read_text())
  rows = {row['name']: row for row in report['rows']}
  assert set(rows) == {'fp', 'rtn@2p5', 'pqc@2', 'pqc@2-cal'}
  for name, row in rows.items():
    if name == 'fp':
      continue
    art = tmp_path / 'rows' / name / 'quantized'
    on_disk = {f.name: f.stat().st_size for f in art.iterdir()}
    measured = on_disk['codes.bin'] + on_disk['codebooks.bin']
    bits = row['effective_bits_per_quantized_weight']
    assert measured == row['bytes']['codes'] + row['bytes']['codebooks']
    assert bits <= row['sweep']['target_bits'] + 1e-9, (name, bits)
    if row['sweep']['method'] != 'pqc' and not row['sweep']['calibrated']:
      np.testing.assert_allclose(bits, row['sweep']['estimated_bits'], rtol=1e-12)
  # a calibrated row continues its uncalibrated row: same sizes, its own (calibrate) timing only
  assert rows['pqc@2-cal']['bytes'] == rows['pqc@2']['bytes'] and set(rows['pqc@2-cal']['timings_s']) == {
    'calibrate', 'evaluate'}  # fmt: skip
  reading = report['compare']['reading']
  assert any(line.startswith('2 bits, calibrated') and 'pqc@2-cal (log p' in line for line in reading)
  paired = next(line for line in reading if line.startswith('Paired with fp'))
  assert all(f'{name} (log p ' in paired for name in rows if name != 'fp')
  assert (tmp_path / 'compare_plot.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_reading_calls_pq_compressed_against_each_method_on_every_metric():
  """A difference is called only where the 95% intervals separate, per metric and in that metric's direction (log p
  higher is better; fd and eps error lower), and only against rows of the same point, objective and calibration."""

  def row(name, method, target, logp, fd, eps, calibrated=False):
    metrics = {'class_logprob': logp[0], 'fd': fd[0], 'eps_rel_error': eps[0], 'class_accuracy': 1.0}
    ci = {'class_logprob': logp[1:], 'fd': fd[1:], 'eps_rel_error': eps[1:], 'class_accuracy': (1.0, 1.0)}
    sweep_def = {'method': method, 'objective': 'output', 'target_bits': target, 'calibrated': calibrated}
    return {'name': name, 'metrics': metrics, 'ci95': ci, 'sweep': sweep_def,
            'effective_bits_per_quantized_weight': target}  # fmt: skip

  rows = [
    row('pqc@1', 'pqc', 1.0, (-0.001, -0.002, -0.0005), (7.0, 6.0, 8.0), (0.05, 0.04, 0.06)),
    row('vq@1', 'vq', 1.0, (-0.010, -0.020, -0.005), (7.5, 6.5, 8.5), (0.03, 0.025, 0.035)),
    row('vq@2', 'vq', 2.0, (-0.5, -0.6, -0.4), (50.0, 45.0, 55.0), (0.5, 0.4, 0.6)),  # another point: no call
    row('vq@1-cal', 'vq', 1.0, (-0.5, -0.6, -0.4), (50.0, 45.0, 55.0), (0.5, 0.4, 0.6), calibrated=True),
  ]
  lines = {line.split(':')[0]: line for line in sweep.reading(rows) if line.startswith('PQ compressed')}

  def on(label):
    return lines[f'PQ compressed against the other methods at the same point, objective and calibration, on {label}']

  assert 'better: pqc@1 vs vq@1;' in on('log p')
  assert 'worse: pqc@1 vs vq@1;' in on('eps err.')
  assert 'not resolved: pqc@1 vs vq@1.' in on('fd')
  assert all('vq@2' not in line and 'vq@1-cal' not in line for line in lines.values())
