"""The digits demo: data split, classifier, stage `train` with its cache, stage `compare` end to end."""

import json
import shutil

import numpy as np
import pytest

from dpq_jax.demo import classifier, digits
from tests import helpers

ROW_KEYS = {
    'name', 'model', 'method', 'index_bits_per_weight', 'effective_bits_per_weight', 'bytes', 'fp32_bytes',
    'compression_ratio', 'compression_ratio_model', 'weight_rel_mse', 'metrics', 'ci95', 'timings_s',
}  # fmt: skip


def test_digits_split_against_sklearn():
  from sklearn.datasets import load_digits

  ref = load_digits()
  data = digits.load(heldout_per_class=30, seed=0)
  assert data['train_images'].shape == (1797 - 300, 8, 8, 1) and data['heldout_images'].shape == (300, 8, 8, 1)
  np.testing.assert_array_equal(np.bincount(data['heldout_labels']), np.full(10, 30))
  # Every image is an sklearn image rescaled from 0..16 to [-1, 1], with its own label, none lost or repeated.
  both = np.concatenate([data['train_images'], data['heldout_images']])[..., 0]
  labels = np.concatenate([data['train_labels'], data['heldout_labels']])
  want = {(img.astype(np.float32) / 8 - 1).tobytes() + bytes([t]) for img, t in zip(ref.images, ref.target)}
  assert {img.tobytes() + bytes([t]) for img, t in zip(both, labels)} == want
  again = digits.load(heldout_per_class=30, seed=0)
  np.testing.assert_array_equal(again['heldout_labels'], data['heldout_labels'])
  with pytest.raises(ValueError, match='heldout_per_class=500'):
    digits.load(heldout_per_class=500)


def test_classifier_learns_the_digits():
  data = digits.load()
  params = classifier.train(data['train_images'], data['train_labels'], steps=300, seed=0)
  feats, logits = classifier.apply(params, data['heldout_images'])
  assert feats.shape == (300, classifier.FEATURES)
  assert np.mean(np.argmax(logits, -1) == data['heldout_labels']) > 0.9


def _main(workdir, *overrides):
  return helpers.run_main(workdir, *overrides, config='configs/digits.py:tiny', timeout=1200)


@pytest.mark.slow
def test_tiny_demo_end_to_end_and_cache(tmp_path):
  # The default tiny rows, the compressed row the calibrated one starts from, and its calibration-budget curve; the
  # rows two at a time (threads), the compressed and calibrated rows in order on one.
  rows_arg = '--config.compare.rows=fp,rtn-1bit,vq-1bit,pq-1bit,pq-1bit-compressed,pq-1bit-calibrated'
  r = _main(tmp_path, rows_arg, '--config.compare.curve_steps=0,2', '--config.compare.workers=2')
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads((tmp_path / 'report.json').read_text())
  names = [row['name'] for row in report['rows']]
  assert names[0] == 'fp' and {'rtn-1bit', 'vq-1bit', 'pq-1bit'} <= set(names)
  for row in report['rows']:
    assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
    assert (
      set(row['metrics'])
      == set(row['ci95'])
      == {'class_logprob', 'fd', 'class_accuracy', 'eps_rel_error', 'class_logprob_vs_fp', 'fd_vs_fp'}
    )
    assert np.isfinite(list(row['metrics'].values())).all() and np.isfinite(list(row['ci95'].values())).all()
    assert all(lo <= hi for lo, hi in row['ci95'].values())
  rows = {row['name']: row for row in report['rows']}
  assert rows['fp']['metrics']['eps_rel_error'] == 0.0 and rows['fp']['effective_bits_per_weight'] == 32.0
  # Paired with fp's digits (the same noise and labels): fp against itself is 0, and a row's mean per-digit difference
  # in log p is the difference of the two rows' means; fd's is the difference of the two rows' fd (up to the rounding
  # of the two Frechet distance routines, intervals.FixedReferenceFD and evaluate.metrics).
  assert rows['fp']['metrics']['class_logprob_vs_fp'] == 0 and rows['fp']['ci95']['fd_vs_fp'] == [0, 0]
  for row in rows.values():
    for key in ('class_logprob', 'fd'):
      want = row['metrics'][key] - rows['fp']['metrics'][key]
      assert row['metrics'][f'{key}_vs_fp'] == pytest.approx(want, rel=1e-6, abs=1e-5), (row['name'], key)
  assert any(line.startswith('Paired with fp') for line in report['compare']['reading'])
  for name in ('rtn-1bit', 'vq-1bit', 'pq-1bit'):
    assert rows[name]['index_bits_per_weight'] == 1.0
    assert rows[name]['metrics']['eps_rel_error'] > 0
    # the row's artifact on disk is what the row reports
    art = tmp_path / 'rows' / name / 'quantized'
    assert sum(f.stat().st_size for f in art.iterdir()) == rows[name]['bytes']['total']
  # report.md: the rows table and a reading computed from the same numbers (log p order as report.json's).
  md = (tmp_path / 'report.md').read_text()
  assert '## Rows' in md and all(f'| {name} |' in md for name in names)
  reading = report['compare']['reading']
  ranked = next(line for line in reading if line.startswith('At <= 1 index bit'))
  one_bit = [n for n in names if rows[n]['index_bits_per_weight'] == 1.0 and 'calibrated' not in n]
  by_logp = sorted(one_bit, key=lambda n: -rows[n]['metrics']['class_logprob'])
  assert [ranked.index(f'{n} (log p') for n in by_logp] == sorted(ranked.index(f'{n} (log p') for n in by_logp)
  # The curve: the calibrated row scored after 0, 2 and its 4 steps, from its one run. Step 0 is the compressed model
  # it started from (the compressed row, scored alone: its codes are already the calibration's argmin); the last
  # point is the row itself.
  curve = rows['pq-1bit-calibrated']['curve']
  assert [p['step'] for p in curve] == [0, 2, 4] and 'curve' not in rows['pq-1bit-compressed']
  # the calibrated row continued the compressed row's model (demo/rows.continued): step 0 is that model
  assert set(rows['pq-1bit-calibrated']['timings_s']) == {'calibrate', 'evaluate'}
  assert (
    '- pq-1bit-calibrated: continued from the model of row pq-1bit-compressed' in (tmp_path / 'report.md').read_text()
  )
  for key, value in rows['pq-1bit-compressed']['metrics'].items():
    assert curve[0]['metrics'][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
  assert curve[-1]['metrics'] == rows['pq-1bit-calibrated']['metrics']
  assert curve[1]['metrics']['eps_rel_error'] != curve[0]['metrics']['eps_rel_error']
  assert any(line.startswith('Calibration budget (pq-1bit-calibrated') for line in reading)
  for png in ('compare_grid.png', 'compare_plot.png', 'compare_curves.png'):
    assert (tmp_path / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert report['train']['cached'] is False
  assert '- compare: the rows ran 2 at a time (config.compare.workers)' in md
  # A rerun reuses the trained model and classifier (no training) and, with the rows' directories gone (a calibration
  # resumes from its checkpoints there), runs rows again one after another: the same metrics, intervals and curve as
  # two at a time.
  shutil.rmtree(tmp_path / 'rows')
  r = _main(tmp_path, '--config.compare.rows=fp,pq-1bit-compressed,pq-1bit-calibrated', '--config.compare.curve_steps=0,2',
            '--config.compare.workers=1')  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  again = json.loads((tmp_path / 'report.json').read_text())
  assert again['train']['cached'] is True
  assert [row['name'] for row in again['rows']] == ['fp', 'pq-1bit-compressed', 'pq-1bit-calibrated']
  for one in again['rows']:
    row = rows[one['name']]
    assert (one['metrics'], one['ci95']) == (row['metrics'], row['ci95']), row['name']
    assert [p['metrics'] for p in one.get('curve', [])] == [p['metrics'] for p in row.get('curve', [])], row['name']
  assert 'at a time' not in (tmp_path / 'report.md').read_text()


def test_rows_continue_an_earlier_row_with_the_same_config():
  """demo/rows.continued: a row starts from the latest earlier row with its config whose stages it extends; a row
  with other overrides, or without such a row before it, runs its own stages; `after` is taken as given."""
  from configs import digits as digits_config
  from dpq_jax.demo import rows as rows_lib

  config = digits_config.get_config('')
  assert rows_lib.continued(config) == {'pq-1bit-calibrated': ('pq-1bit-compressed', ('calibrate',))}
  config.compare.rows = ('fp', 'pq-1bit-calibrated', 'pq-1bit-compressed', 'pq-1bit-calibrated-assign-weight')
  assert rows_lib.continued(config) == {}  # the compressed row comes after; the last row's calibrate differs
  config.compare.rows = ('pq-1bit-w', 'pq-1bit', 'pq-1bit-compressed-w', 'pq-1bit-calibrated-w')
  assert rows_lib.continued(config) == {'pq-1bit-calibrated-w': ('pq-1bit-compressed-w', ('calibrate',))}
  config.compare.row_defs['pq-1bit-calibrated-w'].stages = ('calibrate',)
  config.compare.row_defs['pq-1bit-calibrated-w'].after = 'pq-1bit-w'
  assert rows_lib.continued(config) == {'pq-1bit-calibrated-w': ('pq-1bit-w', ('calibrate',))}


def test_bad_compare_row_fails_clearly(tmp_path):
  r = _main(tmp_path / 'run', "--config.compare.rows=('fp','pq-3bit')")
  helpers.assert_refused(r, tmp_path / 'run', "config.compare.rows: unknown row 'pq-3bit'")


def test_rows_are_grouped_by_the_row_they_continue():
  """compare._groups: a row that continues another (directly or through a chain) runs after it on its thread; the
  sweep's calibrated rows each join their own uncalibrated row; auto workers is one per core, at most AUTO_WORKERS."""
  from configs import digits as digits_config
  from dpq_jax.demo import rows as rows_lib
  from dpq_jax.demo import sweep
  from dpq_jax.stages import compare

  config = digits_config.get_config('')
  names = list(config.compare.rows)
  groups = compare._groups(names, rows_lib.continued(config))
  assert groups == [[n] for n in names if 'compressed' not in n and 'calibrated' not in n] + [
    ['pq-1bit-compressed', 'pq-1bit-calibrated']
  ]
  chain = {'b': ('a', ('compress',)), 'c': ('b', ('calibrate',)), 'e': ('a', ('calibrate',))}
  assert compare._groups(['a', 'd', 'b', 'c', 'e'], chain) == [['a', 'b', 'c', 'e'], ['d']]
  config, _ = sweep.expand(digits_config.get_config('sweep'))
  groups = compare._groups(list(config.compare.rows), rows_lib.continued(config))
  assert sum(len(g) == 2 for g in groups) == sum(n.endswith('-cal') for n in config.compare.rows) > 0
  assert all(len(g) == 1 or (len(g) == 2 and g[1] == f'{g[0]}-cal') for g in groups), groups
  assert compare.resolve_workers(3) == 3 and 1 <= compare.resolve_workers(0) <= compare.AUTO_WORKERS


def test_parallel_rows_stop_on_a_signal_or_an_error(capsys):
  """compare._run_groups with two workers: a SIGTERM to the process stops the rows before their next stage and exits
  128 + 15 with one line; a row's error stops the other rows and is the one raised."""
  import os
  import signal
  import threading

  from dpq_jax.calibrate import checkpoint as ckpt_lib
  from dpq_jax.stages import compare

  stop = threading.Event()
  started = threading.Barrier(3)

  def run_group(names, row_done):
    started.wait(10)
    if names == ['bad']:
      raise ValueError('row bad failed')
    for _ in names:
      while not stop.wait(0.05):  # a stage that runs until told to stop, then the check before the next one
        pass
      raise compare._Stopped()

  threading.Timer(0.3, lambda: (started.wait(10), os.kill(os.getpid(), signal.SIGTERM))).start()
  with pytest.raises(ckpt_lib.Preempted) as e:
    compare._run_groups(run_group, [['a'], ['b', 'c']], 2, stop, '/w/rows')
  assert e.value.code == 128 + signal.SIGTERM
  assert 'compare: signal 15: the rows stopped before their next stage; the finished ones are in /w/rows' in (
    capsys.readouterr().err
  )
  stop.clear()
  started = threading.Barrier(2)
  with pytest.raises(ValueError, match='row bad failed'):
    compare._run_groups(run_group, [['bad'], ['b']], 2, stop, '/w/rows')
  assert stop.is_set()
