"""8-bit codebooks (config.quant.codebook_dtype='int8'): rounding, storage, sizes, compression, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpq_jax import tree_utils
from dpq_jax.quant import allocation, codebook_values, packing, pq, storage, surgery
from tests import helpers

PATTERN = r'blocks_\d+/(attn/proj|mlp/fc1)'  # 4 layers of 2 shapes: quick to compile


def _np_int8(codebooks, alive=None):
  """Independent numpy reference: (q int8, s float16) per the brief's formula."""
  cb = np.asarray(codebooks, np.float32)
  live = np.ones(cb.shape[:2], bool) if alive is None else np.asarray(alive, bool)
  peak = np.array([np.abs(c[a]).max() if a.any() else 0.0 for c, a in zip(cb, live)], np.float32)
  s = (peak / np.float32(127)).astype(np.float16)
  s[peak == 0] = 1.0
  q = np.clip(np.round(cb / s.astype(np.float32)[:, None, None]), -127, 127).astype(np.int8)
  return q, s


def _on_grid(codebooks, alive=None):
  """True where every live value of each codebook is an integer multiple (|q| <= 127) of its numpy scale."""
  q, s = _np_int8(codebooks, alive)
  return np.array_equal(q.astype(np.float32) * s.astype(np.float32)[:, None, None], np.asarray(codebooks))


def test_int8_round_trip_matches_numpy_reference():
  cb = helpers.heavy_tailed((6, 32, 8), seed=1, df=4)
  cb[2] = 0.0  # all-zero codebook: scale 1
  cb[4] *= 1e3  # large range
  alive = np.ones((6, 32), bool)
  alive[1, 20:] = False
  cb[1, 20:] = 10.0  # dead rows far out of range: excluded from the scale, clipped
  q_ref, s_ref = _np_int8(cb, alive)
  values, scales = codebook_values.encode(cb, 'int8', alive)
  assert values.dtype == np.int8 and scales.dtype == np.float16 and scales.shape == (6,)
  np.testing.assert_array_equal(values, q_ref)
  np.testing.assert_array_equal(scales, s_ref)
  assert scales[2] == 1.0 and np.all(scales > 0)
  want = q_ref.astype(np.float32) * s_ref.astype(np.float32)[:, None, None]
  got = np.asarray(codebook_values.round_codebooks(cb, 'int8', alive))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(codebook_values.decode(values, scales), want)
  # Live values are within half a step; the largest live value of each codebook maps to +-127.
  err = np.abs(got - cb)[alive]
  step = np.broadcast_to(s_ref.astype(np.float32)[:, None], alive.shape)[alive]
  assert np.all(err <= step[:, None] / 2 * (1 + 1e-6))
  assert np.abs(values[[0, 1, 3, 4, 5]]).max(axis=(1, 2)).tolist() == [127] * 5
  assert np.all(got[1, 20:] == 127 * np.float32(s_ref[1]))  # clipped dead rows
  # Rounding what is stored changes nothing (calibrate, then save; compress after calibrate).
  np.testing.assert_array_equal(np.asarray(codebook_values.round_codebooks(got, 'int8', alive)), got)
  # Float dtypes: the plain astype round trip; no per-codebook bytes.
  for name, np_dtype in (('float16', np.float16), ('float32', np.float32)):
    np.testing.assert_array_equal(codebook_values.round_codebooks(cb, name), cb.astype(np_dtype).astype(np.float32))
    assert codebook_values.value_bytes(name) == np.dtype(np_dtype).itemsize
    assert codebook_values.overhead_bytes(name) == 0 and codebook_values.side_dtype(name) == name
  np.testing.assert_array_equal(
    codebook_values.round_codebooks(cb, 'bfloat16'), np.asarray(jnp.asarray(cb).astype(jnp.bfloat16), np.float32)
  )
  assert codebook_values.value_bytes('int8') == 1 and codebook_values.overhead_bytes('int8') == 2
  assert codebook_values.side_dtype('int8') == 'float16'


def _get(tree, name):
  for p in name.split('/'):
    tree = tree[p]
  return tree


@pytest.mark.parametrize('method', ['pq', 'vq'])
def test_int8_artifact_loads_exactly_and_has_closed_form_size(tiny_dit, tmp_path, method):
  _, params = tiny_dit
  rules = surgery.default_rules(method, 16, 4, pattern=PATTERN)
  key = jax.random.key(0)
  q = surgery.quantize_params(params, rules, key, method=method, iters=2, codebook_dtype='int8', channel_scale=True,
                              progress=False)  # fmt: skip
  first = q.rows[0]['name']
  # What surgery fit first: the k-means of the layers of its shape, stacked (surgery.stack_groups), in float32.
  kernels = [k for p, k in surgery.module_kernels(params) if rules.spec_for('/'.join(p)) is not None]
  group = surgery.stack_groups([(np.shape(k), rules.spec_for(first)) for k in kernels])[0]
  stack = np.stack([np.asarray(kernels[i], np.float32) for i in group])
  cb32 = pq.quantize_stack(stack, rules.spec_for(first), jax.random.fold_in(key, 0), 2, 'float32').codebooks[0]
  np.testing.assert_array_equal(
    _get(q.variables()['params'], first)['codebooks'], codebook_values.round_codebooks(cb32, 'int8')
  )
  np.testing.assert_array_equal(
    _get(q.variables()['params'], first)['codebooks'], (lambda a, s: a.astype(np.float32) * s.astype(np.float32)[:, None, None])(
      *_np_int8(cb32))
  )  # fmt: skip
  sizes = storage.save(str(tmp_path / 'q'), q, {'name': 'tiny'}, codebook_dtype='int8')
  meta, back = storage.load(str(tmp_path / 'q'))
  index = json.loads((tmp_path / 'q' / 'index.json').read_text())
  by_path = {e['path']: e for e in index['entries']}
  want_codebooks = want_codes = 0
  for row in q.rows:
    cb = np.asarray(_get(q.variables()['params'], row['name'])['codebooks'])
    num_codebooks = cb.shape[0]
    assert num_codebooks == (1 if method == 'vq' else row['shape'][1] // 4)
    assert _on_grid(cb)
    got = _get(back.variables()['params'], row['name'])
    np.testing.assert_array_equal(got['codebooks'], cb)  # exactly round_codebooks' values
    np.testing.assert_array_equal(got['scale'], _get(q.variables()['params'], row['name'])['scale'])
    np.testing.assert_array_equal(
      _get(back.variables()['quant'], row['name'])['codes'], _get(q.variables()['quant'], row['name'])['codes']
    )
    assert by_path[row['name'] + '/codebooks']['dtype'] == 'int8'
    assert by_path[row['name'] + '/codebook_scales']['dtype'] == 'float16'
    assert by_path[row['name'] + '/scale']['dtype'] == 'float16'
    scale = np.asarray(_get(q.variables()['params'], row['name'])['scale'])
    np.testing.assert_array_equal(scale, scale.astype(np.float16).astype(np.float32))  # fp16 channel scales
    # values 1 byte each + one fp16 scale per codebook + one fp16 channel scale per output
    layer_codebooks = cb.size + 2 * num_codebooks + 2 * row['shape'][0]
    want_codebooks += layer_codebooks
    want_codes += packing.packed_nbytes(int(np.prod(row['shape'])) // 4, 4)
    assert row['bytes'] == layer_codebooks + packing.packed_nbytes(int(np.prod(row['shape'])) // 4, 4)
  assert os.path.getsize(tmp_path / 'q' / 'codebooks.bin') == sizes['codebooks'] == want_codebooks
  assert sizes['codes'] == want_codes
  assert len(q.rows) == 4 and sizes['total'] == sum(
    os.path.getsize(tmp_path / 'q' / f) for f in os.listdir(tmp_path / 'q')
  )
  # The loaded model decodes to exactly the weights quantize_params made (so it runs identically).
  jax.tree.map(np.testing.assert_array_equal, back.dense_params(),
               jax.tree.map(np.asarray, q.dense_params()))  # fmt: skip


def test_int8_rtn_keeps_float16_scalars(tiny_dit, tmp_path):
  """RTN has no codebooks: int8 stores its scale/offset in float16, the same bytes as float16."""
  _, params = tiny_dit
  rules = surgery.default_rules('rtn', 1, 1, pattern=PATTERN)
  qs = {
    dt: surgery.quantize_params(
      params, rules, jax.random.key(0), method='rtn', rtn_bits=2, codebook_dtype=dt, progress=False
    )  # fmt: skip
    for dt in ('float16', 'int8')
  }
  for dt, q in qs.items():
    storage.save(str(tmp_path / dt), q, {'name': 'tiny'}, codebook_dtype=dt)
  for f in ('codes.bin', 'codebooks.bin', 'full_precision.bin', 'index.json'):
    assert (tmp_path / 'int8' / f).read_bytes() == (tmp_path / 'float16' / f).read_bytes(), f
  assert [r['bytes'] for r in qs['int8'].rows] == [r['bytes'] for r in qs['float16'].rows]


def _layers(num=2, k=32, d=8, in_f=64, out_f=256):
  out = []
  for i in range(num):
    kernel = helpers.heavy_tailed((in_f, out_f), seed=10 + i, df=4)
    cb, codes, _ = pq.fit(jnp.asarray(kernel), pq.CodebookSpec(k, d), jax.random.key(i), iters=4)
    scale = pq.channel_scale(kernel, pq.decode(cb, codes))
    out.append(allocation.Layer(f'blocks_{i}/mlp/fc1', np.asarray(cb), np.asarray(codes), kernel,
                                    bias_bytes=4 * out_f, scale=np.asarray(scale)))  # fmt: skip
  return out


def _save_compressed(lays, compressed, info, directory, codebook_dtype):
  params, quant = {}, {}
  for lay, c in zip(lays, compressed):
    path = tuple(lay.name.split('/'))
    tree_utils.set_path(params, path + ('codebooks',), np.asarray(c.codebooks))
    tree_utils.set_path(params, path + ('bias',), np.zeros(lay.reference.shape[1], np.float32))
    tree_utils.set_path(params, path + ('scale',), np.asarray(c.scale))
    tree_utils.set_path(quant, path + ('codes',), np.asarray(c.codes).astype(np.uint8))
    tree_utils.set_path(quant, path + ('alive',), np.asarray(c.alive))
  q = surgery.QuantizedParams.from_variables(params, quant, rows=info['rows'])
  sizes = storage.save(str(directory), q, {'name': 'test'}, codebook_dtype=codebook_dtype)
  index = json.loads((directory / 'index.json').read_text())
  bias = sum(e['nbytes'] for e in index['entries'] if e['path'].endswith('/bias'))
  return sizes, bias


def test_compressed_int8_meets_budget_on_disk_with_cheaper_codewords(tmp_path):
  lays = _layers()
  fp32 = sum(4 * lay.reference.size + lay.bias_bytes for lay in lays)
  target = fp32 // 16  # float16 codebooks must lose about half their codewords
  out = {}
  for dt in ('float16', 'int8'):
    compressed, info = allocation.compress_layers(lays, target, lloyd_steps=1, codebook_dtype=dt, progress=False)
    sizes, bias = _save_compressed(lays, compressed, info, tmp_path / dt, dt)
    on_disk = os.path.getsize(tmp_path / dt / 'codes.bin') + os.path.getsize(tmp_path / dt / 'codebooks.bin') + bias
    assert sizes['codes'] + sizes['codebooks'] + bias == on_disk == info['predicted_bytes'] <= target, dt
    live = np.concatenate([np.asarray(c.alive).sum(1) for c in compressed])  # [all codebooks] K'
    scales = sum(lay.reference.shape[1] for lay in lays)
    # codebooks.bin: K' rows of d values, K' (uint16) per codebook, fp16 scale per codebook (int8), channel scales
    per_codebook = 2 + (2 if dt == 'int8' else 0)
    values = sizes['codebooks'] - per_codebook * live.size - 2 * scales
    assert values == int(live.sum()) * 8 * (1 if dt == 'int8' else 2), dt
    err = sum(r['rel_mse'] * r['sq_norm'] for r in info['rows']) / sum(r['sq_norm'] for r in info['rows'])
    out[dt] = {'live': live, 'bytes_per_codeword': (sizes['codebooks'] - 2 * scales) / live.sum(), 'err': err}
    if dt == 'int8':
      _, back = storage.load(str(tmp_path / dt))
      for lay, c in zip(lays, compressed):
        alive = np.asarray(c.alive)
        assert _on_grid(np.where(alive[..., None], c.codebooks, 0.0), alive)  # live rows on the live-range grid
        got = _get(back.variables()['params'], lay.name)['codebooks']
        np.testing.assert_array_equal(got[alive], np.asarray(c.codebooks)[alive])
        np.testing.assert_array_equal(_get(back.variables()['quant'], lay.name)['codes'], c.codes)
        np.testing.assert_array_equal(_get(back.variables()['quant'], lay.name)['alive'], alive)
  assert out['int8']['bytes_per_codeword'] < 0.6 * out['float16']['bytes_per_codeword']
  assert out['int8']['live'].sum() > 1.3 * out['float16']['live'].sum()  # the bytes buy more codewords
  assert out['int8']['err'] < out['float16']['err']  # ... and a smaller error at the same budget


def _np_pq_error(w, codebooks, d):
  """||W - W_hat||^2 / ||W||^2 with every sub-vector at its nearest codeword, numpy."""
  x = w.reshape(w.shape[0] // d, d, -1).transpose(0, 2, 1).astype(np.float64)  # [M, out, d]
  cb = np.asarray(codebooks, np.float64)
  d2 = ((x[:, :, None] - cb[:, None]) ** 2).sum(-1)  # [M, out, K]
  nearest = np.take_along_axis(cb, d2.argmin(-1)[..., None], axis=1)
  return float(((x - nearest) ** 2).sum() / (x**2).sum())


def test_int8_weight_error_is_close_to_float16():
  w = helpers.heavy_tailed((128, 1024), seed=3, df=3)  # trained-looking: heavy tails
  spec = pq.CodebookSpec(64, 4)
  cb, codes, _ = pq.fit(jnp.asarray(w), spec, jax.random.key(0), iters=8)
  errors = {}
  for dt in ('float32', 'float16', 'int8'):
    rounded = codebook_values.round_codebooks(cb, dt)
    approx = pq.decode(rounded, pq.encode(jnp.asarray(w), rounded, spec))
    errors[dt] = pq.rel_mse(w, approx)
    assert errors[dt] == pytest.approx(_np_pq_error(w, rounded, 4), rel=1e-4), dt
  # Triangle inequality with the float32 codes: every value moves by at most half its codebook's step.
  _, s = _np_int8(cb)  # codebook c serves the w.shape[1] sub-vectors (4 values each) of position c
  shift = float(np.sum((s.astype(np.float64) / 2) ** 2) * 4 * w.shape[1] / np.sum(w.astype(np.float64) ** 2))
  assert errors['int8'] <= (np.sqrt(errors['float32']) + np.sqrt(shift)) ** 2
  assert errors['int8'] <= 1.05 * errors['float16']
  assert errors['int8'] > 0.8 * errors['float32']  # rounding cannot beat the codebooks it rounds by much


def test_bad_codebook_dtype_fails_with_one_line(tiny_dit, tmp_path):
  from configs import dit_xl_1bit
  from dpq_jax import pipeline
  from dpq_jax.errors import ConfigError

  config = dit_xl_1bit.get_config('runlocal=1')
  config.quant.codebook_dtype = 'int4'
  with pytest.raises(ConfigError) as e:
    pipeline.check_config(config)
  assert str(e.value) == "config.quant.codebook_dtype='int4': expected 'float16', 'bfloat16', 'float32' or 'int8'"
  config.quant.codebook_dtype = 'int8'
  pipeline.check_config(config)  # accepted
  _, params = tiny_dit
  with pytest.raises(
    ValueError, match=r"^codebook_dtype='uint8': expected 'float16', 'bfloat16', 'float32' or 'int8'$"
  ):
    surgery.quantize_params(params, surgery.default_rules('pq', 16, 4), jax.random.key(0), codebook_dtype='uint8',
                            progress=False)  # fmt: skip
  q = surgery.quantize_params(params, surgery.default_rules('pq', 16, 4, pattern='blocks_0/attn/proj'),
                              jax.random.key(0), iters=1, progress=False)  # fmt: skip
  with pytest.raises(ValueError, match="codebook_dtype='int4'"):
    storage.save(str(tmp_path / 'q'), q, {}, codebook_dtype='int4')
  assert not (tmp_path / 'q').exists() and os.listdir(tmp_path) == []


@pytest.mark.slow  # one CLI run (DiT-S-sized runlocal model, 60 layers): ~40 s of CPU
def test_quantize_compress_stages_with_int8_cli(tmp_path):
  """Stages quantize + compress through the CLI with int8 codebooks: the stage's own on-disk budget check
  passes and report.json's bytes are the artifact's."""
  args = ['--config.quant.kmeans_iters=2', '--config.quant.k=16', '--config.quant.d=4',
          '--config.quant.codebook_dtype=int8', '--config.compress.budget=28']  # fmt: skip
  r = helpers.run_main(tmp_path, *args, "--config.stages=('load','quantize','compress')", config=helpers.XL_RUNLOCAL,
                       timeout=900)  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads((tmp_path / 'report.json').read_text())
  artifact = tmp_path / 'quantized'
  assert report['bytes']['total'] == sum(os.path.getsize(artifact / f) for f in os.listdir(artifact))
  index = json.loads((artifact / 'index.json').read_text())
  codebooks = [e for e in index['entries'] if e['path'].endswith('/codebooks')]
  assert len(codebooks) == 60 and {e['dtype'] for e in codebooks} == {'int8'}
  assert all(e.get('live_rows') for e in codebooks)
  modules = {e['path'].rsplit('/', 1)[0] for e in codebooks}
  bias = sum(e['nbytes'] for e in index['entries'] if e['path'].rsplit('/', 1)[0] in modules and
             e['path'].endswith('/bias'))  # fmt: skip
  scope = os.path.getsize(artifact / 'codes.bin') + os.path.getsize(artifact / 'codebooks.bin') + bias
  assert scope == report['compress']['measured_bytes'] <= report['compress']['scope_fp32_bytes'] // 28

  # Calibration on top (the same workdir: load, quantize and compress are reused): the trained codebooks are
  # written on the int8 grid (a float astype to int8 would zero them), close to the compressed ones.
  _, before = storage.load(str(artifact))
  r = helpers.run_main(tmp_path, *args, "--config.stages=('load','quantize','compress','calibrate')",
                       '--config.calibrate.steps=2', '--config.calibrate.lr=1e-3', config=helpers.XL_RUNLOCAL,
                       timeout=900)  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  _, after = storage.load(str(artifact))
  leaves = jax.tree_util.tree_leaves_with_path(after.variables()['params'])
  checked = 0
  for path, cb in leaves:
    keys = [str(k.key) for k in path]
    if keys[-1] != 'codebooks':
      continue
    alive = tree_utils.get_path(after.variables()['quant'], keys[:-1] + ['alive'])
    old = tree_utils.get_path(before.variables()['params'], keys)
    live = np.asarray(alive)[..., None] & np.ones_like(cb, bool)
    step = np.abs(
      cb[live] - np.asarray(codebook_values.round_codebooks(jnp.asarray(cb), 'int8', jnp.asarray(alive)))[live]
    )
    assert step.max() == 0.0, keys  # already on its int8 grid
    rel = np.linalg.norm(cb[live] - old[live]) / np.linalg.norm(old[live])
    assert 0.0 < rel < 0.2, (keys, rel)  # trained a little, not zeroed
    checked += 1
  assert checked == 60
