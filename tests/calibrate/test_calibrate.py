"""Calibration train step: gradients against a dense-model reference, loss decrease, config errors.

The tiny quantized DiT and its step builder are in tiny.py (shared with the other calibrate/ tests and their
subprocess workers).
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpq_jax import diffusion as diffusion_lib
from dpq_jax import pipeline
from dpq_jax.calibrate import trainable as trainable_lib
from dpq_jax.quant import pq
from tests import helpers
from tests.calibrate.tiny import TinySpec, build, calib_config, dense_step_reference, runlocal, tiny_data, tiny_setup


def test_trainable_sets_and_their_errors():
  codebooks, biases = trainable_lib.trainable_patterns('codebooks,biases')
  assert biases == r'.*/bias'
  # 'codebooks': a quantized layer's codewords and its per-output-channel scale, nothing else.
  for path, want in (('blocks_0/attn/qkv/codebooks', True), ('blocks_0/attn/qkv/scale', True),
                     ('blocks_0/attn/qkv/bias', False), ('blocks_0/attn/qkv/latent', False)):  # fmt: skip
    assert bool(re.fullmatch(codebooks, path)) == want, path
  assert trainable_lib.trainable_patterns('blocks_0/.*/bias') == ['blocks_0/.*/bias']
  with pytest.raises(ValueError, match="unknown trainable set 'norms'"):
    trainable_lib.trainable_patterns('codebooks,norms')
  with pytest.raises(ValueError, match='not a valid regex'):
    trainable_lib.trainable_patterns('blocks_(/x')
  _, _, _, q = tiny_setup()
  with pytest.raises(ValueError, match='match no floating parameter'):
    trainable_lib.split_trainable(q.variables()['params'], ['nothing/.*'])


def test_codebook_gradient_is_the_scatter_sum_of_the_dense_kernel_gradient():
  """SGD(lr=1) moves each codeword by minus the sum of the dense-weight gradients of the
  sub-vectors assigned to it (computed on the plain DiT with the decoded kernels), and
  nothing outside the trainable set moves."""
  setup = tiny_setup()
  fp, rules, params, q = setup
  cfg = calib_config(optimizer='sgd', lr=1.0, b1=0.0, label_dropout=0.5)
  jstep, state, frozen, _ = build(cfg, setup)
  before = jax.device_get(state)
  x, y = tiny_data(8)
  after, metrics = jstep(state, frozen, {'latents': x, 'labels': y})
  after = jax.device_get(after)

  # The reference: the same randomness, the plain DiT on decoded weights, jax.grad w.r.t. kernels.
  rng = jax.random.fold_in(jax.random.wrap_key_data(before['rng']), 0)
  ref_loss, g = dense_step_reference(rng, x, y, label_dropout=0.5)
  np.testing.assert_allclose(float(metrics['loss']), float(ref_loss), rtol=1e-5)
  checked = 0
  for path, codes in jax.tree_util.tree_leaves_with_path(q.variables()['quant']):
    keys = [p.key for p in path[:-1]]
    codes = np.asarray(codes)  # [M, out]
    node_g, node_b, node_a = g, before['params'], after['params']
    for k in keys:
      node_g, node_b, node_a = node_g[k], node_b[k], node_a[k]
    sub = np.asarray(pq.to_subvectors(node_g['kernel'], 4))  # [M, out, d]
    want = np.zeros_like(node_b['codebooks'])  # [M, K, d]
    for m in range(sub.shape[0]):
      np.add.at(want[m], codes[m], sub[m])
    np.testing.assert_allclose(node_b['codebooks'] - node_a['codebooks'], want, rtol=2e-3, atol=1e-7)
    checked += 1
  assert checked == 10  # 5 quantized layers x 2 blocks
  # Only codebooks were trainable: the optimizer state and the state's params hold nothing else.
  names = {str(p[-1].key) for p, _ in jax.tree_util.tree_leaves_with_path(after['params'])}
  assert names == {'codebooks'}
  codebook_shapes = {x.shape for x in jax.tree.leaves(after['params'])}
  assert {x.shape for x in jax.tree.leaves(after['opt_state']) if x.ndim} <= codebook_shapes
  # The frozen tree (biases, embedders, final layer, latent weights) is untouched and was not donated.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen['params']), trainable_lib.split(
    q.variables()['params'], lambda path, _: not path.endswith('codebooks'))[0])  # fmt: skip


def test_codes_follow_the_codebooks_and_assign_every():
  """Step 0 starts from the quantize stage's codes (argmin of the latent weight), so no code
  changes; afterwards codes are the argmin of the updated codebooks, and with assign_every=2
  odd steps keep the codes fixed."""
  setup = tiny_setup()
  x, y = tiny_data(8)
  batch = {'latents': x, 'labels': y}
  jstep, state, frozen, _ = build(calib_config(lr=3e-2, assign_every=2), setup)
  changed = []
  for _ in range(4):
    quant_before = jax.device_get(state['quant'])
    params_before = jax.device_get(state['params'])
    state, m = jstep(state, frozen, batch)
    changed.append(float(m['changed']))
    if int(state['step']) % 2 == 1:  # step index 0, 2: recomputed against the codebooks of that step
      fp_params = setup[2]
      for blk in ('blocks_0', 'blocks_1'):
        cb = params_before[blk]['mlp']['fc1']['codebooks']
        want = pq.encode(fp_params[blk]['mlp']['fc1']['kernel'], cb, pq.CodebookSpec(16, 4))
        np.testing.assert_array_equal(jax.device_get(state['quant'])[blk]['mlp']['fc1']['codes'], want)
    else:
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['quant']), quant_before)
  assert changed[0] == 0.0 and changed[1] == 0.0 and changed[3] == 0.0
  assert changed[2] > 0.0


def _eval_loss(frz, params, quant, x, y, seed=123, n=64):
  """Mean DDPM loss over n fixed (t, noise) draws per example: the 'small fixed problem'."""
  diffusion = diffusion_lib.create_diffusion()
  key = jax.random.key(seed)
  xs = jnp.tile(jnp.asarray(x), (n, 1, 1, 1))
  ys = jnp.tile(jnp.asarray(y), (n,))
  t = jax.random.randint(jax.random.fold_in(key, 0), (xs.shape[0],), 0, diffusion.num_timesteps)
  noise = jax.random.normal(jax.random.fold_in(key, 1), xs.shape)
  terms = diffusion.training_losses(frz.apply, {'params': params, 'quant': quant}, xs, t, noise=noise,
                                    model_kwargs={'y': ys})  # fmt: skip
  return float(jnp.mean(terms['loss']))


def test_loss_decreases_on_a_small_fixed_problem():
  setup = tiny_setup()
  _, _, _, q = setup
  x, y = tiny_data(16)
  jstep, state, frozen, (_, _, frz) = build(calib_config(lr=3e-2, label_dropout=0.0), setup)
  before = _eval_loss(frz, q.variables()['params'], q.variables()['quant'], x, y)
  losses = []
  for _ in range(60):
    state, m = jstep(state, frozen, {'latents': x, 'labels': y})
    losses.append(float(m['loss']))
  params = trainable_lib.merge(jax.device_get(state['params']), jax.device_get(frozen['params']))
  after = _eval_loss(frz, params, jax.device_get(state['quant']), x, y)
  assert np.isfinite(losses).all()
  assert after < 0.95 * before, (before, after)  # measured: 1.334 -> 1.224
  assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_optimizer_from_config_matches_optax():
  cfg = calib_config(optimizer='adamw', lr=1e-2, weight_decay=0.1, clip=0.5, schedule='cosine', warmup=3, steps=10)
  tx = trainable_lib.optimizer(cfg)
  sched = optax.join_schedules([optax.linear_schedule(0.0, 1e-2, 3), optax.cosine_decay_schedule(1e-2, 7)], [3])
  ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(sched, weight_decay=0.1))
  p = {'w': jnp.arange(6.0).reshape(2, 3)}
  s1, s2 = tx.init(p), ref.init(p)
  for i in range(5):
    g = {'w': jnp.sin(p['w'] + i)}
    u1, s1 = tx.update(g, s1, p)
    u2, s2 = ref.update(g, s2, p)
    np.testing.assert_allclose(u1['w'], u2['w'], rtol=1e-6)
  assert float(trainable_lib.learning_rate(cfg)(3)) == pytest.approx(1e-2)


@pytest.mark.parametrize(
  'overrides,message',
  [
    ({'calibrate.trainable': 'codebooks,norms'}, "unknown trainable set 'norms'"),
    (
      {
        'calibrate.batch_size': 3,
        'model.init': 'checkpoint',
        'data.source': 'data_free',
      },
      '',
    ),  # fmt: skip
    (
      {'model.init': 'checkpoint', 'data.source': 'imagenet', 'data.data_dir': '/nonexistent/tfds'},
      "config.data.data_dir='/nonexistent/tfds': no such directory",
    ),  # fmt: skip
    ({'data.source': 'npz', 'data.path': '/nonexistent.npz'}, "config.data.path='/nonexistent.npz': no such npz"),
    ({'calibrate.assign_every': -1}, 'config.calibrate.assign_every=-1'),
    ({'calibrate.trainable': 'latent'}, "needs assignment='ste'"),
    ({'calibrate.assign_target': 'x'}, "config.calibrate.assign_target='x': expected one of auto, weight, feedback"),
    ({'calibrate.assign_target': 'feedback'}, "assign_target='feedback': needs quant.error_feedback=True"),
    ({'quant.method': 'rtn'}, "config.quant.method='rtn': calibrate trains PQ/VQ codebooks"),
  ],
)
def test_bad_config_fails_with_a_clear_line(overrides, message):
  config = runlocal(**overrides)
  with pytest.raises(pipeline.ConfigError) as e:
    pipeline.check_config(config)
  if not message:  # batch 3 against the data-parallel size: the whole mesh's device count
    message = f'config.calibrate.batch_size=3 is not divisible by the data-parallel size {jax.device_count()}'
    if jax.device_count() == 1:
      pytest.skip('batch divisibility needs more than one device; covered by test_calibrate_sharded.py')
  assert message in str(e.value)


@pytest.mark.parametrize(
  'quant, calibrate, want',
  [
    ({'error_feedback': True, 'objective': 'output'}, {}, 'feedback'),
    ({'error_feedback': False, 'objective': 'output'}, {}, 'weight'),
    ({'error_feedback': True, 'objective': 'weight'}, {}, 'weight'),
    ({'error_feedback': True, 'objective': 'output'}, {'assignment': 'ste'}, 'weight'),
    ({'error_feedback': True, 'objective': 'output'}, {'assign_target': 'weight'}, 'weight'),
  ],
)
def test_assign_target_auto_follows_error_feedback(quant, calibrate, want):
  from dpq_jax.stages import calibrate as calibrate_stage

  config = runlocal()
  config.quant.update(quant)
  config.calibrate.update(calibrate)
  assert calibrate_stage.assign_target(config) == want


def test_bad_config_writes_nothing(tmp_path):
  workdir = tmp_path / 'w'
  r = helpers.run_main(workdir, '--config.calibrate.trainable=codebooks,nope', config=helpers.XL_RUNLOCAL,
                       timeout=300)  # fmt: skip
  helpers.assert_refused(r, workdir, "unknown trainable set 'nope'")


def test_distillation_term_is_zero_against_itself():
  """With the fp model equal to the decoded quantized one, the distillation term vanishes."""
  fp, rules, params, q = tiny_setup()
  dense = q.dense_params()
  jstep, state, frozen, _ = build(calib_config(distill_weight=1.0, lr=1e-6), (fp, rules, params, q))
  x, y = tiny_data(8)
  batch = {'latents': x, 'labels': y}
  state, m = jstep(state, dict(frozen, fp=jax.device_put(dense)), batch)
  assert float(m['distill']) < 1e-10
  _, m = jstep(state, dict(frozen, fp=jax.device_put(params)), batch)
  assert float(m['distill']) > 1e-6
  np.testing.assert_allclose(float(m['loss']), float(m['mse'] + m['vb'] + m['distill']), rtol=1e-5)


def test_stage_calibrates_rewrites_the_artifact_and_reports(tmp_path):
  """Stage `calibrate` on data-free samples: metrics.jsonl, report keys, and DIR/quantized holding
  the calibrated codebooks with codes that are their argmin of the latent weights; a calibration probe sees the
  starting model at step 0 and at the last step the model the artifact holds."""
  from dpq_jax.quant import sizes as sizes_lib
  from dpq_jax.quant import storage
  from dpq_jax.stages import Job, QuantizedModel
  from dpq_jax.stages import calibrate as calibrate_stage

  fp, rules, params, q = tiny_setup()
  q = q.replace(rows=[
    {'name': r['name'], 'shape': [1, 1], 'k': 16, 'd': 4, 'index_bits': 4, 'bytes': 0, 'rel_mse': 1.0, 'sq_norm': 1.0}
    for r in q.rows])  # fmt: skip
  sizes = storage.save(str(tmp_path / 'quantized'), q, {'name': 'tiny'})
  batch = max(4, jax.device_count())  # 8 when test_calibrate_sharded.py gave this process 8 devices
  # objective 'weight': tiny_setup's codes were fitted on the weights, and the final codes are checked against the
  # Euclidean nearest codeword below (the DiT-XL/2 configs' objective 'output' assigns in the layer-output metric,
  # which tests/quant/test_metric.py checks).
  config = runlocal(**{'calibrate.steps': 4, 'calibrate.batch_size': batch, 'calibrate.lr': 1e-2,
                        'calibrate.warmup': 0, 'calibrate.checkpoint_every': 2, 'data.num_samples': 8,
                        'quant.objective': 'weight'})  # fmt: skip
  config.model.init = 'checkpoint'  # no smoke caps
  config.model.input_size = 8
  report = {'num_params': 1000, **sizes_lib.summary(q.rows, sizes, 1000)}
  job = Job(report=report, spec=TinySpec(fp), fp_params=params, quantized=QuantizedModel(q, rules, {'name': 'tiny'}))
  config.data.source = 'data_free'
  assert calibrate_stage.check(config) == []
  probed = []  # (step, the probed job's quantized params)

  def probe(step, probe_job):
    probed.append((step, probe_job.quantized.weights))
    model, variables = probe_job.runtime(config)  # runnable as it stands
    assert np.isfinite(model.apply(variables, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32),
                                   jnp.zeros((1,), jnp.int32))).all()  # fmt: skip

  job.calibration_probe = ((0, 2, 4, 9), probe)  # 9: never reached
  job = calibrate_stage.run(config, str(tmp_path), job)
  summary = job.report['calibrate']
  assert summary['steps'] == 4 and summary['num_examples'] == 8 and summary['resumed_from_step'] is None
  logged = [json.loads(s) for s in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in logged] == [1, 2, 3, 4]
  # TensorBoard event files hold the same curves: read with a TFRecord reader written here.
  board = _read_scalars(tmp_path / 'tensorboard')
  assert board['calibrate/loss'] == [(r['step'], pytest.approx(r['loss'], rel=1e-6)) for r in logged]
  assert {'calibrate/mse', 'calibrate/vb', 'calibrate/changed', 'calibrate/grad_norm'} <= set(board)
  assert (tmp_path / 'data_free_latents.npz').exists() and (tmp_path / 'checkpoints' / '4').is_dir()
  _, back = storage.load(str(tmp_path / 'quantized'))
  for path, cb in jax.tree_util.tree_leaves_with_path(back.variables()['params']):
    keys = [p.key for p in path]
    if keys[-1] != 'codebooks':
      continue
    node_q, node_fp, node_old = back.variables()['quant'], params, q.variables()['params']
    for k in keys[:-1]:
      node_q, node_fp, node_old = node_q[k], node_fp[k], node_old[k]
    assert not np.allclose(cb, node_old['codebooks'])  # calibrated
    np.testing.assert_array_equal(node_q['codes'], pq.encode(node_fp['kernel'], cb, pq.CodebookSpec(16, 4)))
  assert job.report['layers'][0]['rel_mse'] < 1.0  # recomputed against the fp weights
  assert [step for step, _ in probed] == [0, 2, 4]
  start_cb = {n: np.asarray(w.codebooks) for n, w in q.pq.items()}
  for n, w in probed[0][1].pq.items():  # step 0: the model as given, codebooks and codes
    np.testing.assert_array_equal(w.codebooks, start_cb[n])
    np.testing.assert_array_equal(w.codes, q.pq[n].codes)
  for n, w in probed[-1][1].pq.items():  # the last step: exactly the model written to DIR/quantized
    np.testing.assert_array_equal(w.codebooks, back.pq[n].codebooks)
    np.testing.assert_array_equal(w.codes, back.pq[n].codes)
    assert not np.allclose(probed[1][1].pq[n].codebooks, w.codebooks)  # step 2 is neither end
    assert not np.allclose(probed[1][1].pq[n].codebooks, start_cb[n])
  # The runtime model of the next stage runs on the calibrated variables.
  model, variables = job.runtime(config)
  out = model.apply(variables, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32),
                             jnp.zeros((1,), jnp.int32))  # fmt: skip
  assert out.shape == (1, 8, 8, 8)


def _read_scalars(directory) -> dict:
  """{tag: [(step, value), ...]} from the TFRecord-framed Event protos of every events file."""
  import struct

  from tensorboardX.proto import event_pb2

  out: dict = {}
  for path in sorted(directory.glob('events.out.tfevents.*')):
    data = path.read_bytes()
    i = 0
    while i < len(data):
      (length,) = struct.unpack('<Q', data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])  # skip the length's crc
      i += 12 + length + 4  # and the data's crc
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def _diverging_run(tmp_path, monkeypatch, poison, message, **calibrate):
  """The calibrate stage on the tiny model, the real step's (state, metrics) passed through poison(call number,
  state, metrics) from its output; expects NonFiniteError matching `message`, DIR/quantized untouched."""
  from dpq_jax import errors
  from dpq_jax.calibrate import train_step as step_lib
  from dpq_jax.quant import storage
  from dpq_jax.stages import Job, QuantizedModel
  from dpq_jax.stages import calibrate as calibrate_stage

  fp, rules, params, q = tiny_setup()
  storage.save(str(tmp_path / 'quantized'), q, {'name': 'tiny'})
  before = {f: (tmp_path / 'quantized' / f).read_bytes() for f in storage.FILES.values()}
  real = step_lib.jit_step

  def poisoned(fn, *args, **kwargs):
    jstep, *rest = real(fn, *args, **kwargs)
    calls = []

    def step(state, frozen, batch):
      calls.append(1)
      return poison(len(calls), *jstep(state, frozen, batch))

    return (step, *rest)

  monkeypatch.setattr(step_lib, 'jit_step', poisoned)
  config = runlocal(**{'calibrate.steps': 4, 'calibrate.batch_size': max(4, jax.device_count()), 'calibrate.lr': 1e-2,
                       'calibrate.warmup': 0, 'data.num_samples': 8, **calibrate})  # fmt: skip
  config.model.init, config.model.input_size, config.data.source = 'checkpoint', 8, 'data_free'
  job = Job(
    report={'num_params': 1000},
    spec=TinySpec(fp),
    fp_params=params,
    quantized=QuantizedModel(q, rules, {'name': 'tiny'}),
  )
  with pytest.raises(errors.NonFiniteError, match=re.escape(message)):
    calibrate_stage.run(config, str(tmp_path), job)
  assert {f: (tmp_path / 'quantized' / f).read_bytes() for f in storage.FILES.values()} == before


def test_nan_loss_stops_calibration_with_the_step_range(tmp_path, monkeypatch):
  """A loss that turns NaN at step 3 (injected into the real step's metrics) stops the stage with the step range
  as a user fault (NonFiniteError: one line from main), before DIR/quantized is rewritten."""

  def nan_loss_from_3(n, state, metrics):
    return state, dict(metrics, loss=metrics['loss'] * (np.nan if n >= 3 else 1.0))

  _diverging_run(tmp_path, monkeypatch, nan_loss_from_3, 'not finite at step 3 (steps 3..4)',
                 **{'calibrate.checkpoint_every': 2, 'calibrate.log_every': 2})  # fmt: skip


@pytest.mark.parametrize('what', ['loss', 'state'])
def test_no_checkpoint_holds_a_diverged_step(tmp_path, monkeypatch, what):
  """Checkpoints every step, losses logged every 4: a loss or a state (its loss still finite) that turns NaN at
  step 3 is caught before step 3 is checkpointed, so a resume starts from step 2, the last good state."""
  from dpq_jax.calibrate import checkpoint as ckpt_lib
  from dpq_jax.calibrate import loop

  def poison(n, state, metrics):
    if n < 3:
      return state, metrics
    if what == 'loss':
      return state, dict(metrics, loss=metrics['loss'] * np.nan)
    return jax.tree.map(lambda x: x * np.nan if jnp.issubdtype(x.dtype, jnp.inexact) else x, state), metrics

  message = 'loss is not finite at step 3 (steps 1..3)' if what == 'loss' else 'state is not finite after step 3'
  _diverging_run(tmp_path, monkeypatch, poison, message,
                 **{'calibrate.checkpoint_every': 1, 'calibrate.log_every': 4, 'calibrate.keep': 0})  # fmt: skip
  saved = ckpt_lib.Checkpointer(str(tmp_path / loop.CHECKPOINT_DIR), 1, 0)
  assert sorted(saved.manager.all_steps()) == [1, 2]
  saved.close()
