"""The DiT's blocks under nn.scan: the per-block <-> stacked conversion, and the scanned model equal to the
unrolled one for fp (outputs, gradients) and on an old artifact. Elsewhere: a converted checkpoint scanned vs
diffusers (test_dit.py), the PQ calibration step scanned (test_remat.py), the sampler (test_sampler.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpq_jax.models import dit
from dpq_jax.models import scan as scan_lib
from dpq_jax.quant import layers, pq, storage
from tests.calibrate import tiny as tc

ARTIFACT_V1 = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'quant', 'data', 'artifact_v1', 'mixed_float16')


def _inputs(n=3, size=8, seed=0):
  x = np.random.default_rng(seed).standard_normal((n, size, size, 4)).astype(np.float32)
  return x, np.array([0, 500, 999][:n]), np.array([1, 7, tc.NUM_CLASSES][:n])


def test_stack_unstack_roundtrip():
  per_block = {
    'params': {
      'blocks_0': {'a': {'kernel': np.zeros((2, 3))}, 'b': np.ones(4)},
      'blocks_1': {'a': {'kernel': np.ones((2, 3))}, 'b': np.zeros(4)},
      'final_layer': {'bias': np.ones(2)},
    },
    'quant': {'blocks_0': {'codes': np.zeros((2,), np.uint8)}, 'blocks_1': {'codes': np.ones((2,), np.uint8)}},
  }
  stacked = scan_lib.stack_blocks(per_block, depth=2)
  assert set(stacked['params']) == {'blocks', 'final_layer'} and set(stacked['quant']) == {'blocks'}
  assert stacked['params']['blocks']['a']['kernel'].shape == (2, 2, 3)
  np.testing.assert_array_equal(stacked['quant']['blocks']['codes'], [[0, 0], [1, 1]])
  assert stacked['quant']['blocks']['codes'].dtype == np.uint8
  back = scan_lib.unstack_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(per_block)
  jax.tree.map(np.testing.assert_array_equal, back, per_block)


def test_blocks_that_differ_do_not_stack():
  same = {'blocks_0': {'w': np.zeros(3)}, 'blocks_1': {'w': np.zeros(3)}}
  with pytest.raises(ValueError, match='blocks_1 differs from blocks_0'):
    scan_lib.stack_blocks({'blocks_0': {'w': np.zeros(3)}, 'blocks_1': {'w': np.zeros(4)}})
  with pytest.raises(ValueError, match='blocks_1 differs'):
    scan_lib.stack_blocks({'blocks_0': {'w': np.zeros(3)}, 'blocks_1': {'v': np.zeros(3)}})
  with pytest.raises(ValueError, match='expected blocks_0..blocks_2'):
    scan_lib.stack_blocks(same, depth=3)  # a tree with only some blocks (a trainable subset)
  model = dit.DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, scan_blocks=True)
  run_model, variables, why = scan_lib.runnable(model, {'params': {'blocks_0': {'w': np.zeros(3)}, 'blocks_1': {}}})
  assert not run_model.scan_blocks and 'blocks_1' in variables['params'] and 'differs' in why


def test_fp_scanned_equals_unrolled_outputs_and_gradients():
  # The PQ model's steps (frozen, dynamic, ste; every remat mode) are compared in tests/calibrate/test_remat.py.
  model = dit.DiT(input_size=4, patch_size=2, hidden_size=16, depth=2, num_heads=2, num_classes=3, remat=True)
  x, t, y = _inputs(size=4)
  y = np.minimum(y, 3)
  shapes = jax.eval_shape(lambda: dit.init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)

  def loss(p, m):
    out = m.apply({'params': p}, x, t, y)
    return jnp.mean(jnp.square(out - 0.1)), out

  @jax.jit  # one program for both: compiling is what a tiny test pays for
  def both(p_unrolled, p_stacked):
    grad = jax.value_and_grad(loss, has_aux=True)
    return grad(p_unrolled, model), grad(p_stacked, model.clone(scan_blocks=True))

  ((loss_u, out_u), g_u), ((loss_s, out_s), g_s) = both(params, scan_lib.stack_blocks(params, 2))
  assert g_s['blocks']['attn']['qkv']['kernel'].shape == (2, 16, 48)
  np.testing.assert_allclose(out_s, out_u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  g_s = scan_lib.unstack_blocks(g_s)
  assert jax.tree.structure(g_s) == jax.tree.structure(g_u)
  for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_u)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_v1_artifact_runs_scanned():
  # Written long before scanning existed (tests/quant/test_qweight.py): per-block names, a compressed PQ layer,
  # VQ layers and an RTN one in its single block.
  _, q = storage.load(ARTIFACT_V1)
  rules = layers.QuantRules((
    (r'blocks_0/(attn/qkv|mlp/fc1)', pq.CodebookSpec(16, 4)),
    (r'blocks_0/(attn/proj|mlp/fc2)', pq.CodebookSpec(16, 4, shared=True)),
  ))  # fmt: skip
  model = dit.DiT(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=3)
  model = model.clone(dense=layers.dense_factory(rules))
  x, t, y = jnp.ones((2, 4, 4, 4)) * 0.3, jnp.array([1, 500]), jnp.array([0, 3])
  want = jax.jit(model.apply)(q.variables(), x, t, y)
  run_model, variables, why = scan_lib.runnable(model.clone(scan_blocks=True), q.variables())
  assert (
    why is None and run_model.scan_blocks and variables['quant']['blocks']['attn']['qkv']['alive'].shape == (1, 4, 16)
  )
  np.testing.assert_allclose(jax.jit(run_model.apply)(variables, x, t, y), want, rtol=1e-5, atol=1e-6)
