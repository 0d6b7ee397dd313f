"""The stage layer: every shipped config passes the registry's checks without writing anything, and each
stage's `run` needs nothing but its inputs in a Job built by hand (sample: tests/test_sampler.py, calibrate
on a hand-made quantized model: tests/test_calibrate.py)."""

import builtins
import copy
import dataclasses
import importlib
import json
import os

import jax
import numpy as np
import pytest

from configs import digits as digits_config
from dpq_jax import pipeline, tree_utils
from dpq_jax.demo import classifier, digits
from dpq_jax.demo import train as train_lib
from dpq_jax.models import dit, scan
from dpq_jax.models import load as load_lib
from dpq_jax.quant import feedback, metric, pq, storage, surgery
from dpq_jax.stages import REGISTRY, Job, QuantizedModel

# (config file, argument, problems expected because the job needs files only its user has)
SHIPPED = [
  ('digits', None, ()),
  ('digits', 'full', ()),
  ('digits', 'tiny', ()),
  ('digits', 'sweep', ()),
  ('digits', 'tiny,sweep', ()),
  ('smoke', None, ()),
  ('dit_xl_1bit', 'runlocal', ()),
  ('dit_xl_1bit', 'smoke', ()),
  ('dit_xl_1bit', 'method=rtn,smoke', ()),
  ('dit_xl_2bit', 'method=vq,smoke', ()),
  ('dit_xl_1bit', None, ('config.model.checkpoint is empty', "config.data.data_dir=''", "config.vae.checkpoint=''")),
  ('dit_xl_2bit', None, ('config.model.checkpoint is empty', "config.data.data_dir=''", "config.vae.checkpoint=''")),
  ('dit_xl_eval', None, ('config.model.checkpoint is empty', 'config.evaluate')),
  ('dit_xl_eval', 'evaluate_only', ('config.evaluate',)),
]


@pytest.mark.parametrize('name,arg,needs', SHIPPED)
def test_every_shipped_config_passes_the_checks_without_writing(name, arg, needs, monkeypatch, tmp_path):
  config = importlib.import_module(f'configs.{name}').get_config(arg)
  assert set(config.stages) <= set(REGISTRY)
  real_open, writes = builtins.open, []
  real_os = {fn: getattr(os, fn) for fn in ('makedirs', 'mkdir', 'replace', 'rename', 'remove')}
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR') or '\0'  # the test session's XLA cache (conftest) may be written

  def read_only_open(file, mode='r', *args, **kwargs):
    if any(c in mode for c in 'wax+') and not str(file).startswith(cache):
      writes.append(file)
      raise AssertionError(f'check wrote {file}')
    return real_open(file, mode, *args, **kwargs)

  def refused(fn):
    def call(*a, **k):
      if a and str(a[0]).startswith(cache):
        return real_os[fn](*a, **k)
      writes.append((fn, a))

    return call

  monkeypatch.setattr(builtins, 'open', read_only_open)
  for fn in real_os:
    monkeypatch.setattr(os, fn, refused(fn))
  monkeypatch.chdir(tmp_path)
  problems = []
  try:
    pipeline.check_config(config)
  except pipeline.ConfigError as e:
    problems = str(e).splitlines()
  assert writes == []
  unexpected = [p for p in problems if not any(p.startswith(n) or n in p for n in needs)]
  assert unexpected == [], unexpected
  if not needs:
    assert problems == []
  for stage in config.stages:  # each stage checks alone what the pipeline gathered
    assert all(p in problems for p in REGISTRY[stage].check(config))


def _tiny(**quant):
  """The demo's tiny config with the data-blind quantizers (no statistics pass: the job needs no data), unless
  `quant` says otherwise."""
  config = digits_config.get_config('tiny')
  config.quant.update(method='pq', k=16, d=4, kmeans_iters=2, objective='weight', rtn_clip='minmax',
                      error_feedback=False, scale_rule='norm')  # fmt: skip
  config.compress.distortion = 'relative'
  config.quant.update(quant)
  spec = train_lib.spec_of(config)
  params = dit.init_params(spec.create(), jax.random.key(0))
  params = load_lib.randomize_zero_init(params, jax.random.key(1))
  return config, spec, params


def _report(params):
  return Job.start(_tiny()[0]).report | {'num_params': load_lib.param_count(params)}


def test_load_makes_the_fp_model():
  config = digits_config.get_config('tiny')
  config.stages = ('load',)
  job = REGISTRY['load'].run(config, '', Job.start(config))
  assert job.spec.name == config.model.name and job.quantized is None
  assert job.report['num_params'] == load_lib.param_count(job.fp_params) and job.report['method'] == 'fp'
  module, variables = job.runtime(config)  # config.model.scan_blocks: the blocks stacked under 'blocks'
  assert module.depth == 1 and module.scan_blocks and 'blocks' in variables['params']
  jax.tree.map(np.testing.assert_array_equal, scan.unstack_blocks(variables), {'params': job.fp_params})


def test_train_makes_model_data_and_classifier(tmp_path):
  config = digits_config.get_config('tiny')
  config.train.update(steps=2, warmup_steps=1, classifier_steps=2)
  job = REGISTRY['train'].run(config, str(tmp_path), Job.start(config))
  assert job.spec.in_channels == 1 and job.data['train_images'].shape[1:] == (8, 8, 1)
  assert set(job.classifier) and job.report['train']['cached'] is False
  again = REGISTRY['train'].run(config, str(tmp_path), Job.start(config))
  assert again.report['train']['cached'] is True
  jax.tree.map(np.testing.assert_array_equal, again.fp_params, jax.tree.map(np.asarray, job.fp_params))


def test_quantize_needs_only_the_fp_model(tmp_path):
  config, spec, params = _tiny()
  job = REGISTRY['quantize'].run(config, str(tmp_path), Job(report=_report(params), spec=spec, fp_params=params))
  q = job.quantized
  assert q.meta['name'] == spec.name and q.meta['lineage'] is None and job.report['method'] == 'pq-k16-d4'
  meta, back = storage.load(str(tmp_path / storage.ARTIFACT_DIR))
  assert meta == q.meta  # the job holds what index.json holds: nothing re-reads it
  jax.tree.map(np.testing.assert_array_equal, back.pq, jax.tree.map(np.asarray, q.weights.pq))
  assert 'kernel' not in q.weights.fp['blocks_0']['mlp']['fc1']  # no float kernel beside its codes
  _, variables = job.runtime(config)  # dequantize='load' (the demo's setting): kernels decoded once
  variables = scan.unstack_blocks(variables)  # config.model.scan_blocks: the runtime's blocks are stacked
  assert set(variables) == {'params'} and 'kernel' in variables['params']['blocks_0']['mlp']['fc1']
  config.quant.dequantize = 'on_the_fly'
  _, variables = job.runtime(config)  # PQDense: codebooks in params, codes in their own collection
  assert set(variables) == {'params', 'quant'} and 'codebooks' in variables['params']['blocks']['mlp']['fc1']
  assert variables['quant']['blocks']['mlp']['fc1']['codes'].shape[0] == spec.create().depth  # stacked per block


def test_quantize_rtn_clip_from_config(tmp_path):
  reports = {}
  for clip in ('minmax', 'mse'):
    config, spec, params = _tiny(method='rtn', bits=1, rtn_clip=clip)
    job = Job(report=_report(params), spec=spec, fp_params=params)
    reports[clip] = REGISTRY['quantize'].run(config, str(tmp_path / clip), job).report
  assert reports['minmax']['method'] == 'rtn-1bit' and reports['mse']['method'] == 'rtn-1bit-mse'
  assert reports['mse']['weight_rel_mse'] < reports['minmax']['weight_rel_mse']
  assert reports['mse']['bytes'] == reports['minmax']['bytes']  # same codes, scales and offsets stored


@pytest.mark.parametrize('order', ['importance', 'cost'])
def test_compress_needs_only_the_quantized_model(tmp_path, order):
  config, spec, params = _tiny()  # K=16, d=4 as the quantize test: its k-means compilations are reused
  config.compress.budget = 12.0
  config.compress.order = order
  rules = surgery.default_rules('pq', 16, 4, pattern=config.quant.pattern)
  q = surgery.quantize_params(params, rules, jax.random.key(0), iters=2, progress=False)
  job = Job(report=_report(params), spec=spec, fp_params=params, quantized=QuantizedModel(q, rules, {'name': 'x'}))
  job = REGISTRY['compress'].run(config, str(tmp_path), job)
  assert job.quantized.meta['name'] == 'x' and job.quantized.meta['compress']['order'] == order
  assert job.report['compress']['order'] == order
  assert job.report['compress']['measured_bytes'] <= job.report['compress']['target_bytes']
  assert storage.load_meta(str(tmp_path / storage.ARTIFACT_DIR)) == job.quantized.meta


def test_output_objective_collects_statistics_once_for_quantize_and_compress(tmp_path, monkeypatch):
  from dpq_jax.quant import metric, statistics

  config, spec, params = _tiny(objective='output', stats_batches=2, stats_batch_size=4)
  config.compress.update(budget=12.0, distortion='loss')
  config.stages = ('quantize', 'compress')  # quantize collects the output gradients compress will weigh by
  rng = np.random.default_rng(0)
  data = {'train_images': rng.normal(size=(8, 8, 8, spec.in_channels)).astype(np.float32),
          'train_labels': rng.integers(0, 10, 8).astype(np.int32)}  # fmt: skip
  assert REGISTRY['quantize'].check(config) == []
  job = REGISTRY['quantize'].run(
    config, str(tmp_path), Job(report=_report(params), spec=spec, fp_params=params, data=data)
  )
  assert (tmp_path / statistics.STATS_DIR / statistics.MOMENTS_FILE).exists()
  names = sorted(job.quantized.weights.pq)
  assert sorted(job.moments) == names and job.report['stats_seconds'] > 0
  assert all(job.moments[n].shape[1:] == (4, 4) for n in names)
  assert all('rel_out_err' in row for row in job.report['layers'])
  # Lower output error than the weight objective's codes, measured in the same moments.
  weight_cfg = _tiny()[0].quant
  plain = surgery.quantize_params(params, job.quantized.rules, jax.random.key(weight_cfg.seed), iters=2,
                                  channel_scale=True, progress=False)  # fmt: skip
  blind = np.mean(
    [
      metric.rel_error(tree_utils.get_path(params, n.split('/') + ['kernel']), plain.pq[n].decode(), job.moments[n])
      for n in names
    ]
  )
  assert job.report['output_rel_err'] < blind, (job.report['output_rel_err'], blind)

  # A rerun and the compress stage read DIR/stats instead of running the model again.
  monkeypatch.setattr(statistics, 'input_moments', lambda *a, **k: pytest.fail('statistics collected twice'))
  again = REGISTRY['quantize'].run(
    config, str(tmp_path), Job(report=_report(params), spec=spec, fp_params=params, data=data)
  )
  jax.tree.map(np.testing.assert_array_equal, again.moments, job.moments)
  job.moments = None
  job = REGISTRY['compress'].run(config, str(tmp_path), job)
  assert all('rel_out_err' in row for row in job.report['layers']) and job.report['compress']['distortion'] == 'loss'
  assert sorted(job.grad2) == names and all(np.all(job.grad2[n] >= 0) for n in names)
  assert job.report['compress']['measured_bytes'] <= job.report['compress']['target_bytes']


def test_error_feedback_quantizes_and_compresses_with_the_full_input_moments(tmp_path):
  """quant.error_feedback: statistics of each layer's full H [in, in] (its diagonal blocks the per-position
  moments), PQ fitted with feedback across positions, compression refitting the survivors the same way; both
  leave less output error with every cross term than the per-position objective."""
  jobs = {}
  for on in (False, True):
    config, spec, params = _tiny(objective='output', stats_batches=2, stats_batch_size=4, error_feedback=on,
                                 scale_rule='output_norm')  # fmt: skip
    rng = np.random.default_rng(0)
    data = {'train_images': rng.normal(size=(8, 8, 8, spec.in_channels)).astype(np.float32),
            'train_labels': rng.integers(0, 10, 8).astype(np.int32)}  # fmt: skip
    config.compress.update(budget=12.0, distortion='loss')
    config.stages = ('quantize', 'compress')
    assert REGISTRY['quantize'].check(config) == []
    job = Job(report=_report(params), spec=spec, fp_params=params, data=data)
    job = REGISTRY['quantize'].run(config, str(tmp_path / str(on)), job)
    jobs[on] = job
    if on:
      names = sorted(job.quantized.weights.pq)
      assert sorted(job.hessians) == names
      for n in names:
        in_f = tree_utils.get_path(params, n.split('/') + ['kernel']).shape[0]
        assert job.hessians[n].shape == (in_f, in_f) and job.moments[n].shape == (in_f // 4, 4, 4)
    else:
      assert job.hessians is None
  full = {}
  for on, job in jobs.items():
    full[on] = []
    for n, w in job.quantized.weights.pq.items():
      kernel = tree_utils.get_path(params, n.split('/') + ['kernel'])
      full[on].append(feedback.rel_error(kernel, w.decode(), jobs[True].hessians[n]))
  assert np.mean(full[True]) < np.mean(full[False]), full
  assert [r['rel_out_err_full'] for r in jobs[True].report['layers']] == pytest.approx(full[True], rel=1e-4)
  config.stages = ('quantize', 'compress')
  job = REGISTRY['compress'].run(config, str(tmp_path / 'True'), jobs[True])
  assert all('rel_out_err_full' in row for row in job.report['layers'])
  assert job.report['compress']['measured_bytes'] <= job.report['compress']['target_bytes']
  assert all(np.asarray(w.alive).any(axis=1).all() for w in job.quantized.weights.pq.values())


def test_calibration_assigns_against_the_fed_back_targets(tmp_path):
  """calibrate.assign_target='feedback' after quantize and compress with error feedback: the first dynamic
  assignment keeps every code feedback chose ('weight', from the same compressed model, re-picks some: the nearest
  codeword of W / s per position), and the artifact's final codes are the nearest live codewords, in each
  position's conditional metric, of the fed-back targets of the starting codebooks (feedback.assignment_targets,
  tested against a numpy reference) over the final scale."""
  config, spec, params = _tiny(objective='output', stats_batches=2, stats_batch_size=4, error_feedback=True,
                               scale_rule='output_norm')  # fmt: skip
  rng = np.random.default_rng(0)
  data = {'train_images': rng.normal(size=(8, 8, 8, spec.in_channels)).astype(np.float32),
          'train_labels': rng.integers(0, 10, 8).astype(np.int32)}  # fmt: skip
  config.compress.update(budget=12.0)
  config.calibrate.update(steps=2, batch_size=4, lr=3e-2, warmup=0, log_every=1)
  config.stages = ('quantize', 'compress', 'calibrate')
  job = Job(report=_report(params), spec=spec, fp_params=params, data=data)
  for stage in config.stages[:2]:
    job = REGISTRY[stage].run(config, str(tmp_path), job)
  start = job.quantized.weights
  first, done = {}, {}
  for target in ('weight', 'feedback'):
    config.calibrate.assign_target = target
    assert REGISTRY['calibrate'].check(config) == []
    workdir = tmp_path / target
    workdir.mkdir()
    row = dataclasses.replace(job, report=copy.deepcopy(job.report), notes=[])
    done[target] = REGISTRY['calibrate'].run(config, str(workdir), row)
    first[target] = json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[0])['changed']
  assert first['weight'] > 0 and first['feedback'] == 0, first
  assert any('keep 100.00% of the codes' in note for note in done['feedback'].notes), done['feedback'].notes
  for name, w in done['feedback'].quantized.weights.pq.items():
    kernel = tree_utils.get_path(params, name.split('/') + ['kernel'])
    s0, books0 = np.asarray(start.pq[name].scale), start.pq[name].codebooks
    _, targets, factors = feedback.assignment_targets(kernel, job.hessians[name], books0, start.pq[name].alive,
                                                      damping=config.quant.damping)  # fmt: skip
    latent = np.asarray(targets) * s0 / np.asarray(w.scale)
    want = metric.assign(pq.to_subvectors(latent, 4), w.codebooks, factors, w.alive)
    np.testing.assert_array_equal(np.asarray(w.codes), np.asarray(want))


def test_evaluate_scores_the_batch_the_job_names(tmp_path, monkeypatch):
  from dpq_jax.evaluate import scoring

  seen = []
  metrics = {k: 1.0 for k in scoring.METRICS}
  monkeypatch.setattr(scoring, 'evaluate', lambda cfg, path, cache, devices: seen.append(path) or (metrics, {}, []))
  config = digits_config.get_config('tiny')
  job = REGISTRY['evaluate'].run(config, str(tmp_path), Job(report={'metrics': {}}, samples='/x/samples.npz'))
  assert seen == ['/x/samples.npz'] and job.report['metrics'] == metrics
  REGISTRY['evaluate'].run(config, str(tmp_path), Job(report={'metrics': {}}))  # an earlier run's batch
  assert seen[-1] == os.path.join(str(tmp_path), 'samples.npz')


def test_compare_needs_only_model_data_and_classifier(tmp_path):
  config, spec, params = _tiny()
  config.compare.rows = ('fp', 'rtn-1bit')
  config.compare.num_samples = 4
  data = digits.load(config.train.heldout_per_class, config.seed)
  clf = classifier.train(data['train_images'], data['train_labels'], 2, 0)
  job = Job(report=_report(params), spec=spec, fp_params=params, data=data, classifier=clf)
  job = REGISTRY['compare'].run(config, str(tmp_path), job)
  rows = {r['name']: r for r in job.report['rows']}
  assert list(rows) == ['fp', 'rtn-1bit'] and rows['rtn-1bit']['method'] == 'rtn-1bit'
  assert rows['fp']['metrics']['eps_rel_error'] == 0.0 and rows['rtn-1bit']['metrics']['eps_rel_error'] > 0
  assert job.quantized is None  # rows never hand their models back to the job
  assert (tmp_path / 'compare_grid.png').exists() and (tmp_path / 'rows' / 'rtn-1bit' / 'quantized').is_dir()
