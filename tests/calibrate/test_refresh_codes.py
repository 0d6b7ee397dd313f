"""train_step.refresh_codes (per-layer argmin) against the codes of a dynamic PQDense forward (its former body).

The dynamic assignment depends on the latent weight, scale, codebooks, alive mask and metric of each layer only;
refresh_codes assigns layer by layer instead of running the model. The reference is the model itself:
model.apply(..., mutable=['quant']) of the dynamic (or 'ste') clone, scanned or unrolled, on the same trees.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpq_jax import tree_utils
from dpq_jax.calibrate import train_step as step_lib
from dpq_jax.calibrate import trainable as trainable_lib
from dpq_jax.models import scan as scan_lib
from dpq_jax.quant import layers, packing, pq, surgery
from tests.calibrate.tiny import tiny_data, tiny_setup

K, D = 16, 4


def _quantized(method: str, extras: frozenset, seed: int = 0) -> tuple[dict, dict, dict, layers.QuantRules]:
  """(params, quant, fp params, rules) of the tiny DiT with random codebooks (codes all 0: stale) and the
  calibration's latent weights; extras: 'scale' (per-output-channel, one channel 0), 'alive' (dead codewords),
  'metric' (random whitening factors)."""
  _, _, fp_params, _ = tiny_setup()
  rules = surgery.default_rules(method, K, D)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: x, fp_params)
  quant, metrics = {}, {}
  for path, kernel in surgery.module_kernels(fp_params):
    name = '/'.join(path)
    spec = rules.spec_for(name)
    if spec is None:
      continue
    in_features, out_features = kernel.shape
    num_subvectors = in_features // D
    node = tree_utils.get_path(params, list(path))
    del node['kernel']
    scale = np.ones(out_features, np.float32)
    if 'scale' in extras:
      scale = rng.uniform(0.5, 2.0, out_features).astype(np.float32)
      scale[0] = 0.0  # scaled_target keeps W where a channel's scale is 0
      node['scale'] = scale
    # Codewords near the (scaled) weights, so that the assignment has real choices to make.
    spread = float(np.std(kernel / np.where(scale != 0, scale, 1.0)))
    node['codebooks'] = (spread * rng.standard_normal((spec.num_codebooks(in_features), K, D))).astype(np.float32)
    tree_utils.set_path(quant, list(path) + ['codes'], np.zeros((num_subvectors, out_features), packing.code_dtype(K)))
    if 'alive' in extras:
      live = rng.integers(1, K + 1, spec.num_codebooks(in_features))  # at least one live codeword per codebook
      tree_utils.set_path(quant, list(path) + ['alive'], np.arange(K)[None, :] < live[:, None])
    if 'metric' in extras:
      u = np.eye(D, dtype=np.float32) + 0.5 * rng.standard_normal((num_subvectors, D, D)).astype(np.float32)
      metrics[name] = u
  return params, quant, metrics, rules


def _reference(dynamic_model, params: dict, quant: dict) -> dict:
  """The former refresh_codes: `quant` after one dynamic forward of the model (stacked where it scans)."""
  x, y = tiny_data(1)
  t = jnp.zeros((1,), jnp.int32)
  model, variables, why = scan_lib.runnable(dynamic_model, {'params': params, 'quant': quant})
  assert why is None
  out = jax.jit(lambda v: model.apply(v, jnp.asarray(x), t, jnp.asarray(y), mutable=['quant'])[1]['quant'])(variables)
  return trainable_lib.pick(quant, scan_lib.unstack_blocks(out))


def _codes(quant: dict) -> dict:
  return {
    '/'.join(str(k.key) for k in path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(quant)
    if path[-1].key == 'codes'
  }


@pytest.mark.parametrize(
  'method,extras,assignment,remat',
  [
    ('pq', frozenset(), 'dynamic', False),
    ('pq', frozenset({'scale', 'alive', 'metric'}), 'dynamic', False),
    ('pq', frozenset({'scale', 'alive'}), 'ste', True),
    ('vq', frozenset(), 'dynamic', False),
    ('vq', frozenset({'scale', 'alive', 'metric'}), 'dynamic', True),
  ],
)
def test_refresh_codes_equals_the_dynamic_forward(method, extras, assignment, remat):
  fp, _, _, _ = tiny_setup()
  params, quant, metrics, rules = _quantized(method, extras)
  _, _, fp_params, _ = tiny_setup()
  params, quant = step_lib.attach_latent(params, quant, fp_params, assignment, metrics or None)
  assert bool(metrics) == ('metric' in extras)
  stale = _codes(quant)
  for scan in (False, True):
    remat_mode = 'decoded' if remat else 'none'
    dynamic, _ = step_lib.calibration_models(fp.clone(scan_blocks=scan), rules, assignment, remat_mode)
    want = _codes(_reference(dynamic, params, quant))
    assert len(want) == 10  # 5 quantized layers x 2 blocks
    assert any(not np.array_equal(want[k], stale[k]) for k in want)  # the stored codes were stale
    if scan:  # the trees stacked as the calibration state holds them: refreshed block by block
      stacked = step_lib.refresh_codes(scan_lib.stack_blocks(params, fp.depth), scan_lib.stack_blocks(quant, fp.depth))
      got_quant = scan_lib.unstack_blocks(stacked)
    else:
      got_quant = step_lib.refresh_codes(params, quant)
    got = _codes(got_quant)
    assert got.keys() == want.keys()
    for name in want:
      assert got[name].dtype == want[name].dtype == np.uint8, name
      np.testing.assert_array_equal(got[name], want[name], err_msg=f'{name} (scan={scan})')

    # Everything but the codes is returned as given (latent weights, metric, alive mask).
    def rest(tree):
      return trainable_lib.split(tree, lambda path, _: not path.endswith('/codes'))[0]

    jax.tree.map(np.testing.assert_array_equal, rest(got_quant), rest(quant))
  if 'alive' in extras:  # no dead codeword was chosen
    for name, codes in got.items():
      alive = np.asarray(tree_utils.get_path(quant, name.split('/')[:-1] + ['alive']))
      books = np.zeros_like(codes) if alive.shape[0] == 1 else np.arange(codes.shape[0])[:, None]
      assert alive[books, codes].all(), name


def test_refresh_codes_is_pq_encode_of_the_latent():
  """One argmin: without scale, alive or metric, a layer's refreshed codes are pq.encode of its latent weight."""
  params, quant, _, rules = _quantized('pq', frozenset())
  _, _, fp_params, _ = tiny_setup()
  params, quant = step_lib.attach_latent(params, quant, fp_params, 'dynamic')
  got = _codes(step_lib.refresh_codes(params, quant))
  for name, codes in got.items():
    keys = name.split('/')[:-1]
    kernel = tree_utils.get_path(fp_params, keys + ['kernel'])
    codebooks = tree_utils.get_path(params, keys + ['codebooks'])
    np.testing.assert_array_equal(codes, pq.encode(kernel, codebooks, rules.spec_for('/'.join(keys))))
