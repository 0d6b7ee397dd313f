"""Codebook compression: importance, removal paths, re-assignment, allocation, storage and the stage."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpq_jax import tree_utils
from dpq_jax.quant import allocation, compress, kmeans, layers, packing, pq, statistics, storage, surgery
from tests import helpers


def _fit(in_f=64, out_f=96, k=16, d=4, seed=0):
  kernel = helpers.heavy_tailed((in_f, out_f), seed)
  cb, codes, _ = pq.fit(jnp.asarray(kernel), pq.CodebookSpec(k, d), jax.random.key(seed), iters=4)
  return kernel, np.asarray(cb), np.asarray(codes)


def test_importance_is_weighted_bincount():
  codes = np.random.default_rng(0).integers(0, 8, (3, 50))
  weights = np.random.default_rng(1).random((3, 50)).astype(np.float32)
  got = compress.importance(jnp.asarray(codes), 8, jnp.asarray(weights))
  want = np.stack([np.bincount(c, w, minlength=8) for c, w in zip(codes, weights)])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_array_equal(
    compress.importance(jnp.asarray(codes), 8), [np.bincount(c, minlength=8) for c in codes]
  )


@pytest.mark.parametrize('merge', [False, True])
def test_path_removes_lowest_importance_first_to_least_increase(merge):
  kernel, cb, codes = _fit()
  x = pq.to_subvectors(jnp.asarray(kernel), 4)
  path = compress.removal_path(x, cb, codes, merge=merge)
  w, m = (np.asarray(a, np.float64) for a in compress.atoms(x, cb, codes))
  np.testing.assert_allclose(path.importance, np.stack([np.bincount(c, minlength=16) for c in codes]))
  pos = m.copy()
  for c in range(cb.shape[0]):  # numpy replay of the rule, one codebook at a time
    wc, mc, pc, alive = w[c].copy(), m[c].copy(), pos[c].copy(), np.ones(16, bool)
    for t in range(15):
      k, s = path.removed[c, t], path.target[c, t]
      assert alive[k] and wc[k] == wc[alive].min(), (c, t)  # the lowest current importance goes first
      others = alive & (np.arange(16) != k)
      if merge:
        inc = wc[k] * wc / np.maximum(wc[k] + wc, 1e-30) * ((mc[k] - mc) ** 2).sum(-1)
      else:
        inc = wc[k] * (((mc[k] - pc) ** 2).sum(-1) - ((mc[k] - pc[k]) ** 2).sum())
      inc[~others] = np.inf
      assert others[s] and inc[s] <= inc.min() + 1e-6 * abs(inc.min()) + 1e-12, (c, t)
      np.testing.assert_allclose(path.cost[c, t], inc[s], rtol=2e-3, atol=1e-9)
      mc[s] = (wc[k] * mc[k] + wc[s] * mc[s]) / max(wc[k] + wc[s], 1e-30) if wc[k] + wc[s] > 0 else mc[s]
      if merge:
        pc[s] = mc[s]
      wc[s] += wc[k]
      wc[k] = 0
      alive[k] = False


def _greedy_ward(w, m):
  """Plain greedy Ward agglomeration of one codebook's atoms (float64, the full pair matrix every step), with
  ward.greedy_path's rules: atoms of no weight first, in index order, to the nearest atom of positive weight
  (none: atom 0 stays); then the least (cost, a, b) pair, the lower weight dying (ties: the higher index)."""
  w, m = np.asarray(w, np.float64).copy(), np.asarray(m, np.float64).copy()
  empty = w <= 0
  empty[0] &= not empty.all()
  steps = []
  for z in np.nonzero(empty)[0]:
    d2 = ((m[z] - m) ** 2).sum(-1)
    d2[empty] = np.inf
    steps.append((z, d2.argmin(), 0.0))
  alive = ~empty
  while alive.sum() > 1:
    cost = w[:, None] * w[None] / np.maximum(w[:, None] + w[None], 1e-300) * ((m[:, None] - m[None]) ** 2).sum(-1)
    cost[~(alive[:, None] & alive[None])] = np.inf
    np.fill_diagonal(cost, np.inf)
    a, b = np.unravel_index(cost.argmin(), cost.shape)  # row-major: the least cost, then the least a, then b
    dead, survivor = (a, b) if w[a] < w[b] or (w[a] == w[b] and a > b) else (b, a)
    m[survivor] = (w[dead] * m[dead] + w[survivor] * m[survivor]) / (w[dead] + w[survivor])
    w[survivor] += w[dead]
    alive[dead] = False
    steps.append((dead, survivor, cost[a, b]))
  return [np.array(col) for col in zip(*steps)]


def _random_atoms(num, k, d, seed):
  """Atoms w [num, k] (integer counts 0..4: ties and zeros), m [num, k, d]; codebook 0 without any weight,
  codebook 1 with a single weighted atom, codebook 2 with a duplicated centroid (a free merge)."""
  rng = np.random.default_rng(seed)
  w = rng.integers(0, 5, (num, k)).astype(np.float32)
  m = rng.standard_normal((num, k, d)).astype(np.float32)
  w[0] = 0
  w[1] = 0
  w[1, 3] = 2
  m[2, 5] = m[2, 9]
  return w, m


@pytest.mark.parametrize('k,d', [(16, 2), (32, 3), (16, 8), (32, 5)])
def test_cost_order_is_the_greedy_ward_agglomeration(k, d):
  w, m = _random_atoms(12, k, d, seed=k + d)
  path = compress.paths_of_atoms(w, m, order='cost', chunk=8)  # two chunks, the second padded
  for c in range(len(w)):
    removed, target, cost = _greedy_ward(w[c], m[c])
    np.testing.assert_array_equal(path.removed[c], removed, err_msg=f'codebook {c}')
    np.testing.assert_array_equal(path.target[c], target, err_msg=f'codebook {c}')
    np.testing.assert_allclose(path.cost[c], cost, rtol=1e-5, atol=1e-12, err_msg=f'codebook {c}')
  np.testing.assert_array_equal(path.importance, w)
  with pytest.raises(ValueError, match="order='cost'.*merge=True"):
    compress.paths_of_atoms(w, m, merge=False, order='cost')
  with pytest.raises(ValueError, match="order='magic': expected one of importance, cost"):
    compress.paths_of_atoms(w, m, order='magic')


def test_cost_order_never_removes_a_costlier_codeword_before_a_cheaper_one():
  """On k-means codebooks with usage counts: replayed in numpy, every step merges a live pair of least Ward
  increase over all live pairs, so the step costs never decrease (Ward's linkage has no inversions)."""
  kernel, cb, codes = _fit(64, 256, 32, 4, seed=5)
  codes = np.where(np.isin(codes, (3, 17)), codes + 1, codes)  # codewords 3 and 17 unused: removed first, free
  x = pq.to_subvectors(jnp.asarray(kernel), 4)
  path = compress.removal_path(x, cb, codes, order='cost')
  w, m = (np.asarray(a, np.float64) for a in compress.atoms(x, cb, codes))
  assert (w[:, [3, 17]] == 0).all() and (path.cost[:, :2] == 0).all()
  for c in range(cb.shape[0]):
    wc, mc, alive = w[c].copy(), m[c].copy(), np.ones(32, bool)
    for t in range(31):
      k, s = path.removed[c, t], path.target[c, t]
      inc = wc[:, None] * wc[None] / np.maximum(wc[:, None] + wc[None], 1e-30) * ((mc[:, None] - mc[None]) ** 2).sum(-1)
      inc[~(alive[:, None] & alive[None])] = np.inf
      np.fill_diagonal(inc, np.inf)
      assert alive[k] and alive[s] and k != s, (c, t)
      assert inc[k, s] <= inc.min() * (1 + 1e-5) + 1e-12, (c, t, inc[k, s], inc.min())
      np.testing.assert_allclose(path.cost[c, t], inc[k, s], rtol=1e-4, atol=1e-12)
      if wc[k] > 0:
        mc[s] = (wc[k] * mc[k] + wc[s] * mc[s]) / (wc[k] + wc[s])
      wc[s] += wc[k]
      alive[k] = False
  steps = np.diff(path.cost, axis=1)
  assert (steps >= -1e-5 * path.cost[:, 1:]).all(), steps.min()
  before = compress.removal_path(x, cb, codes)  # order='importance': no such order
  assert (np.diff(before.cost, axis=1) < 0).any()


def test_cost_order_distorts_less_than_importance_order():
  """64 codebooks of 256 clustered points, K=32 cut to 8: the greedy Ward path's estimated distortion (its
  step costs) and the realised squared error are both below the lowest-importance-first path's."""
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((64, 12, 4))  # 12 clusters per codebook
  x = centres[np.arange(64)[:, None], rng.integers(0, 12, (64, 256))] + 0.15 * rng.standard_normal((64, 256, 4))
  x = jnp.asarray(x, jnp.float32)
  fit = kmeans.kmeans(x, 32, jax.random.key(0), iters=5)
  cb, codes = fit.codebooks, fit.codes
  live = jnp.full((64,), 8)
  got = {}
  for order in ('importance', 'cost'):
    path = compress.removal_path(x, cb, codes, order=order)
    out = compress.realize(x, cb, codes, path, live, lloyd_steps=0)
    realised = float(jnp.sum(jnp.square(x - jnp.take_along_axis(out.codebooks, out.codes[..., None], axis=1))))
    got[order] = (float(np.sum(np.asarray(path.cost)[:, :24])), realised)
  message = ', '.join(f'{o}: steps to K=8 {s:.2f}, realised {r:.2f}' for o, (s, r) in got.items())
  assert got['cost'][0] <= got['importance'][0] and got['cost'][1] <= got['importance'][1], message


def test_bad_order_fails_the_check_with_one_line():
  from configs import common
  from dpq_jax.stages import compress as compress_stage

  config = common.base_config()
  assert compress_stage.check(config) == []
  config.compress.order = 'magic'
  assert compress_stage.check(config) == ["config.compress.order='magic': expected one of importance, cost"]
  config.compress.order = 'cost'
  assert compress_stage.check(config) == []
  config.compress.merge = False
  (line,) = compress_stage.check(config)
  assert "config.compress.order='cost'" in line and 'merge=False' in line and 'merge=True' in line


def _np_nearest(x, cb, alive):
  d2 = ((x[:, :, None, :].astype(np.float64) - cb[:, None].astype(np.float64)) ** 2).sum(-1)
  d2[~np.broadcast_to(alive[:, None, :], d2.shape)] = np.inf
  return d2.argmin(-1)


@pytest.mark.parametrize('merge', [False, True])
def test_reassignment_is_to_the_nearest_survivor_and_distinct_codewords_never_grow(merge):
  kernel, cb, codes = _fit(seed=1)
  x = pq.to_subvectors(jnp.asarray(kernel), 4)
  path = compress.removal_path(x, cb, codes, merge=merge)
  before = min(len(np.unique(c, axis=0)) for c in cb)
  distinct = []
  for live in (16, 12, 7, 3, 1):
    num_live = np.full(cb.shape[0], live)
    num_live[0] = 16  # a codebook left whole
    out = compress.realize(x, cb, codes, path, jnp.asarray(num_live), merge=merge)
    got_cb, got_codes, alive = (np.asarray(a) for a in out)
    np.testing.assert_array_equal(alive, np.arange(16)[None] < num_live[:, None])
    np.testing.assert_array_equal(got_codes, _np_nearest(np.asarray(x), got_cb, alive))
    # Survivors are original codewords (prune) or centroids of merged ones; dead rows never used.
    assert (got_codes < num_live[:, None]).all()
    if not merge:
      for c in range(cb.shape[0]):
        assert all(any(np.array_equal(row, orig) for orig in cb[c]) for row in got_cb[c][alive[c]])
    distinct.append(max(len(np.unique(got_cb[c][alive[c]], axis=0)) for c in range(1, cb.shape[0])))
    assert distinct[-1] <= min(live, before)
  assert distinct == sorted(distinct, reverse=True)


def test_masked_assign_matches_numpy_and_lloyd_keeps_dead_rows_dead():
  x = helpers.heavy_tailed((3, 200, 4), 2)
  cb = helpers.heavy_tailed((3, 8, 4), 3)
  alive = np.random.default_rng(0).random((3, 8)) < 0.5
  alive[:, 2] = True
  np.testing.assert_array_equal(kmeans.assign(x, cb, alive=alive), _np_nearest(x, cb, alive))
  np.testing.assert_array_equal(kmeans.assign(x, cb), _np_nearest(x, cb, np.ones((3, 8), bool)))
  kernel, cb, codes = _fit(seed=4)
  sub = pq.to_subvectors(jnp.asarray(kernel), 4)
  path = compress.removal_path(sub, cb, codes)
  live = jnp.full((cb.shape[0],), 5)
  out0 = compress.realize(sub, cb, codes, path, live, lloyd_steps=0)
  out3 = compress.realize(sub, cb, codes, path, live, lloyd_steps=3)
  assert (np.asarray(out3.codes) < 5).all()
  err = lambda o: pq.rel_mse(kernel, pq.decode(o.codebooks, o.codes))  # noqa: E731
  assert err(out3) <= err(out0) * (1 + 1e-5)


def test_pqdense_dynamic_respects_alive_mask():
  spec = pq.CodebookSpec(8, 4)
  kernel = jnp.asarray(helpers.heavy_tailed((16, 12), 8))
  cb, codes, _ = pq.fit(kernel, spec, jax.random.key(0), iters=3)
  layer = layers.PQDense(12, spec=spec, assignment='dynamic')
  xin = jnp.asarray(helpers.heavy_tailed((5, 16), 9))
  alive = np.arange(8)[None] < np.array([3, 8, 1, 5])[:, None]
  params = {'codebooks': cb, 'bias': jnp.zeros(12)}
  quant = {'codes': codes.astype(np.uint8), 'latent': kernel, 'alive': jnp.asarray(alive)}
  y, state = layer.apply({'params': params, 'quant': quant}, xin, mutable=['quant'])
  want = _np_nearest(np.asarray(pq.to_subvectors(kernel, 4)), np.asarray(cb), alive)
  np.testing.assert_array_equal(state['quant']['codes'], want)
  dense = nn.Dense(12).apply({'params': {'kernel': pq.decode(cb, want), 'bias': params['bias']}}, xin)
  np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-6)


def test_allocate_meets_target_and_beats_a_uniform_cut():
  rng = np.random.default_rng(0)
  num, k = 40, 16
  scale = rng.random((num, 1)) * 10  # codebooks of very different sensitivity
  costs = np.sort(rng.random((num, k - 1)), axis=1) * scale  # increasing marginal cost along each path
  nbytes = np.broadcast_to(compress.codebook_bytes(np.arange(k, 0, -1), 64, 4, 2, 2), (num, k))
  target = int(nbytes[:, 0].sum() * 0.45)
  alloc = compress.allocate(costs, nbytes, target)
  chosen = nbytes[np.arange(num), k - alloc.num_live]
  assert alloc.bytes == chosen.sum() <= target
  dist = np.concatenate([np.zeros((num, 1)), np.cumsum(costs, 1)], 1)
  assert alloc.distortion == pytest.approx(dist[np.arange(num), k - alloc.num_live].sum())
  uniform = next(r for r in range(k) if nbytes[:, r].sum() <= target)  # fewest removals for all that fit
  assert alloc.distortion < dist[:, uniform].sum()
  assert alloc.num_live[scale[:, 0].argmax()] >= alloc.num_live[scale[:, 0].argmin()]
  with pytest.raises(compress.BudgetError, match=f'minimum reachable is {int(nbytes[:, -1].sum())} bytes'):
    compress.allocate(costs, nbytes, int(nbytes[:, -1].sum()) - 1)


def _layers(num=3, k=32, d=8, in_f=64, out_f=128):
  out = []
  for i in range(num):
    kernel, cb, codes = _fit(in_f, out_f, k, d, seed=10 + i)
    out.append(allocation.Layer(f'blocks_{i}/mlp/fc1', cb, codes, kernel, bias_bytes=4 * out_f))
  return out


def test_budget_met_exactly_on_disk_and_roundtrip(tmp_path):
  lays = _layers()
  fp32 = sum(4 * lay.reference.size + lay.bias_bytes for lay in lays)
  target = fp32 // 12
  compressed, info = allocation.compress_layers(lays, target, lloyd_steps=1, progress=False)
  assert info['predicted_bytes'] <= target
  params, quant = {}, {}
  for lay, c in zip(lays, compressed):
    path = tuple(lay.name.split('/'))
    tree_utils.set_path(params, path + ('codebooks',), np.asarray(c.codebooks))
    tree_utils.set_path(params, path + ('bias',), np.zeros(lay.reference.shape[1], np.float32))
    tree_utils.set_path(quant, path + ('codes',), np.asarray(c.codes).astype(np.uint8))
    tree_utils.set_path(quant, path + ('alive',), np.asarray(c.alive))
  q = surgery.QuantizedParams.from_variables(params, quant, rows=info['rows'])
  sizes = storage.save(str(tmp_path / 'q'), q, {'name': 'test'})
  index = json.loads((tmp_path / 'q' / 'index.json').read_text())
  bias = sum(e['nbytes'] for e in index['entries'] if e['path'].endswith('/bias'))
  on_disk = os.path.getsize(tmp_path / 'q' / 'codes.bin') + os.path.getsize(tmp_path / 'q' / 'codebooks.bin') + bias
  assert sizes['codes'] + sizes['codebooks'] + bias == on_disk == info['predicted_bytes'] <= target
  # codes.bin holds one stream per codebook at ceil(log2 K') bits; codebooks.bin K' rows of d fp16 + K'.
  live = np.concatenate([np.asarray(c.alive).sum(1) for c in compressed])
  assert sizes['codes'] == sum((128 * packing.index_bits(int(n)) + 7) // 8 for n in live)
  assert sizes['codebooks'] == int(live.sum()) * 8 * 2 + 2 * live.size
  assert live.min() < 32 and live.mean() < 32
  _, back = storage.load(str(tmp_path / 'q'))
  for lay, c in zip(lays, compressed):
    path = lay.name.split('/')
    got = back.variables()['quant']
    for p in path:
      got = got[p]
    np.testing.assert_array_equal(got['alive'], c.alive)
    np.testing.assert_array_equal(got['codes'], c.codes)
    cb = back.variables()['params']
    for p in path:
      cb = cb[p]
    np.testing.assert_array_equal(cb['codebooks'][np.asarray(c.alive)], np.asarray(c.codebooks)[np.asarray(c.alive)])
    np.testing.assert_array_equal(pq.decode(cb['codebooks'], got['codes']), pq.decode(c.codebooks, c.codes))


def test_infeasible_budget_names_the_minimum():
  lays = _layers(num=2)
  per_codebook = 2 * 8 * 2 + (128 * 1 + 7) // 8 + 2  # 2 live fp16 rows of 8, 1-bit codes, K'
  minimum = sum(lay.codebooks.shape[0] for lay in lays) * per_codebook + sum(lay.bias_bytes for lay in lays)
  with pytest.raises(compress.BudgetError, match=f'below the minimum reachable size of {minimum} bytes'):
    allocation.compress_layers(lays, minimum - 1, min_live=2, progress=False)
  allocation.compress_layers(lays, minimum, min_live=2, lloyd_steps=0, progress=False)  # exactly reachable


def test_sensitivity_weights_move_bytes_to_sensitive_positions():
  kernel, cb, codes = _fit(64, 128, 32, 8, seed=20)
  energy = np.ones(64, np.float32)
  energy[:32] = 100.0  # the first 4 of 8 positions see 100x the input energy
  lay = allocation.Layer('a', cb, codes, kernel, energy=energy)
  compressed, info = allocation.compress_layers([lay], 8 * 4096 // 12, lloyd_steps=0, progress=False)
  live = np.asarray(compressed[0].alive).sum(1)
  assert live[:4].min() > live[4:].max(), live
  plain, _ = allocation.compress_layers(
    [allocation.Layer('a', cb, codes, kernel)], 8 * 4096 // 12, lloyd_steps=0, progress=False
  )
  assert not np.array_equal(np.asarray(plain[0].alive).sum(1), live)


def _main(workdir, *overrides, stages="('load','quantize','compress')"):
  return helpers.run_main(workdir, '--config.quant.kmeans_iters=2', '--config.quant.k=16', '--config.quant.d=4',
                          f'--config.stages={stages}', *overrides, config=helpers.XL_RUNLOCAL, timeout=900)  # fmt: skip


def _scope_bytes(artifact):
  index = json.loads((artifact / 'index.json').read_text())
  modules = {e['path'].rsplit('/', 1)[0] for e in index['entries'] if e['path'].endswith('/codebooks')}
  bias = sum(
    e['nbytes'] for e in index['entries'] if e['path'].rsplit('/', 1)[0] in modules and e['path'].endswith('bias')
  )
  return os.path.getsize(artifact / 'codes.bin') + os.path.getsize(artifact / 'codebooks.bin') + bias, len(modules)


@pytest.mark.slow  # three CLI runs: ~70 s of CPU
def test_compress_stage_end_to_end_and_rerun(tmp_path):
  r = _main(tmp_path, '--config.compress.budget=28')
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads((tmp_path / 'report.json').read_text())
  scope, num_layers = _scope_bytes(tmp_path / 'quantized')
  assert num_layers == 60
  fp32 = report['compress']['scope_fp32_bytes']
  assert fp32 == 4 * report['quantized_weights'] + 4 * sum(r['shape'][0] for r in report['layers'])
  assert scope == report['compress']['measured_bytes'] <= fp32 // 28
  total = sum(os.path.getsize(tmp_path / 'quantized' / f) for f in os.listdir(tmp_path / 'quantized'))
  assert report['bytes']['total'] == total
  assert 0 < report['compress']['code_entropy_bits_per_weight'] <= report['index_bits_per_weight'] < 1.0
  assert 0 < report['weight_rel_mse'] < 1
  # Re-runnable on the artifact alone, tighter budget: rewritten in place, smaller.
  r = _main(tmp_path, '--config.compress.budget=32', stages="('load','compress')")
  assert r.returncode == 0, r.stderr[-3000:]
  again, _ = _scope_bytes(tmp_path / 'quantized')
  assert again <= fp32 // 32 < scope
  # A budget below the minimum fails with the minimum named and the artifact untouched (refused from the model's
  # shapes before any work: stages/compress.check_model).
  before = (tmp_path / 'quantized' / 'codes.bin').read_bytes()
  r = _main(tmp_path, '--config.compress.budget=5000', stages="('load','compress')")
  assert r.returncode == 2 and 'below the smallest reachable size' in r.stderr, r.stderr[-2000:]
  assert (tmp_path / 'quantized' / 'codes.bin').read_bytes() == before


def test_compress_bad_config_fails_before_work(tmp_path):
  workdir = tmp_path / 'w'
  r = _main(workdir, '--config.compress.budget=0.5')
  assert r.returncode == 2, r.stderr[-2000:]
  assert 'config.compress.budget=0.5: expected a compression ratio > 1' in r.stderr and 'Traceback' not in r.stderr
  r = _main(workdir, '--config.compress.importance=magic')
  assert r.returncode == 2 and "config.compress.importance='magic'" in r.stderr
  assert not workdir.exists()


def test_activation_energy_is_the_mean_squared_layer_input(tiny_dit):
  import types

  from dpq_jax.models import dit

  factory = layers.dense_factory(layers.QuantRules(()))  # PQDense everywhere, acting as nn.Dense (no rule matches)
  name = 'DiT-2x64x2/4'  # depth 2, width 64: compiles in seconds (tiny_dit's model)
  model = dit.create_model(name, input_size=8, num_classes=10, dense=factory)
  _, params = tiny_dit
  spec = types.SimpleNamespace(input_size=8, in_channels=4, num_classes=10)
  energy = statistics.activation_energy(model, {'params': params}, spec, num_batches=2, seed=3, batch_size=2)
  assert energy['blocks_0/mlp/fc2'].shape == (256,) and 'final_layer/linear' in energy
  # Independent: fc2's input is gelu_tanh(fc1's output), which capture_intermediates records.
  want = 0.0
  key = jax.random.key(3)
  for i in range(2):  # the same random batches as activation_energy draws
    kx, kt, ky = jax.random.split(jax.random.fold_in(key, i), 3)
    x = jax.random.normal(kx, (2, 8, 8, 4))
    t = jax.random.randint(kt, (2,), 0, 1000)
    y = jax.random.randint(ky, (2,), 0, 11)
    _, inter = jax.jit(lambda *a: model.apply({'params': params}, *a, capture_intermediates=True))(x, t, y)
    h = inter['intermediates']['blocks_0']['mlp']['fc1']['__call__'][0]
    want = want + np.mean(np.square(np.asarray(nn.gelu(h, approximate=True)).reshape(-1, 256)), axis=0) / 2
  np.testing.assert_allclose(energy['blocks_0/mlp/fc2'], want, rtol=1e-5, atol=1e-8)


def test_budget_forms_take_bytes_then_bits_then_ratio():
  import ml_collections

  cfg = ml_collections.ConfigDict({'budget': 24.0, 'budget_bytes': 0, 'budget_bits': 0.0})
  assert allocation.target_bytes(cfg, fp32_bytes=2400, quantized_weights=500) == 100
  cfg.budget_bits = 0.5
  assert allocation.target_bytes(cfg, 2400, 500) == 31  # 0.5 bit x 500 weights = 31.25 bytes
  cfg.budget_bytes = 77
  assert allocation.target_bytes(cfg, 2400, 500) == 77


def test_relative_distortion_makes_the_allocation_blind_to_a_layers_scale():
  """Scaling one layer's weights (and so its codebooks) by 8 changes nothing about which codewords are
  worth keeping relative to that layer: with distortion='relative' the per-codebook K' stay the same; with
  'absolute' the scaled layer's squared errors are 64x larger and it takes bytes from the others. (A power
  of two scales every float exactly, so the usage ties break the same way.)"""
  base = _layers(num=2)
  big = base[:1] + [dataclasses.replace(base[1], codebooks=8 * base[1].codebooks, reference=8 * base[1].reference)]
  fp32 = sum(4 * lay.reference.size + lay.bias_bytes for lay in base)
  live = {}
  for mode in ('absolute', 'relative'):
    for name, lays in (('base', base), ('big', big)):
      _, info = allocation.compress_layers(lays, fp32 // 12, lloyd_steps=0, progress=False, distortion=mode)
      live[mode, name] = [row['k_live'] for row in info['rows']]
  assert live['relative', 'base'] == live['relative', 'big']
  assert live['absolute', 'big'][1] > live['absolute', 'base'][1]
  assert live['absolute', 'big'][0] < live['absolute', 'base'][0]
