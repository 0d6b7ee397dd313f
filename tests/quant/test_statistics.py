"""Input statistics of the quantized layers (quant/statistics.py): the streamed, sharded second moments equal
one numpy pass over every token; the calibration inputs tile the schedule; the workdir cache; bad values."""

import threading
from concurrent import futures

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import dit_xl_1bit
from dpq_jax.calibrate import sharding
from dpq_jax.quant import layers, statistics, surgery
from dpq_jax.stages import quantize as quantize_stage
from tests import helpers


def _setup():
  model, params = helpers.random_dit('DiT-2x64x2/4', input_size=8)
  rules = surgery.default_rules('pq', 16, 4)
  targets = surgery.subvector_dims(params, rules, 'pq')
  rng = np.random.default_rng(0)
  latents = rng.normal(size=(6, 8, 8, 4)).astype(np.float32)
  labels = rng.integers(0, 10, size=6).astype(np.int32)
  return model, params, targets, latents, labels


def _inputs(model, params, batch, targets):
  """{layer: its inputs [tokens, in_features]} of one forward pass, recorded without jit (the reference)."""
  found = {}

  def record(next_fun, args, kwargs, context):
    name = '/'.join(context.module.path)
    if context.method_name == '__call__' and name in targets:
      found[name] = np.asarray(args[0], np.float64).reshape(-1, args[0].shape[-1])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({'params': params}, batch['x'], batch['t'], batch['y'])
  return found


def test_moments_over_8_devices_and_batches_equal_one_numpy_pass():
  if jax.device_count() < 8:
    return helpers.rerun_with_devices(__file__, 'test_moments_over_8_devices_and_batches_equal_one_numpy_pass')
  model, params, targets, latents, labels = _setup()
  assert len(targets) == 10 and set(targets.values()) == {4}  # 2 blocks x 5 layers
  batches = list(statistics.noisy_batches(latents, labels, 3, 4, 10, seed=1))
  mesh = sharding.make_mesh((('data', -1), ('fsdp', 1)))
  assert mesh.devices.size == 8
  got = statistics.input_moments(model, params, targets, iter(batches), 3, mesh, progress=False, guidance=1.5)
  recorded = [_inputs(model, params, b, targets) for b in batches]

  def with_guided(x):  # [cond rows; null rows] of one batch -> + the guided rows null + 1.5 (cond - null)
    cond, null = np.split(x, 2)
    return np.concatenate([x, null + 1.5 * (cond - null)])

  for name, d in targets.items():
    x = np.concatenate([with_guided(r[name]) for r in recorded])  # [all tokens, in_features]
    xs = x.reshape(x.shape[0], -1, d)
    want = np.einsum('tmd,tme->mde', xs, xs) / x.shape[0]
    np.testing.assert_allclose(got[name], want, rtol=2e-4, atol=1e-6 * np.abs(want).max(), err_msg=name)
  # Deterministic: the same batches on one device give the same moments (up to float32 summation order).
  again = statistics.input_moments(model, params, targets, iter(batches), 3, None, progress=False, guidance=1.5)
  for name in targets:
    np.testing.assert_allclose(again[name], got[name], rtol=1e-4, atol=1e-7)


def test_noisy_batches_tile_the_schedule_with_both_labels():
  _, _, _, latents, labels = _setup()
  batches = list(statistics.noisy_batches(latents, labels, 4, 5, 10, seed=2))
  assert [b['x'].shape for b in batches] == [(10, 8, 8, 4)] * 4
  t = np.concatenate([b['t'][:5] for b in batches])
  strata = np.sort(t * 20 // 1000)  # 20 samples: one timestep in each of 20 equal strata of [0, 1000)
  np.testing.assert_array_equal(strata, np.arange(20))
  for b in batches:
    assert np.all(b['y'][5:] == 10) and np.all(b['y'][:5] < 10)  # labels, then the null label
    np.testing.assert_array_equal(b['x'][:5], b['x'][5:])
    assert len(set(b['t'][:5] * 4 // 1000)) >= 3  # every batch spans the schedule
  # Each latent once before any repeats (6 latents, 20 draws), seeded.
  again = list(statistics.noisy_batches(latents, labels, 4, 5, 10, seed=2))
  np.testing.assert_array_equal(np.concatenate([b['x'] for b in again]), np.concatenate([b['x'] for b in batches]))


def test_moments_are_kept_in_the_workdir_and_recollected_for_other_inputs(tmp_path):
  calls = []

  def collect(value):
    def fn():
      calls.append(value)
      return {'blocks_0/attn/qkv': np.full((2, 4, 4), value, np.float32)}

    return fn

  first = statistics.load_or_collect(str(tmp_path), [{'a': 1}], collect(1.0))
  again = statistics.load_or_collect(str(tmp_path), [{'a': 1}], collect(2.0))
  np.testing.assert_array_equal(again['blocks_0/attn/qkv'], first['blocks_0/attn/qkv'])
  other = statistics.load_or_collect(str(tmp_path), [{'a': 2}], collect(3.0))
  assert calls == [1.0, 3.0] and float(other['blocks_0/attn/qkv'][0, 0, 0]) == 3.0
  # Statistics written for a superset (e.g. with gradients) serve a call that accepts them; the written key is
  # the last one.
  statistics.load_or_collect(str(tmp_path), [{'a': 3, 'g': True}], collect(4.0))
  served = statistics.load_or_collect(str(tmp_path), [{'a': 3, 'g': True}, {'a': 3, 'g': False}], collect(5.0))
  assert calls == [1.0, 3.0, 4.0] and float(served['blocks_0/attn/qkv'][0, 0, 0]) == 4.0
  assert (tmp_path / statistics.STATS_DIR / statistics.MOMENTS_FILE).exists()


def test_shared_statistics_are_collected_once_across_workdirs_and_threads(tmp_path):
  """Within statistics.shared() one key is collected once for every workdir and thread (a second thread waits for
  the first), each workdir still gets its file, and the arrays are read-only; outside it nothing is kept."""
  calls, started, release = [], threading.Event(), threading.Event()

  def collect(value, wait=False):
    def fn():
      calls.append(value)
      started.set()
      if wait:
        release.wait(10)
      return {'blocks_0/attn/qkv': np.full((2, 4, 4), value, np.float32)}

    return fn

  dirs = [str(tmp_path / name) for name in ('a', 'b', 'c', 'd')]
  with statistics.shared():
    with futures.ThreadPoolExecutor(2) as pool:
      first = pool.submit(statistics.load_or_collect, dirs[0], [{'a': 1}], collect(1.0, wait=True))
      assert started.wait(10)
      second = pool.submit(statistics.load_or_collect, dirs[1], [{'a': 1}], collect(2.0))
      release.set()
      got = [first.result(), second.result()]
    # a superset already held serves a call that accepts it; another key is collected
    served = statistics.load_or_collect(dirs[2], [{'a': 0}, {'a': 1}], collect(3.0))
    other = statistics.load_or_collect(dirs[2], [{'a': 2}], collect(4.0))
  assert calls == [1.0, 4.0]
  for stats in got + [served]:
    assert float(stats['blocks_0/attn/qkv'][0, 0, 0]) == 1.0
    assert not stats['blocks_0/attn/qkv'].flags.writeable
  assert float(other['blocks_0/attn/qkv'][0, 0, 0]) == 4.0
  for d in dirs[:3]:  # each workdir has the file a rerun of it alone reads back
    again = statistics.load_or_collect(d, [{'a': 2}, {'a': 1}] if d != dirs[2] else [{'a': 2}], collect(5.0))
    assert float(again['blocks_0/attn/qkv'][0, 0, 0]) == (1.0 if d != dirs[2] else 4.0)
  statistics.load_or_collect(dirs[3], [{'a': 1}], collect(6.0))  # outside shared(): collected again
  assert calls == [1.0, 4.0, 6.0]


@pytest.mark.parametrize(
  'key, value, message',
  [
    ('damping', -0.1, 'config.quant.damping=-0.1: expected >= 0 (a fraction of mean(diag H))'),
    ('stats_batches', 0, "config.quant.stats_batches=0: expected >= 1 for objective 'output'"),
    ('stats_batch_size', 0, "config.quant.stats_batch_size=0: expected >= 1 for objective 'output'"),
    ('objective', 'outputs', "config.quant.objective='outputs': expected one of weight, output"),
    ('scale_rule', 'max', "config.quant.scale_rule='max': expected one of norm, lsq, output_norm"),
    ('feedback_group', 0, None),  # only read with error_feedback
    ('stats_guidance', -1.0, 'config.quant.stats_guidance=-1.0: expected >= 0 (0: no guided inputs)'),
    ('stats_conditions', -1, 'config.quant.stats_conditions=-1: expected >= 0 (0: no conditioning pass)'),
  ],
)
def test_bad_statistics_values_fail_with_one_line(key, value, message):
  config = dit_xl_1bit.get_config('runlocal=1')
  config.quant.objective = 'output'
  config.quant[key] = value
  problems = quantize_stage.check(config)
  assert problems == ([message] if message else []), problems


@pytest.mark.parametrize(
  'quant, message',
  [
    ({'objective': 'weight'}, "config.quant.error_feedback=True: needs objective 'output' (got 'weight')"),
    ({'feedback_group': 0}, 'config.quant.feedback_group=0: expected >= 1 positions'),
    ({'scale_rule': 'lsq'}, "config.quant.error_feedback=True: scale_rule 'lsq' is not supported; expected 'norm' or "
                            "'output_norm'"),
  ],
)  # fmt: skip
def test_bad_error_feedback_values_fail_with_one_line(quant, message):
  config = dit_xl_1bit.get_config('runlocal=1')
  config.quant.update({'objective': 'output', 'error_feedback': True, **quant})
  problems = quantize_stage.check(config)
  assert problems == [message], problems


def test_layer_paths_are_the_quantized_ones():
  _, params, targets, _, _ = _setup()
  rules = surgery.default_rules('rtn', 1, 1)
  assert surgery.subvector_dims(params, rules, 'rtn') == dict.fromkeys(targets, 1)
  assert all(layers.QuantRules(rules.rules).spec_for(name) for name in targets)


def test_output_gradient_energies_equal_per_sample_bias_gradients():
  """For adaLN_modulation (one token per sample) the summed squared gradient of the noise-prediction error
  with respect to its outputs is sum_i (dL_i / d bias)^2: each sample's bias gradient, from plain jax.grad."""

  model, params, targets, latents, labels = _setup()
  batch = next(statistics.noisy_batches(latents, labels, 1, 2, 10, seed=3))
  stats = statistics.input_moments(model, params, targets, iter([batch]), 1, None, progress=False, gradients=True)
  moments, grad2 = statistics.split(stats)
  assert sorted(moments) == sorted(grad2) == sorted(targets)
  name = 'blocks_1/adaLN_modulation'
  want = _bias_grad2(model, params, batch, 'blocks_1')
  np.testing.assert_allclose(grad2[name], want, rtol=1e-3, atol=1e-12 + 1e-6 * want.max())
  assert grad2['blocks_0/mlp/fc2'].shape == (64,) and np.all(grad2['blocks_0/mlp/fc2'] > 0)


def _bias_grad2(model, params, batch, block):
  """sum over samples of (dL_i / d bias)^2 of `block`'s adaLN_modulation, each sample's plain jax.grad (adaLN has
  one token per sample, so this is its summed squared output gradient)."""
  import jax.numpy as jnp

  want = 0.0
  for i in range(batch['x'].shape[0]):
    one = {k: v[i : i + 1] for k, v in batch.items()}

    def loss(p):
      out = model.apply({'params': p}, one['x'], one['t'], one['y'])
      return jnp.sum(jnp.square(out[..., : one['noise'].shape[-1]] - one['noise']))

    want = want + np.square(np.asarray(jax.grad(loss)(params)[block]['adaLN_modulation']['bias'], np.float64))
  return want


@pytest.mark.parametrize('stages, want', [(('load', 'quantize'), 2 * 3), (('load', 'quantize', 'calibrate'), 40)])
def test_data_free_samples_are_what_the_statistics_read_without_calibration(tmp_path, monkeypatch, stages, want):
  """Without a `calibrate` stage the data-free source draws stats_batches x stats_batch_size samples (each costs
  sample_steps forward passes), not config.data.num_samples; with one, the samples calibration trains on."""
  from types import SimpleNamespace

  from dpq_jax.calibrate import data as data_lib
  from dpq_jax.calibrate import source
  from dpq_jax.models import spec as spec_lib

  config = dit_xl_1bit.get_config('runlocal=1')
  config.stages = stages
  config.data.source, config.data.num_samples = 'data_free', 40
  config.quant.stats_batches, config.quant.stats_batch_size = 2, 3
  config.model.scan_blocks = False  # the sampler is a stub: params need only their shapes
  drawn = []

  def sample(model, params, num, steps, seed, batch_size):
    drawn.append(num)
    size = config.model.input_size
    return np.zeros((num, size, size, 4), np.float32), np.zeros((num,), np.int32)

  monkeypatch.setattr(data_lib, 'sample_data_free', sample)
  spec = spec_lib.ModelSpec(config.model.name, config.model.input_size)
  params = jax.eval_shape(lambda: spec.create().init(jax.random.key(0), *_zeros(config)))['params']
  job = SimpleNamespace(spec=spec, fp_params=params, data=None)
  got = source.resolve(source.effective_config(config), str(tmp_path), job)
  assert drawn == [want] and len(got) == want
  again = source.resolve(source.effective_config(config), str(tmp_path), job)  # reused from the workdir
  assert drawn == [want] and len(again) == want


def _zeros(config):
  size = config.model.input_size
  return np.zeros((1, size, size, 4), np.float32), np.zeros((1,), np.int32), np.zeros((1,), np.int32)


def test_scanned_model_gives_the_numpy_moments_and_the_per_sample_gradients():
  """On the scanned DiT (one compiled block, params stacked inside) the moments equal one numpy pass over the
  unrolled model's recorded inputs, and adaLN's gradient energies the per-sample bias gradients; targets that
  differ between blocks run unrolled."""

  model, params, targets, latents, labels = _setup()
  scanned = model.clone(scan_blocks=True)
  assert statistics.scannable(scanned, targets) and not statistics.scannable(model, targets)
  assert not statistics.scannable(scanned, {k: v for k, v in targets.items() if not k.startswith('blocks_1')})
  batch = next(statistics.noisy_batches(latents, labels, 1, 2, 10, seed=3))
  stats = statistics.input_moments(scanned, params, targets, iter([batch]), 1, progress=False, gradients=True)
  moments, grad2 = statistics.split(stats)
  assert sorted(moments) == sorted(grad2) == sorted(targets)
  recorded = _inputs(model, params, batch, targets)
  for name, d in targets.items():
    xs = recorded[name].reshape(recorded[name].shape[0], -1, d)
    want = np.einsum('tmd,tme->mde', xs, xs) / xs.shape[0]
    np.testing.assert_allclose(moments[name], want, rtol=2e-4, atol=1e-6 * np.abs(want).max(), err_msg=name)
  want = _bias_grad2(model, params, batch, 'blocks_1')  # the second block: its slice of the stacked gradients
  np.testing.assert_allclose(grad2['blocks_1/adaLN_modulation'], want, rtol=1e-3, atol=1e-12 + 1e-6 * want.max())


def _output_grad2(model, params, batch, name):
  """sum over tokens of (dL/dy)^2 [out_features] of layer `name`'s output y: plain jax.grad w.r.t. a zero delta of
  y's whole shape added to it (the reference for statistics' per-channel probes)."""
  import jax.numpy as jnp

  shapes = {}

  def add(delta):
    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name != '__call__' or '/'.join(context.module.path) != name:
        return out
      shapes[name] = out.shape
      return out if delta is None else out + delta

    return intercept

  def loss(delta):
    with nn.intercept_methods(add(delta)):
      out = model.apply({'params': params}, batch['x'], batch['t'], batch['y'])
    return jnp.sum(jnp.square(out[..., : batch['noise'].shape[-1]] - batch['noise']))

  loss(None)
  g = np.asarray(jax.grad(loss)(jnp.zeros(shapes[name], jnp.float32)), np.float64)
  return np.sum(np.square(g).reshape(-1, g.shape[-1]), axis=0)


@pytest.mark.parametrize('scan', [False, True])
def test_token_layers_gradient_energies_are_the_summed_squared_output_gradients(scan):
  """Layers fed by image tokens (qkv, fc2): each output channel's squared gradient summed over every token, as a
  zero perturbation of the layer's whole output gives it, scanned (second block's slice) and unrolled."""
  model, params, targets, latents, labels = _setup()
  batch = next(statistics.noisy_batches(latents, labels, 1, 2, 10, seed=3))
  run = model.clone(scan_blocks=True) if scan else model
  _, grad2 = statistics.split(
    statistics.input_moments(run, params, targets, iter([batch]), 1, progress=False, gradients=True)
  )
  for name in ('blocks_1/attn/qkv', 'blocks_0/mlp/fc2'):
    want = _output_grad2(model, params, batch, name)
    np.testing.assert_allclose(grad2[name], want, rtol=1e-3, atol=1e-12 + 1e-6 * want.max(), err_msg=name)


def test_scanned_gradient_statistics_do_not_hold_every_layer_output():
  """The output-gradient energies come from [out_features] probes (statistics._tap): on the scanned model the
  backward pass adds less XLA temporaries than the target layers' outputs stacked over the blocks, where zeros of
  the outputs' shape and their gradients added two such stacks (2.2x here before the probes; 0.5x with them)."""
  import jax.numpy as jnp

  from dpq_jax.models import dit
  from dpq_jax.models import scan as scan_lib

  model = dit.create_model('DiT-4x64x2/2', input_size=16, num_classes=10, scan_blocks=True, remat=True)
  params = dit.init_params(model.clone(scan_blocks=False, remat=False), jax.random.key(0))
  targets = surgery.subvector_dims(params, surgery.default_rules('pq', 16, 4), 'pq')
  rows, tokens = 8, (16 // 2) ** 2
  outputs = 4 * sum(
    rows * (1 if name.endswith('adaLN_modulation') else tokens) * params_out
    for name in targets
    for params_out in [_kernel(params, name).shape[1]]
  )
  x = jnp.zeros((rows, 16, 16, 4), jnp.float32)
  t = jnp.zeros((rows,), jnp.int32)
  stacked = scan_lib.stack_blocks(params, model.depth)

  def temporaries(gradients: bool) -> int:
    fn = jax.jit(statistics._moment_sums(model, targets, gradients, 1.5))
    return fn.lower(stacked, x, t, t, x).compile().memory_analysis().temp_size_in_bytes

  added = temporaries(True) - temporaries(False)
  assert added < outputs, (added, outputs)


def _kernel(params, name):
  node = params
  for key in name.split('/'):
    node = node[key]
  return node['kernel']


def test_conditioning_pass_adds_its_rows_to_the_layers_fed_by_t_and_y_only():
  """stats_conditions: adaLN's moments are one numpy pass over the batches' rows and the conditioning batch's
  (guided rows included); layers fed by image tokens are those of the batches alone."""
  model, params, targets, latents, labels = _setup()
  batch = next(statistics.noisy_batches(latents, labels, 1, 2, 10, seed=3))
  extra = statistics.conditioning_batch(5, latents.shape[1:], 10, seed=4)
  assert sorted(extra['t'][:5]) == list(extra['t'][:5]) and np.all(np.diff(extra['t'][:5] // 200) == 1)  # strata
  assert list(extra['y'][5:]) == [10] * 5 and np.array_equal(extra['t'][:5], extra['t'][5:])
  kw = dict(progress=False, guidance=1.5)
  got = statistics.input_moments(model, params, targets, iter([batch]), 1, conditions=5, seed=4, **kw)
  plain = statistics.input_moments(model, params, targets, iter([batch]), 1, **kw)

  def with_guided(x):
    cond, null = np.split(x, 2)
    return np.concatenate([x, null + 1.5 * (cond - null)])

  rows = [_inputs(model, params, b, targets) for b in (batch, extra)]
  for name in ('blocks_0/adaLN_modulation', 'blocks_1/adaLN_modulation'):
    x = np.concatenate([with_guided(r[name]) for r in rows])
    xs = x.reshape(x.shape[0], -1, targets[name])
    want = np.einsum('tmd,tme->mde', xs, xs) / x.shape[0]
    np.testing.assert_allclose(got[name], want, rtol=2e-4, atol=1e-6 * np.abs(want).max(), err_msg=name)
  np.testing.assert_array_equal(got['blocks_1/attn/qkv'], plain['blocks_1/attn/qkv'])
