"""End to end: `python -m dpq_jax.main` from checkpoint to samples, and its refusals."""

import json
import os

import numpy as np
import pytest
import torch

from tests import helpers

REPORT_KEYS = {
    'model', 'method', 'index_bits_per_weight', 'effective_bits_per_weight', 'bytes', 'fp32_bytes',
    'compression_ratio', 'compression_ratio_model', 'weight_rel_mse', 'layers', 'metrics', 'timings_s',
}  # fmt: skip


def test_random_init_smoke_run(tmp_path):
  """The shipped config named as users type it (`--config=smoke`), and `sample` alone: it implies `load`."""
  r = helpers.run_main(tmp_path, '--config.model.name=DiT-S/8', '--config.model.input_size=16',
                       '--config.sample.steps=2', '--config.sample.num_samples=3',
                       '--config.sample.batch_size=2', '--config.stages=sample', config='smoke')  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads((tmp_path / 'report.json').read_text())
  assert REPORT_KEYS <= set(report)
  assert report['stages'] == ['load', 'sample'] and report['config_name'] == 'smoke'
  assert report['model'] == 'DiT-S/8' and report['method'] == 'fp'
  assert report['bytes']['total'] == report['fp32_bytes'] == 4 * report['num_params']
  assert set(report['timings_s']) == {'load', 'sample'}
  with np.load(tmp_path / 'samples' / 'latents.npz') as f:
    assert f['arr_0'].shape == (3, 16, 16, 4) and f['arr_1'].shape == (3,)
    assert np.isfinite(f['arr_0']).all() and f['arr_0'].std() > 0
  assert (tmp_path / 'samples_grid.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert '## Samples' in (tmp_path / 'report.md').read_text()


def test_checkpoint_to_samples_and_batch_independence(tmp_path, torch_dit):
  """A converted checkpoint samples end to end; samples do not depend on the batch size."""
  _, state = torch_dit
  pt = tmp_path / 'dit.pt'
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pt)
  outs = []
  for batch in (4, 3):
    workdir = tmp_path / f'run{batch}'
    r = helpers.run_main(workdir, '--config.model.init=checkpoint', f'--config.model.checkpoint={pt}',
                         '--config.model.name=', '--config.model.input_size=8', '--config.sample.steps=3',
                         '--config.sample.num_samples=4', f'--config.sample.batch_size={batch}',
                         '--config.sample.labels=1,9')  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((workdir / 'report.json').read_text())['model'] == 'DiT-S/2'
    with np.load(workdir / 'samples' / 'latents.npz') as f:
      outs.append(f['arr_0'])
  # Equal up to float32 summation order (matmul blocking differs with the batch size).
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  'given,want',
  [
    (('load,quantize',), ('load', 'quantize')),
    (('quantize, compress',), ('load', 'quantize', 'compress')),
    (('sample', 'evaluate'), ('load', 'sample', 'evaluate')),
    (('evaluate',), ('evaluate',)),  # scoring an existing batch needs no model
    (('train', 'compare'), ('train', 'compare')),
    (('load', 'nope'), ('load', 'nope')),  # refused by the checks, named
  ],
)
def test_stage_lists(given, want):
  from configs import smoke
  from dpq_jax import pipeline

  config = smoke.get_config()
  config.stages = given
  assert pipeline.with_stages(config).stages == want
  assert config.stages == given  # the caller's config is left as it was


def _parsed_config(*overrides: str):
  """The config `python -m dpq_jax.main --config=smoke OVERRIDES...` runs, parsed as main parses it (in-process)."""
  from absl import flags
  from ml_collections import config_flags

  from dpq_jax import main

  argv = main.shipped_config(['main', '--config=smoke', *overrides])
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return holder.value


@pytest.mark.parametrize(
  'text,want',
  [
    ('fp,vq-1bit,pq-1bit-compressed', ('fp', 'vq-1bit', 'pq-1bit-compressed')),  # not Python: split as typed
    ('fp, vq', ('fp', 'vq')),  # Python names, not literals: ml_collections alone gives ('fp, vq',)
    ('1,2.5', (1, 2.5)),  # literal items keep their type
    ("('fp','vq-1bit')", ('fp', 'vq-1bit')),  # ml_collections' literal syntax, unchanged
    ("'a,b'", ('a,b',)),  # quoted: one item
    ('fp', ('fp',)),
  ],
)
def test_tuple_fields_take_comma_lists(text, want):
  assert _parsed_config(f'--config.compare.rows={text}').compare.rows == want
  assert _parsed_config(f'--config.stages={text}').stages == want


def test_comma_list_tuple_and_implied_load_write_the_same_report(tmp_path):
  """`--config.stages=load,quantize`, the tuple syntax and `quantize` alone run the same job: equal report.json
  (times aside), whose `stages` lists what ran."""
  from dpq_jax import pipeline

  tiny = helpers.tiny_pipeline_config()
  keys = [f'--config.{k}={v}' for k, v in (('model.name', tiny.model.name), ('model.input_size', 8),
          ('model.num_classes', 10), ('quant.k', 16), ('quant.d', 4), ('quant.kmeans_iters', 4),
          ('quant.pattern', tiny.quant.pattern))]  # fmt: skip
  reports = []
  for stages in ('load,quantize', "('load','quantize')", 'quantize'):
    workdir = tmp_path / str(len(reports))
    pipeline.run(_parsed_config(*keys, f'--config.stages={stages}'), str(workdir))
    report = json.loads((workdir / 'report.json').read_text())
    reports.append({k: v for k, v in report.items() if k != 'timings_s' and not k.endswith('seconds')})
    assert list(report['timings_s']) == ['load', 'quantize']
  assert reports[0]['stages'] == ['load', 'quantize'] and reports[0]['method'] == 'pq-k16-d4'
  assert reports[0] == reports[1] == reports[2]


def test_shipped_configs_by_name(tmp_path, monkeypatch):
  from dpq_jax import configs, main

  monkeypatch.chdir(tmp_path)  # no configs/ here
  shipped = os.path.join(helpers.ROOT, 'dpq_jax', 'configs', 'dit_xl_1bit.py')
  assert main.shipped_config(['m', '--config=dit_xl_1bit:smoke', '--config.seed=1']) == [
    'm', f'--config={shipped}:smoke', '--config.seed=1']  # fmt: skip
  assert main.shipped_config(['m', '--config', 'dit_xl_1bit.py']) == ['m', '--config', shipped]
  assert main.shipped_config(['m', '--config=configs/dit_xl_1bit.py:runlocal']) == ['m', f'--config={shipped}:runlocal']
  (tmp_path / 'dit_xl_1bit.py').write_text('')  # a path that exists wins
  assert main.shipped_config(['m', '--config=dit_xl_1bit.py']) == ['m', '--config=dit_xl_1bit.py']
  assert main.shipped_config(['m', '--config=/elsewhere/x.py']) == ['m', '--config=/elsewhere/x.py']  # absl names it
  assert configs.names() == ['digits', 'dit_xl_1bit', 'dit_xl_2bit', 'dit_xl_eval', 'smoke']
  with pytest.raises(ValueError, match=r"no shipped config 'nosuch'; shipped: digits, dit_xl_1bit, .*smoke"):
    main.shipped_config(['m', '--config=nosuch:smoke'])


def test_checkout_configs_are_the_shipped_ones():
  """configs/NAME.py (the checkout's paths) re-export the package's configs: one config, two paths."""
  import importlib

  from dpq_jax import configs

  for name in configs.names():
    assert importlib.import_module(f'configs.{name}').get_config is importlib.import_module(
      f'dpq_jax.configs.{name}').get_config  # fmt: skip


def test_help_lists_stages_and_configs(tmp_path):
  r = helpers.run_python('-m', 'dpq_jax.main', '--helpshort')  # absl exits 1 after help
  for word in ('load', 'quantize', 'compress', 'calibrate', 'sample', 'evaluate', 'compare', 'train',
               'dit_xl_1bit', 'digits', 'smoke', 'README.md', '--workdir'):  # fmt: skip
    assert word in r.stdout, word
  r = helpers.run_main(tmp_path / 'w', config='nosuch')
  helpers.assert_refused(r, tmp_path / 'w', 'shipped: digits, dit_xl_1bit')


@pytest.mark.parametrize(
  'override,message',
  [
    ('--config.model.name=DiT-Q/2', "config.model.name='DiT-Q/2'"),
    ('--config.sample.steps=0', 'config.sample.steps=0'),
    ("--config.stages=('load','nope')", "unknown stage 'nope'"),
    ('--config.model.init=checkpoint', 'config.model.checkpoint is empty'),
    ('--config.sample.labels=5000', "config.sample.labels='5000'"),
  ],
)
def test_bad_config_fails_before_writing(tmp_path, override, message):
  workdir = tmp_path / 'w'
  r = helpers.run_main(workdir, override)
  helpers.assert_refused(r, workdir, message)


def test_unreadable_checkpoint_is_one_line(tmp_path):
  bad = tmp_path / 'bad.pt'
  bad.write_bytes(b'not a checkpoint')
  workdir = tmp_path / 'w'
  r = helpers.run_main(workdir, '--config.model.init=checkpoint', f'--config.model.checkpoint={bad}')
  errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert r.returncode == 2 and len(errors) == 1 and 'not a PyTorch zip archive' in errors[0], r.stderr
  assert 'Traceback' not in r.stderr
  assert not workdir.exists()


def test_failed_run_keeps_previous_report(tmp_path):
  (tmp_path / 'report.json').write_text('{"good": 1}')
  r = helpers.run_main(tmp_path, '--config.sample.cfg_scale=0.5')
  assert r.returncode == 2 and 'cfg_scale=0.5' in r.stderr
  assert (tmp_path / 'report.json').read_text() == '{"good": 1}'
