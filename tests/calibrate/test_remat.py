"""config.calibrate.remat: the recomputing modes change what the backward pass keeps, never a value.

Every mode's calibration step equals the 'none' step and a dense reference (the plain DiT on the
decoded kernels: codeword gradient = scatter-add of dL/dW over the sub-vectors assigned to it);
'decoded' keeps no decoded kernel [C_in, C_out] among the saved residuals and does not run the
forward matmul twice; 'blocks' keeps the parameter names of a converted checkpoint.
"""

import contextlib
import functools
import io
import re

import jax
import jax.ad_checkpoint
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from dpq_jax import pipeline
from dpq_jax.calibrate import train_step as step_lib
from dpq_jax.models import dit
from dpq_jax.models import scan as scan_lib
from dpq_jax.quant import layers, pq
from tests.calibrate import tiny

B = 3  # batch: no activation shape equals a kernel shape of the tiny model (hidden 32)


def _step(remat: str, assignment: str, scan: bool = False):
  """(metrics, params before, params after, XLA temporaries bytes) of one SGD(lr=1) calibration step:
  after = before - grad. assignment 'frozen': the dynamic model's step with assign_every=0 (stored codes).
  scan: the blocks under nn.scan (the state's trees are returned per block)."""
  trainable = 'codebooks,latent' if assignment == 'ste' else 'codebooks'
  cfg = tiny.calib_config(optimizer='sgd', lr=1.0, b1=0.0, label_dropout=0.5, trainable=trainable, remat=remat)
  cfg.assign_every = 0 if assignment == 'frozen' else 1
  jstep, state, frozen, _ = tiny.build(cfg, assignment='dynamic' if assignment == 'frozen' else assignment, scan=scan)
  x, y = tiny.tiny_data(8)
  batch = {'latents': x, 'labels': y}
  compiled = jstep.lower(state, frozen, batch).compile()
  before = jax.device_get(state)
  after, metrics = compiled(state, frozen, batch)
  if scan:
    assert 'blocks' in before['params'] and 'blocks_0' not in before['params']
  before, after = (scan_lib.unstack_blocks(t) if scan else t for t in (before, jax.device_get(after)))
  return jax.device_get(metrics), before, after, compiled.memory_analysis().temp_size_in_bytes


@functools.lru_cache(maxsize=None)
def _dense_reference():
  """(loss, dL/dW of every kernel) of the plain DiT on the decoded kernels, with step 0's randomness."""
  x, y = tiny.tiny_data(8)
  value, grads = tiny.dense_step_reference(jax.random.fold_in(jax.random.key(0), 0), x, y)  # init_state(seed=0), step 0
  return float(value), grads


def _node(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


@pytest.mark.parametrize(
  'remat,assignment,scan',
  [
    ('none', 'dynamic', False),
    ('decoded', 'dynamic', False),
    ('blocks', 'dynamic', False),
    ('decoded', 'ste', False),
    # The blocks under nn.scan (config.model.scan_blocks): the same step, on trees stacked per block.
    ('blocks', 'ste', True),  # ste recomputes the assignments too; its latent weight gets the dense dL/dW
    ('none', 'frozen', True),
  ],
)
def test_every_mode_gives_the_none_step_and_the_dense_gradient(remat, assignment, scan):
  _, _, _, q = tiny.tiny_setup()
  cached = {('none', 'dynamic', False): _step_none, ('decoded', 'dynamic', False): _step_decoded}
  key = (remat, assignment, scan)
  metrics, before, after, _ = cached[key]() if key in cached else _step(remat, assignment, scan)
  ref_loss, ref_grads = _dense_reference()
  np.testing.assert_allclose(float(metrics['loss']), ref_loss, rtol=1e-5)
  checked = 0
  for path, codes in jax.tree_util.tree_leaves_with_path(q.variables()['quant']):
    keys = [p.key for p in path[:-1]]
    dw = np.asarray(_node(ref_grads, keys)['kernel'])  # [C_in, C_out]
    sub = np.asarray(pq.to_subvectors(dw, 4))  # [M, out, d]
    want = np.zeros_like(_node(before['params'], keys)['codebooks'])  # [M, K, d]
    for m in range(sub.shape[0]):
      np.add.at(want[m], np.asarray(codes)[m], sub[m])
    got = _node(before['params'], keys)['codebooks'] - _node(after['params'], keys)['codebooks']
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-7)
    if assignment == 'ste':  # the straight-through latent weight receives dL/dW itself
      got = _node(before['params'], keys)['latent'] - _node(after['params'], keys)['latent']
      np.testing.assert_allclose(got, dw, rtol=2e-3, atol=1e-7)
    checked += 1
  assert checked == 10
  if (remat != 'none' or scan) and assignment != 'ste':  # and the same step as 'none', to float rounding
    ref_metrics, _, ref_after, _ = _step_none()
    for k in ('loss', 'mse', 'vb', 'grad_norm', 'changed'):
      np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), after['params'], ref_after['params']
    )
    jax.tree.map(np.testing.assert_array_equal, after['quant'], ref_after['quant'])


@functools.lru_cache(maxsize=None)
def _step_none():
  return _step('none', 'dynamic')


@functools.lru_cache(maxsize=None)
def _step_decoded():
  return _step('decoded', 'dynamic')


def test_decoded_mode_needs_less_memory_in_xla_analysis():
  """XLA's buffer assignment of the compiled step: 'decoded' saves at least half the decoded kernels."""
  _, _, params, q = tiny.tiny_setup()
  kernel_bytes = sum(
    4 * np.size(_node(params, [p.key for p in path[:-1]])['kernel'])
    for path, _ in jax.tree_util.tree_leaves_with_path(q.variables()['quant'])
  )
  none, decoded = _step_none()[3], _step_decoded()[3]
  assert decoded <= none - kernel_bytes // 2, (none, decoded, kernel_bytes)


def _residuals(remat: str) -> list[tuple[str, str, tuple[int, ...]]]:
  """(source, dtype, shape) of every residual the calibration loss keeps for its backward pass, from
  jax.ad_checkpoint.print_saved_residuals; arguments (params, latents) cost nothing and are left out."""
  fp, rules, params, q = tiny.tiny_setup()
  dyn, _ = step_lib.calibration_models(fp, rules, 'dynamic', remat)
  _, qn = step_lib.attach_latent(q.variables()['params'], q.variables()['quant'], params, 'dynamic')
  x, y = tiny.tiny_data(B)
  t = jnp.arange(B) * 300

  def loss(p):
    out, _ = dyn.apply({'params': p, 'quant': qn}, jnp.asarray(x), t, jnp.asarray(y), mutable=['quant'])
    return jnp.mean(jnp.square(out))

  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    jax.ad_checkpoint.print_saved_residuals(loss, q.variables()['params'])
  out = []
  for line in buf.getvalue().splitlines():
    m = re.match(r'(\w+)\[([\d,]*)\] (.*)', line)
    assert m, line
    if not m.group(3).startswith(('from the argument', 'from a constant')):
      out.append((m.group(3), m.group(1), tuple(int(v) for v in m.group(2).split(',') if v)))
  return out


def _count_dots(jaxpr) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == 'dot_general'
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count_dots(sub)
  return n


def test_decoded_mode_keeps_no_decoded_kernel_and_no_second_forward_matmul():
  _, _, params, q = tiny.tiny_setup()
  kernel_shapes = {
    np.shape(_node(params, [p.key for p in path[:-1]])['kernel'])
    for path, _ in jax.tree_util.tree_leaves_with_path(q.variables()['quant'])
  }
  assert kernel_shapes == {(32, 96), (32, 32), (32, 128), (128, 32), (32, 192)}
  none = _residuals('none')
  assert kernel_shapes <= {s for _, dt, s in none if dt == 'f32'}, none  # what 'none' keeps: the decoded kernels
  decoded = _residuals('decoded')
  assert not kernel_shapes & {s for _, dt, s in decoded if dt.startswith(('f', 'bf'))}, decoded
  # Instead a layer keeps its codes (uint8 [C_in / d, C_out]; fc2's (32, 32) is one), 1/16 of a float W_hat.
  assert {s for _, dt, s in decoded if dt == 'u8'} == {(8, 96), (8, 32), (8, 128), (32, 32), (8, 192)}, decoded
  assert len(decoded) < len(none)

  # The backward of 'decoded' computes dx and dW only: as many matmuls as 'none' (3 per layer).
  fp, rules, _, _ = tiny.tiny_setup()
  x, y = tiny.tiny_data(B)
  t = jnp.arange(B) * 300
  counts = {}
  for remat in ('none', 'decoded'):
    dyn, _ = step_lib.calibration_models(fp, rules, 'frozen', remat)

    def loss(p, dyn=dyn):
      return jnp.mean(
        jnp.square(dyn.apply({'params': p, 'quant': q.variables()['quant']}, jnp.asarray(x), t, jnp.asarray(y)))
      )

    counts[remat] = _count_dots(jax.make_jaxpr(jax.grad(loss))(q.variables()['params']).jaxpr)
  assert counts['decoded'] == counts['none'], counts


def _count(jaxpr, primitive: str) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == primitive
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count(sub, primitive)
  return n


def test_rematerialised_blocks_keep_the_assigned_codes_and_assign_once():
  """A block recomputed in the backward pass ('blocks', 'dots') keeps each dynamic assignment's codes
  (dit.REMAT_KEEP): the argmin's loop over the codewords runs once per layer, as in 'none', not again."""
  fp, rules, params, q = tiny.tiny_setup()
  _, qn = step_lib.attach_latent(q.variables()['params'], q.variables()['quant'], params, 'dynamic')
  x, y = tiny.tiny_data(B)
  t = jnp.arange(B) * 300
  loops, residuals = {}, {}
  for remat in ('none', 'blocks', 'dots'):
    dyn, _ = step_lib.calibration_models(fp, rules, 'dynamic', remat)

    def loss(p, dyn=dyn):
      out, _ = dyn.apply({'params': p, 'quant': qn}, jnp.asarray(x), t, jnp.asarray(y), mutable=['quant'])
      return jnp.mean(jnp.square(out))

    loops[remat] = _count(jax.make_jaxpr(jax.grad(loss))(q.variables()['params']).jaxpr, 'scan')
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      jax.ad_checkpoint.print_saved_residuals(loss, q.variables()['params'])
    residuals[remat] = {ln.split(' ')[0] for ln in buf.getvalue().splitlines()}
  assert loops['none'] >= 10, loops  # one argmin loop per quantized layer (5 per block, 2 blocks) at least
  assert loops['blocks'] == loops['dots'] == loops['none'], loops
  codes = {'u8[8,96]', 'u8[8,32]', 'u8[8,128]', 'u8[32,32]', 'u8[8,192]'}  # [C_in / d, C_out] of every layer
  assert codes <= residuals['blocks'] and codes <= residuals['dots'], residuals


def test_pqdense_decoded_residuals_are_its_inputs():
  """One PQDense: 'none' keeps W_hat [64, 48]; 'decoded' keeps only its inputs x, codebooks, codes."""
  spec = pq.CodebookSpec(16, 4)
  x = jax.random.normal(jax.random.key(0), (5, 64))
  codes = jax.random.randint(jax.random.key(2), (16, 48), 0, 16).astype(jnp.uint8)  # [M, C_out]
  for remat in (False, True):
    layer = layers.PQDense(48, spec=spec, remat=remat)
    v = layer.init(jax.random.key(1), x)

    def loss(cb, x, codes, layer=layer, v=v):
      return jnp.sum(jnp.sin(layer.apply({'params': dict(v['params'], codebooks=cb), 'quant': {'codes': codes}}, x)))

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      jax.ad_checkpoint.print_saved_residuals(loss, v['params']['codebooks'], x, codes)
    kept = [ln.split(' ')[0] for ln in buf.getvalue().splitlines() if ' from the argument ' not in f' {ln} ']
    assert ('f32[64,48]' in kept) != remat, buf.getvalue()
    if remat:  # nothing of the layer's own: only cos(y) of the loss's sin
      assert kept == ['f32[5,48]'], buf.getvalue()


def test_blocks_mode_keeps_the_param_tree_and_loads_converted_params():
  fp, rules, params, q = tiny.tiny_setup()
  x, y = tiny.tiny_data(B)
  t = jnp.arange(B) * 300
  fp_remat = fp.clone(remat=True)
  a = dit.init_params(fp, jax.random.key(0))
  b = dit.init_params(fp_remat, jax.random.key(0))
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # same names -> same RNG streams -> same values
  # The converted (non-remat) params load into the remat model and give the same output.
  np.testing.assert_allclose(jax.jit(fp_remat.apply)({'params': params}, x, t, y),
                             jax.jit(fp.apply)({'params': params}, x, t, y), rtol=1e-6, atol=1e-6)  # fmt: skip
  # Quantized: every collection (params, quant) of every mode has the 'none' structure and shapes.
  shapes = {}
  for remat in step_lib.REMAT_MODES:
    dyn, frz = step_lib.calibration_models(fp, rules, 'dynamic', remat)
    v = jax.eval_shape(lambda k, dyn=dyn: dyn.init(k, jnp.asarray(x), t, jnp.asarray(y)), jax.random.key(0))
    shapes[remat] = jax.tree.map(lambda s: (s.shape, s.dtype), v)
    out = jax.jit(frz.apply)(q.variables(), x, t, y)
    if remat == 'none':
      ref = out
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  assert shapes['decoded'] == shapes['none'] and shapes['blocks'] == shapes['none']
  assert 'blocks_1' in shapes['blocks']['params'] and 'codes' in shapes['blocks']['quant']['blocks_0']['mlp']['fc1']


def test_bad_remat_value_fails_with_one_clear_line():
  config = tiny.runlocal(**{'calibrate.remat': 'layers'})
  with pytest.raises(pipeline.ConfigError) as e:
    pipeline.check_config(config)
  assert str(e.value) == "config.calibrate.remat='layers': expected one of none, decoded, blocks, dots"
  fp, rules, _, _ = tiny.tiny_setup()
  with pytest.raises(ValueError, match="remat='all': expected one of none, decoded, blocks, dots"):
    step_lib.calibration_models(fp, rules, 'dynamic', 'all')
  assert tiny.runlocal(**{'calibrate.remat': 'blocks'}).calibrate.remat == 'blocks'
  pipeline.check_config(tiny.runlocal(**{'calibrate.remat': 'decoded'}))  # the good values pass
