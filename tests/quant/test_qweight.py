"""Quantized weights as pytrees (quant/qweight.py, surgery.QuantizedParams): the pinned layout of a quantized
tiny DiT, gather/scatter against real PQDense variables, bit-exact storage round trips (artifacts written
before PQWeight included), jax transformations, and device_put on an 8-device CPU mesh.

The mesh test reruns itself in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 unless
this process already has 8 devices (as test_calibrate_sharded.py: the flag never enters this process's
environment, so later subprocesses of the suite keep one device).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpq_jax import integrity
from dpq_jax.calibrate import train_step as step_lib
from dpq_jax.models import dit
from dpq_jax.models.load import randomize_zero_init
from dpq_jax.quant import equal_bytes, layers, pq, qweight, storage, surgery
from dpq_jax.quant.qweight import PQWeight, RTNWeight
from tests import helpers
from tests.calibrate import tiny as tc

# Written by storage.save at commit bd0bf23, before PQWeight (QuantizedParams held params/quant dicts):
# a DiT(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=3) with
# attn/qkv and mlp/fc1 PQ K=16 d=4 with channel scales, compressed (alive); attn/proj and mlp/fc2 VQ K=16 d=4;
# adaLN_modulation RTN 3 bits; codebooks stored as float16 or int8.
ARTIFACTS_V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'artifact_v1')
FILES = ('codes.bin', 'codebooks.bin', 'full_precision.bin', 'index.json')
# PQ K=16 d=4 everywhere but blocks_1/mlp/fc2, VQ (one shared codebook).
RULES = layers.QuantRules(
  (('blocks_1/mlp/fc2', pq.CodebookSpec(16, 4, shared=True)), (layers.DEFAULT_PATTERN, pq.CodebookSpec(16, 4)))
)


def _sig(x) -> tuple[tuple[int, ...], str]:
  return tuple(x.shape), str(x.dtype)


@pytest.fixture(scope='module')
def tiny():
  """(fp module, fp params, QuantizedParams): quantize_params on a 2-block DiT of width 32, channel scales."""
  fp = dit.DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=tc.NUM_CLASSES)
  params = randomize_zero_init(dit.init_params(fp, jax.random.key(0)), jax.random.key(1), std=0.1)
  params = jax.tree.map(np.asarray, params)
  q = surgery.quantize_params(params, RULES, jax.random.key(2), iters=2, channel_scale=True, progress=False)
  return fp, params, q


def _inputs():
  return jnp.ones((2, 8, 8, 4)) * 0.3, jnp.array([1, 500]), jnp.array([3, tc.NUM_CLASSES])


def test_quantized_tiny_dit_pqweights_pinned(tiny):
  fp, params, q = tiny
  per_block = {  # [num_codebooks, K, d], [num_subvectors, out_features], alive, [out_features]
    'attn/qkv': PQWeight(((8, 16, 4), 'float32'), ((8, 96), 'uint8'), None, ((96,), 'float32')),
    'attn/proj': PQWeight(((8, 16, 4), 'float32'), ((8, 32), 'uint8'), None, ((32,), 'float32')),
    'mlp/fc1': PQWeight(((8, 16, 4), 'float32'), ((8, 128), 'uint8'), None, ((128,), 'float32')),
    'mlp/fc2': PQWeight(((32, 16, 4), 'float32'), ((32, 32), 'uint8'), None, ((32,), 'float32')),
    'adaLN_modulation': PQWeight(((8, 16, 4), 'float32'), ((8, 192), 'uint8'), None, ((192,), 'float32')),
  }
  want = {f'blocks_{b}/{name}': w for b in range(2) for name, w in sorted(per_block.items())}
  want['blocks_1/mlp/fc2'] = PQWeight(((1, 16, 4), 'float32'), ((32, 32), 'uint8'), None, ((32,), 'float32'))
  assert {name: jax.tree.map(_sig, w) for name, w in q.pq.items()} == want
  assert list(q.pq) == sorted(want) == [r['name'] for r in q.rows] and q.rtn == {}
  for row in q.rows:
    w = q.pq[row['name']]
    assert [w.out_features, w.in_features] == row['shape'] and (w.codebook_size, w.subvector_dim) == (16, 4)
    assert w.index_bits == row['index_bits'] == 4
    assert w.spec == RULES.spec_for(row['name']) and w.shared == (row['name'] == 'blocks_1/mlp/fc2')
  # The float leftovers: every bias, no quantized kernel, no PQ variable; other layers keep their kernels.
  for name in q.pq:
    node = q.fp
    for k in name.split('/'):
      node = node[k]
    assert set(node) == {'bias'}
  assert _sig(q.fp['final_layer']['linear']['kernel']) == ((32, 2 * 2 * 8), 'float32')
  assert _sig(q.fp['t_embedder']['mlp_0']['kernel']) == ((256, 32), 'float32')
  # The report rows ride along as static data: no leaf.
  leaves = jax.tree.leaves(q)
  assert len(leaves) == len(jax.tree.leaves(q.fp)) + 3 * len(q.pq)
  # Both runtimes agree: PQDense decoding on the fly, the plain DiT on the decoded kernels.
  x, t, y = _inputs()
  a = fp.clone(dense=layers.dense_factory(RULES)).apply(q.variables(), x, t, y)
  b = fp.apply({'params': q.dense_params()}, x, t, y)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  w = q.pq['blocks_0/mlp/fc1']
  np.testing.assert_array_equal(q.dense_params()['blocks_0']['mlp']['fc1']['kernel'], w.decode())
  np.testing.assert_array_equal(w.decode(), pq.decode(w.codebooks, w.codes) * w.scale)


def test_gather_and_scatter_match_the_variables_of_a_real_pqdense_model(tiny):
  fp, params, _ = tiny
  x, t, y = _inputs()
  variables = fp.clone(dense=layers.dense_factory(RULES)).init(jax.random.key(3), x, t, y)
  params, quant = variables['params'], variables['quant']
  # A per-output-channel scale and an alive mask where PQDense reads them.
  params['blocks_0']['attn']['qkv']['scale'] = np.linspace(0.5, 1.5, 96, dtype=np.float32)
  quant['blocks_1']['mlp']['fc1']['alive'] = np.arange(16)[None] < np.array([[16], [3], [1], [9], [16], [2], [5], [7]])
  names = [
    f'blocks_{b}/{n}' for b in range(2) for n in ('adaLN_modulation', 'attn/proj', 'attn/qkv', 'mlp/fc1', 'mlp/fc2')
  ]
  assert qweight.modules(params) == names
  weights = qweight.gather(params, quant)
  assert list(weights) == names
  for name, w in weights.items():
    p, qn = params, quant
    for k in name.split('/'):
      p, qn = p[k], qn[k]
    assert w.codebooks is p['codebooks'] and w.codes is qn['codes']  # the arrays themselves, no copy
    assert w.scale is p.get('scale') and w.alive is qn.get('alive')
  assert weights['blocks_0/attn/qkv'].scale is not None and weights['blocks_1/mlp/fc1'].alive is not None
  # split + scatter gives the very same trees back; scatter copies the dicts, never changes its inputs.
  fp_left, split_weights = qweight.split(params, quant)
  assert jax.tree.structure(split_weights) == jax.tree.structure(weights)
  assert not any(k in {'codebooks', 'codes', 'scale'} for p, _ in jax.tree_util.tree_leaves_with_path(fp_left)
                 for k in [p[-1].key])  # fmt: skip
  before = jax.tree.structure(fp_left)
  back_params, back_quant = qweight.scatter(split_weights, fp_left, {})
  assert jax.tree.structure(fp_left) == before
  for got, want in ((back_params, params), (back_quant, quant)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert all(a is b for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  q = surgery.QuantizedParams.from_variables(params, quant)
  v = q.variables()
  assert jax.tree.structure(v) == jax.tree.structure(variables)
  assert all(a is b for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(variables)))
  # A weight without scale or alive removes stale ones; the dense kernel of a layer it replaces goes.
  w = weights['blocks_0/attn/qkv'].replace(scale=None)
  p2, q2 = qweight.scatter({'blocks_0/attn/qkv': w}, {'blocks_0': {'attn': {'qkv': {'kernel': 1, 'bias': 2}}}}, {})
  assert p2 == {'blocks_0': {'attn': {'qkv': {'bias': 2, 'codebooks': w.codebooks}}}}
  assert q2 == {'blocks_0': {'attn': {'qkv': {'codes': w.codes}}}}
  # Latent weights are training state: a QuantizedParams refuses them.
  for assignment, match in (('dynamic', 'not codes or alive masks'), ('ste', 'a latent weight in params')):
    p_l, q_l = step_lib.attach_latent(params, quant, tiny[1], assignment)
    with pytest.raises(ValueError, match=match):
      surgery.QuantizedParams.from_variables(p_l, q_l)


def _live(q: surgery.QuantizedParams) -> surgery.QuantizedParams:
  """q with the dead codewords of compressed layers zeroed: their values are never stored nor used."""
  dead_zero = lambda w: w if w.alive is None else w.replace(codebooks=np.where(w.alive[..., None], w.codebooks, 0))  # noqa: E731
  return q.replace(pq={name: dead_zero(w) for name, w in q.pq.items()})


def _assert_bit_exact(got: surgery.QuantizedParams, want: surgery.QuantizedParams) -> None:
  assert jax.tree.structure(got.replace(rows=want.rows)) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(_live(got)), jax.tree.leaves(_live(want))):
    assert _sig(a) == _sig(b)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('variant', ['pq', 'compressed', 'int8', 'rtn'])
def test_storage_round_trip_is_bit_exact(tiny, tmp_path, variant):
  fp, params, q = tiny
  codebook_dtype = 'int8' if variant == 'int8' else 'float16'
  if variant == 'compressed':
    q = equal_bytes.compress_tree(q, params, sum(r['bytes'] for r in q.rows) // 2, lloyd_steps=1, progress=False)
    assert all(w.alive is not None and w.alive.dtype == bool for w in q.pq.values())
  elif variant == 'int8':
    q = surgery.quantize_params(params, RULES, jax.random.key(2), iters=2, channel_scale=True, codebook_dtype='int8',
                                progress=False)  # fmt: skip
  elif variant == 'rtn':
    q = surgery.quantize_params(params, RULES, jax.random.key(2), method='rtn', rtn_bits=3, progress=False)
    assert q.pq == {} and {name: jax.tree.map(_sig, r) for name, r in q.rtn.items()}['blocks_0/mlp/fc2'] == RTNWeight(
      ((32, 1, 128), 'int32'), ((32, 1, 1), 'float32'), ((32, 1, 1), 'float32'), 3
    )
  sizes = storage.save(str(tmp_path / 'a'), q, {'name': 'tiny'}, codebook_dtype)
  meta, back = storage.load(str(tmp_path / 'a'))
  assert meta == {'name': 'tiny'} and back.rows == []
  _assert_bit_exact(back, q)
  # Written again, the loaded model gives the same files byte for byte.
  assert storage.save(str(tmp_path / 'b'), back, meta, codebook_dtype) == sizes
  for f in FILES:
    assert (tmp_path / 'a' / f).read_bytes() == (tmp_path / 'b' / f).read_bytes(), f


@pytest.mark.parametrize('codebook_dtype', ['float16', 'int8'])
def test_an_artifact_written_before_pqweight_loads_and_rewrites_byte_for_byte(tmp_path, codebook_dtype):
  directory = os.path.join(ARTIFACTS_V1, f'mixed_{codebook_dtype}')
  meta, q = storage.load(directory)
  assert meta == {'name': 'tiny-v1', 'codebook_dtype': codebook_dtype}
  pinned = {name: jax.tree.map(_sig, w) for name, w in q.pq.items()}
  assert pinned == {
    'blocks_0/attn/proj': PQWeight(((1, 16, 4), 'float32'), ((4, 16), 'uint8')),
    'blocks_0/attn/qkv': PQWeight(((4, 16, 4), 'float32'), ((4, 48), 'uint8'), ((4, 16), 'bool'), ((48,), 'float32')),
    'blocks_0/mlp/fc1': PQWeight(((4, 16, 4), 'float32'), ((4, 64), 'uint8'), ((4, 16), 'bool'), ((64,), 'float32')),
    'blocks_0/mlp/fc2': PQWeight(((1, 16, 4), 'float32'), ((16, 16), 'uint8')),
  }
  assert {name: jax.tree.map(_sig, r) for name, r in q.rtn.items()} == {
    'blocks_0/adaLN_modulation': RTNWeight(((96, 1, 16), 'int32'), ((96, 1, 1), 'float32'), ((96, 1, 1), 'float32'), 3)
  }
  assert set(q.fp['blocks_0']['adaLN_modulation']) == set(q.fp['blocks_0']['attn']['qkv']) == {'bias'}
  # The rules it was quantized with run it on the fly, equal to the plain DiT on its decoded kernels.
  rules = layers.QuantRules((
    (r'blocks_0/(attn/qkv|mlp/fc1)', pq.CodebookSpec(16, 4)),
    (r'blocks_0/(attn/proj|mlp/fc2)', pq.CodebookSpec(16, 4, shared=True)),
  ))  # fmt: skip
  model = dit.DiT(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=3)
  x, t, y = jnp.ones((2, 4, 4, 4)) * 0.3, jnp.array([1, 500]), jnp.array([0, 3])
  a = model.clone(dense=layers.dense_factory(rules)).apply(q.variables(), x, t, y)
  b = model.apply({'params': q.dense_params()}, x, t, y)
  assert np.isfinite(np.asarray(b)).all()
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  storage.save(str(tmp_path / 'again'), q, meta, codebook_dtype)
  for f in FILES:
    with open(os.path.join(directory, f), 'rb') as old:
      if f != 'index.json':
        assert (tmp_path / 'again' / f).read_bytes() == old.read(), f
        continue
      # index.json: the same bytes but for the per-file digests that index.json has recorded since (`files`)
      new = json.loads((tmp_path / 'again' / f).read_text())
      files = new.pop('files')
      assert json.dumps(new) == old.read().decode()
      assert sorted(files) == sorted(set(FILES) - {'index.json'})
      for name, record in files.items():
        integrity.check_file(str(tmp_path / 'again' / name), record, 'fix')


def test_jit_and_tree_map_keep_the_types_and_the_rows(tiny):
  _, _, q = tiny
  w = q.pq['blocks_1/mlp/fc2']  # VQ with a channel scale
  np.testing.assert_array_equal(jax.jit(lambda w: w.decode())(w), w.decode())
  traces = []

  def dense(q):
    traces.append(1)
    return q.dense_params()

  jitted = jax.jit(dense)
  want = q.dense_params()
  jax.tree.map(np.testing.assert_array_equal, jitted(q), want)
  as_numpy = jax.tree.map(np.asarray, q)  # new leaves, the same rows: no retrace
  assert isinstance(as_numpy, surgery.QuantizedParams) and as_numpy.rows == q.rows
  assert all(type(v) is PQWeight and v.alive is None for v in as_numpy.pq.values())
  jax.tree.map(np.testing.assert_array_equal, jitted(as_numpy), want)
  assert len(traces) == 1
  # A jitted function returning QuantizedParams: the pytree comes back whole.
  out = jax.jit(lambda q: jax.tree.map(lambda v: v * 2 if jnp.issubdtype(v.dtype, jnp.floating) else v, q))(q)
  assert isinstance(out, surgery.QuantizedParams) and out.rows == q.rows and list(out.pq) == list(q.pq)
  np.testing.assert_array_equal(out.pq['blocks_0/attn/qkv'].codebooks, 2 * q.pq['blocks_0/attn/qkv'].codebooks)
  np.testing.assert_array_equal(out.pq['blocks_0/attn/qkv'].codes, q.pq['blocks_0/attn/qkv'].codes)


def test_device_put_on_an_8_device_mesh():
  """device_put of a QuantizedParams with per-leaf shardings (codebooks and codes split over the mesh along
  their first axis), and a jitted decode of the sharded model."""
  if jax.device_count() < 8:
    return helpers.rerun_with_devices(__file__, 'test_device_put_on_an_8_device_mesh')
  _, _, _, q = tc.tiny_setup()
  mesh = Mesh(np.array(jax.devices()[:8]), ('x',))
  shardings = jax.tree.map(lambda v: NamedSharding(mesh, P('x') if v.ndim and v.shape[0] % 8 == 0 else P()), q)
  assert isinstance(shardings, surgery.QuantizedParams)
  sharded = jax.device_put(q, shardings)
  assert isinstance(sharded, surgery.QuantizedParams) and sharded.rows == q.rows
  for name, w in sharded.pq.items():
    assert type(w) is PQWeight and w.alive is None and w.scale is None
    for got, host in ((w.codebooks, q.pq[name].codebooks), (w.codes, q.pq[name].codes)):  # [8 or 32, ...]
      assert got.sharding == NamedSharding(mesh, P('x')) and len(got.sharding.device_set) == 8
      assert got.addressable_shards[0].data.size == got.size // 8
      np.testing.assert_array_equal(got, host)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(sharded), q)
  replicated = NamedSharding(mesh, P())
  dense = jax.jit(lambda q: q.dense_params(), in_shardings=(shardings,), out_shardings=replicated)(sharded)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(dense), q.dense_params())
