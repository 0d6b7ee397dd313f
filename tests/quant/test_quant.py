"""PQ engine: k-means vs numpy and faiss, PQ/VQ identities, PQDense, gradients, sizes on disk."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpq_jax.models import dit
from dpq_jax.quant import kmeans, layers, pq, storage, surgery
from tests import helpers


def _np_lloyd(x, c, iters):
  """Plain numpy Lloyd (float64); empty clusters keep their centroid."""
  x, c = x.astype(np.float64), c.astype(np.float64).copy()
  for _ in range(iters):
    a = ((x[:, :, None, :] - c[:, None]) ** 2).sum(-1).argmin(-1)
    for p in range(x.shape[0]):
      for k in range(c.shape[1]):
        if (a[p] == k).any():
          c[p, k] = x[p][a[p] == k].mean(0)
  return c


def test_lloyd_matches_numpy_and_objective_never_increases():
  x = helpers.heavy_tailed((3, 200, 4))
  init = x[:, :8].copy() + 1e-3  # fixed init, no k-means++ randomness
  r = kmeans.kmeans(x, 8, jax.random.key(0), iters=6, init=init)
  np.testing.assert_allclose(r.codebooks, _np_lloyd(x, init, 6), rtol=1e-4, atol=1e-6)
  obj = np.asarray(r.objective)
  assert obj.shape == (7,) and np.all(np.diff(obj) <= 1e-6 * obj[0])
  r2 = kmeans.kmeans(helpers.heavy_tailed((5, 500, 8), 1), 32, jax.random.key(1), iters=15)
  obj2 = np.asarray(r2.objective)
  assert np.all(np.diff(obj2) <= 1e-6 * obj2[0])


def test_chunked_equals_unchunked_and_deterministic():
  x = helpers.heavy_tailed((4, 300, 4), 2)
  a = kmeans.kmeans(x, 16, jax.random.key(3), iters=5)
  b = kmeans.kmeans(x, 16, jax.random.key(3), iters=5, chunk_size=37)
  np.testing.assert_array_equal(a.codes, b.codes)
  np.testing.assert_allclose(a.codebooks, b.codebooks, rtol=1e-6)
  c = kmeans.kmeans(x, 16, jax.random.key(4), iters=5)
  assert not np.array_equal(a.codebooks, c.codebooks)


def test_k_at_least_n_is_exact_and_degenerate_data():
  x = helpers.heavy_tailed((2, 10, 4))
  r = kmeans.kmeans(x, 16, jax.random.key(0))
  rec = np.take_along_axis(np.asarray(r.codebooks), np.asarray(r.codes)[..., None], axis=1)
  np.testing.assert_array_equal(rec, x)
  same = np.ones((2, 50, 4), np.float32)
  r = kmeans.kmeans(same, 8, jax.random.key(0), iters=3)
  assert np.isfinite(r.codebooks).all() and float(r.objective[-1]) == 0.0


def test_empty_clusters_are_reseeded():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(-5, 0.1, (1, 100, 2)), rng.normal(5, 0.1, (1, 100, 2))], axis=1).astype(np.float32)
  init = np.array([[[-5, 0], [100, 100], [200, 200], [300, 300]]], np.float32)  # three far, empty
  r = kmeans.kmeans(x, 4, jax.random.key(0), iters=5, init=init)
  counts = np.bincount(np.asarray(r.codes[0]), minlength=4)
  assert (counts > 0).all(), counts


def test_bad_kmeans_args():
  with pytest.raises(ValueError, match='codebook_size=0'):
    kmeans.kmeans(np.zeros((1, 4, 2), np.float32), 0, jax.random.key(0))
  with pytest.raises(ValueError, match='iters=-1'):
    kmeans.kmeans(np.zeros((1, 4, 2), np.float32), 2, jax.random.key(0), iters=-1)


def test_quality_vs_faiss():
  faiss = pytest.importorskip('faiss', reason='faiss-cpu not installed (pip install -e ".[dev]")')
  w = helpers.heavy_tailed((512, 256), 5)  # PyTorch layout [out, in]
  spec = pq.CodebookSpec(64, 4)
  codebooks, codes, _ = pq.fit(jnp.asarray(w.T), spec, jax.random.key(0), iters=20)
  ours = pq.rel_mse(w.T, pq.decode(codebooks, codes))
  quantizer = faiss.ProductQuantizer(256, 64, 6)
  quantizer.cp.niter = 20
  quantizer.train(w)
  theirs = float(((quantizer.decode(quantizer.compute_codes(w)) - w) ** 2).sum() / (w**2).sum())
  assert ours <= theirs * 1.02, (ours, theirs)


def test_pq_identities():
  kernel = jnp.asarray(helpers.heavy_tailed((64, 32), 6))  # Flax layout [in, out]
  # K >= out_features: every position memorises its 32 sub-vectors exactly.
  cb, codes, _ = pq.fit(kernel, pq.CodebookSpec(32, 4), jax.random.key(0))
  np.testing.assert_array_equal(pq.decode(cb, codes), kernel)
  # VQ is PQ with one codebook: the same k-means over all sub-vectors of the layer.
  vq = pq.CodebookSpec(16, 4, shared=True)
  cb, codes, _ = pq.fit(kernel, vq, jax.random.key(1), iters=5)
  sub = pq.to_subvectors(kernel, 4).reshape(1, -1, 4)
  ref = kmeans.kmeans(sub, 16, jax.random.key(1), iters=5)
  np.testing.assert_array_equal(cb, ref.codebooks)
  np.testing.assert_array_equal(codes.reshape(-1), ref.codes[0])
  assert cb.shape == (1, 16, 4) and codes.shape == (16, 32)
  # Sub-vectors are cut along in_features of each output column.
  np.testing.assert_array_equal(pq.to_subvectors(kernel, 4)[2, 5], kernel[8:12, 5])
  np.testing.assert_array_equal(pq.from_subvectors(pq.to_subvectors(kernel, 4)), kernel)


def test_pq_beats_vq_at_equal_index_bits():
  kernel = jnp.asarray(helpers.heavy_tailed((256, 512), 7))
  errs = {}
  for name, shared in (('pq', False), ('vq', True)):
    cb, codes, _ = pq.fit(kernel, pq.CodebookSpec(16, 4, shared), jax.random.key(0), iters=15)
    errs[name] = pq.rel_mse(kernel, pq.decode(cb, codes))
  assert errs['vq'] > errs['pq'], errs


def test_bad_specs():
  with pytest.raises(ValueError, match='subvector_dim \\(d\\)=3 does not divide in_features=64'):
    pq.CodebookSpec(16, 3).check(64, 8)
  with pytest.raises(ValueError, match='codebook_size \\(k\\)=0'):
    pq.CodebookSpec(0, 4).check(64, 8)
  with pytest.raises(ValueError, match='at most 16'):
    pq.CodebookSpec(2**17, 4).check(64, 8)


def _pq_layer(spec, assignment='frozen', in_f=16, out_f=12):
  kernel = jnp.asarray(helpers.heavy_tailed((in_f, out_f), 8))
  cb, codes, _ = pq.fit(kernel, spec, jax.random.key(0), iters=5)
  layer = layers.PQDense(out_f, spec=spec, assignment=assignment)
  x = jnp.asarray(helpers.heavy_tailed((5, in_f), 9))
  v = layer.init(jax.random.key(0), x)
  params = {'codebooks': cb, 'bias': jnp.arange(out_f, dtype=jnp.float32)}
  quant = {'codes': codes.astype(v['quant']['codes'].dtype)}
  if assignment != 'frozen':
    quant['latent'] = kernel
  return layer, x, kernel, params, quant, cb, codes


@pytest.mark.parametrize('shared', [False, True])
def test_pqdense_forward_equals_dense_with_decoded_weights(shared):
  spec = pq.CodebookSpec(8, 4, shared)
  layer, x, _, params, quant, cb, codes = _pq_layer(spec)
  y = layer.apply({'params': params, 'quant': quant}, x)
  dense = nn.Dense(12).apply({'params': {'kernel': pq.decode(cb, codes), 'bias': params['bias']}}, x)
  np.testing.assert_allclose(y, dense, rtol=1e-6)
  assert set(params) == {'codebooks', 'bias'}  # no float kernel beside the codes


def test_codebook_gradient_is_segment_sum_of_weight_gradient():
  spec = pq.CodebookSpec(8, 4)
  layer, x, kernel, params, quant, cb, codes = _pq_layer(spec, 'dynamic')
  target = jnp.asarray(helpers.heavy_tailed((5, 12), 10))
  loss = lambda p: jnp.sum((layer.apply({'params': p, 'quant': quant}, x) - target) ** 2)
  g = jax.grad(loss)(params)['codebooks']
  # dL/dW_hat of the dense layer with W_hat = decode(cb, assign(latent)); codes are recomputed.
  assigned = pq.encode(kernel, cb, spec)
  w_hat = pq.decode(cb, assigned)
  gw = jax.grad(lambda w: jnp.sum((x @ w + params['bias'] - target) ** 2))(w_hat)
  gsub = np.asarray(pq.to_subvectors(gw, 4))  # [M, out, d]
  want = np.zeros_like(np.asarray(cb))
  a = np.asarray(assigned)
  for m in range(a.shape[0]):
    for o in range(a.shape[1]):
      want[m, a[m, o]] += gsub[m, o]
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_dynamic_assignment_updates_codes_and_ste_trains_latent():
  spec = pq.CodebookSpec(8, 4)
  layer, x, kernel, params, quant, cb, codes = _pq_layer(spec, 'dynamic')
  moved = dict(params, codebooks=params['codebooks'] * 1.5)
  _, state = layer.apply({'params': moved, 'quant': quant}, x, mutable=['quant'])
  np.testing.assert_array_equal(state['quant']['codes'], pq.encode(kernel, moved['codebooks'], spec))
  ste = layers.PQDense(12, spec=spec, assignment='ste')
  p = dict(params, latent=kernel)
  g = jax.grad(lambda p: jnp.sum(ste.apply({'params': p, 'quant': {'codes': quant['codes']}}, x) ** 2))(p)
  assert float(jnp.abs(g['latent']).sum()) > 0 and float(jnp.abs(g['codebooks']).sum()) > 0


def test_quantized_tree_shapes_and_dtypes(small_dit):
  model, params = small_dit
  rules = surgery.default_rules('pq', 16, 4, overrides=('blocks_0/attn/qkv=256:8',))
  q = surgery.quantize_params(params, rules, jax.random.key(0), iters=2, progress=False)
  v = q.variables()  # the PQDense runtime's variables
  b0 = v['params']['blocks_0']
  assert jax.tree.map(lambda v: (v.shape, str(v.dtype)), b0['attn']['qkv']) == {
    'codebooks': ((48, 256, 8), 'float32'),
    'bias': ((1152,), 'float32'),
  }
  assert b0['mlp']['fc2']['codebooks'].shape == (384, 16, 4)
  assert v['quant']['blocks_0']['attn']['qkv']['codes'].shape == (48, 1152)
  assert v['quant']['blocks_0']['attn']['qkv']['codes'].dtype == np.uint8
  assert v['quant']['blocks_1']['mlp']['fc2']['codes'].shape == (384, 384)
  assert 'kernel' in v['params']['final_layer']['linear'] and 'kernel' in v['params']['t_embedder']['mlp_0']
  assert len(q.rows) == 5 * 12
  # The quantized tree runs in the same DiT module with the PQ dense factory.
  qmodel = dit.create_model('DiT-S/8', input_size=16, num_classes=10, dense=layers.dense_factory(rules))
  x, t, y = jnp.ones((2, 16, 16, 4)), jnp.array([1, 500]), jnp.array([3, 10])
  a = qmodel.apply(v, x, t, y)
  b = model.apply({'params': q.dense_params()}, x, t, y)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  shapes = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), x, t, y))
  assert jax.tree.map(lambda s: s.shape, shapes['params']) == jax.tree.map(lambda s: s.shape, v['params'])


@pytest.mark.parametrize('method', ['pq', 'vq', 'rtn'])
def test_storage_roundtrip_and_sizes(small_dit, tmp_path, method):
  _, params = small_dit
  rules = surgery.default_rules(method, 16, 4)
  q = surgery.quantize_params(params, rules, jax.random.key(0), method=method, iters=2, rtn_bits=2, progress=False)
  sizes = storage.save(str(tmp_path / 'q'), q, {'name': 'DiT-S/8'})
  on_disk = sum(os.path.getsize(tmp_path / 'q' / f) for f in os.listdir(tmp_path / 'q'))
  assert sizes['total'] == on_disk
  quantized = sum(int(np.prod(r['shape'])) for r in q.rows)
  assert sizes['codes'] == sum((int(np.prod(r['shape'])) // r['d'] * r['index_bits'] + 7) // 8 for r in q.rows)
  assert sizes['codes'] * 8 / quantized == pytest.approx(1.0 if method != 'rtn' else 2.0, rel=1e-3)
  meta, back = storage.load(str(tmp_path / 'q'))
  assert meta['name'] == 'DiT-S/8'
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), back.variables()['quant'], q.variables()['quant'])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), back.variables()['params'], q.variables()['params']
  )


@pytest.mark.parametrize('method', ['pq', 'vq'])
def test_channel_scale_restores_output_norms_and_round_trips(small_dit, tmp_path, method):
  """k-means reconstructions are shorter than the weights (cell means); the per-output-channel scale gives
  each channel its norm back, the on-the-fly layer equals the dense layer on the scaled kernel, and the
  scale is stored (fp16, counted in the codebook bytes) and read back."""
  model, params = small_dit
  rules = surgery.default_rules(method, 16, 4)
  plain = surgery.quantize_params(params, rules, jax.random.key(0), method=method, iters=3, progress=False)
  q = surgery.quantize_params(params, rules, jax.random.key(0), method=method, iters=3, channel_scale=True,
                              progress=False)  # fmt: skip
  w = np.asarray(params['blocks_1']['mlp']['fc1']['kernel'], np.float64)
  w_plain = np.asarray(plain.dense_params()['blocks_1']['mlp']['fc1']['kernel'])
  w_scaled = np.asarray(q.dense_params()['blocks_1']['mlp']['fc1']['kernel'])
  norm = lambda a: np.linalg.norm(a, axis=0)
  assert np.all(norm(w_plain) < norm(w))  # the shrinkage the scale corrects
  np.testing.assert_allclose(norm(w_scaled), norm(w), rtol=2e-3)  # fp16-rounded scale
  # The scale is (numpy) ||W_r|| / ||W_hat_r|| of the unscaled reconstruction, same codes.
  np.testing.assert_array_equal(
    q.variables()['quant']['blocks_1']['mlp']['fc1']['codes'],
    plain.variables()['quant']['blocks_1']['mlp']['fc1']['codes'],
  )
  want = (norm(w) / norm(w_plain)).astype(np.float16).astype(np.float32)
  np.testing.assert_array_equal(q.variables()['params']['blocks_1']['mlp']['fc1']['scale'], want)
  qmodel = dit.create_model('DiT-S/8', input_size=16, num_classes=10, dense=layers.dense_factory(rules))
  x, t, y = jnp.ones((2, 16, 16, 4)), jnp.array([1, 500]), jnp.array([3, 10])
  a = qmodel.apply(q.variables(), x, t, y)
  b = model.apply({'params': q.dense_params()}, x, t, y)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  sizes = storage.save(str(tmp_path / 'q'), q, {'name': 'DiT-S/8'})
  base = storage.save(str(tmp_path / 'p'), plain, {'name': 'DiT-S/8'})
  scales = sum(int(r['shape'][0]) for r in q.rows)
  assert sizes['codebooks'] - base['codebooks'] == 2 * scales  # one fp16 value per output channel
  assert sum(r['bytes'] for r in q.rows) - sum(r['bytes'] for r in plain.rows) == 2 * scales
  _, back = storage.load(str(tmp_path / 'q'))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), back.variables()['params'], q.variables()['params']
  )
  # scaled_codes: the same scale, then the codes of W / s (the stacked program; numpy argmin): a lower error of the
  # scaled kernel, the channels shorter again.
  r = surgery.quantize_params(params, rules, jax.random.key(0), method=method, iters=3, channel_scale=True,
                              scaled_codes=True, progress=False)  # fmt: skip
  scale = r.variables()['params']['blocks_1']['mlp']['fc1']['scale']
  np.testing.assert_array_equal(scale, want)
  books = np.asarray(r.pq['blocks_1/mlp/fc1'].codebooks, np.float64)
  sub = (w / scale).reshape(-1, 4, w.shape[1]).transpose(0, 2, 1)  # [M, out, d]
  books = np.broadcast_to(books, (sub.shape[0], *books.shape[1:]))
  nearest = ((sub[:, :, None, :] - books[:, None]) ** 2).sum(-1).argmin(-1)
  np.testing.assert_array_equal(r.variables()['quant']['blocks_1']['mlp']['fc1']['codes'], nearest)
  w_r = np.asarray(r.dense_params()['blocks_1']['mlp']['fc1']['kernel'])
  assert np.sum((w - w_r) ** 2) < np.sum((w - w_scaled) ** 2)
  assert np.median(norm(w_r) / norm(w)) < np.median(norm(w_scaled) / norm(w))


def _main(workdir, *overrides):
  return helpers.run_main(workdir, '--config.quant.kmeans_iters=2', *overrides, config=helpers.XL_RUNLOCAL, timeout=900)


def test_quantize_stage_end_to_end(tmp_path):
  r = _main(tmp_path, '--config.quant.k=16', '--config.quant.d=4', "--config.stages=('load','quantize')")
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads((tmp_path / 'report.json').read_text())
  on_disk = sum(os.path.getsize(tmp_path / 'quantized' / f) for f in os.listdir(tmp_path / 'quantized'))
  assert report['bytes']['total'] == on_disk
  assert report['index_bits_per_weight'] == pytest.approx(1.0)
  assert report['compression_ratio_model'] == pytest.approx(report['fp32_bytes'] / on_disk)
  assert len(report['layers']) == 60 and {'name', 'shape', 'k', 'd', 'index_bits', 'bytes', 'rel_mse'} <= set(
    report['layers'][0]
  )
  assert 0 < report['weight_rel_mse'] < 1


@pytest.mark.parametrize(
  'override,message',
  [
    ('--config.quant.d=5', 'subvector_dim (d)=5 does not divide in_features=384'),
    ('--config.quant.k=0', 'config.quant.k=0'),
    ('--config.quant.k=131072', 'config.quant.k=131072'),
    ('--config.quant.method=nope', "config.quant.method='nope'"),
  ],
)
def test_quantize_bad_specs_fail_before_work(tmp_path, override, message):
  workdir = tmp_path / 'w'
  r = _main(workdir, override)
  helpers.assert_refused(r, workdir, message)
  assert 'Traceback' not in r.stderr
