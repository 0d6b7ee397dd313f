"""Flax DiT vs independent references: diffusers (PyTorch) outputs and published sizes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import torch_reference as torch_refs
from dpq_jax import convert
from dpq_jax.models import dit, scan
from dpq_jax.models.spec import ModelSpec

T_VALUES = np.array([0, 1, 250, 999])


def _rel_err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope='module')
def converted(torch_dit):
  ref, state = torch_dit
  spec = convert.infer_spec(state, None, input_size=8)
  return ref, spec, convert.original_to_flax(state, spec)


def _inputs(n=4, size=8, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(n, size, size, 4).astype(np.float32)
  return x


def test_spec_inferred_from_shapes(converted):
  _, spec, _ = converted
  assert spec == ModelSpec('DiT-S/2', input_size=8, num_classes=10, learn_sigma=True, in_channels=4)


def test_forward_matches_diffusers(converted):
  ref, spec, params = converted
  model = spec.create()
  x = _inputs()
  y = np.array([0, 3, 9, 10])  # 10 == num_classes: the null label
  for t in (T_VALUES, np.array([999, 0, 500, 1])):
    want = torch_refs.diffusers_forward(ref, x, t, y)
    got = model.apply({'params': params}, x, t, y)
    assert got.shape == (4, 8, 8, 8)
    assert _rel_err(got, want) <= 1e-5
  # The blocks under nn.scan, on the converted params stacked per block (config.model.scan_blocks).
  scanned = jax.jit(spec.create(scan_blocks=True).apply)(scan.stack_blocks({'params': params}, 12), x, t, y)
  assert _rel_err(scanned, want) <= 1e-5


def test_forward_with_cfg_matches_original(converted):
  ref, spec, params = converted
  model = spec.create()
  half = _inputs(3)
  x = np.concatenate([half, half])
  y = np.array([1, 5, 7, 10, 10, 10])
  t = np.array([999, 500, 0, 999, 500, 0])
  with torch.no_grad():
    raw = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(y)).sample
    want = torch_refs.original_cfg(raw, 1.5).numpy().transpose(0, 2, 3, 1)
  got = model.apply({'params': params}, x, t, y, 1.5, method=model.forward_with_cfg)
  assert _rel_err(got, want) <= 1e-5
  # Guidance touches only the first three channels; the halves agree there.
  np.testing.assert_array_equal(got[:3, ..., :3], got[3:, ..., :3])


def test_real_input_size_matches_diffusers():
  ref = torch_refs.random_diffusers_dit('S', patch=4, sample_size=32, num_classes=1000, seed=1)
  state = convert.diffusers_to_original(torch_refs.state_dict_numpy(ref))
  spec = convert.infer_spec(state, 'DiT-S/4', input_size=32)
  params = convert.original_to_flax(state, spec)
  x = _inputs(2, 32, seed=1)
  t, y = np.array([0, 999]), np.array([207, 1000])
  got = spec.create().apply({'params': params}, x, t, y)
  assert _rel_err(got, torch_refs.diffusers_forward(ref, x, t, y)) <= 1e-5


def _closed_form_params(depth, hidden, patch, num_classes=1000, in_ch=4, out_ch=8):
  """Parameter count of the original DiT (without the frozen pos_embed), from its layer list."""
  d = hidden
  block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
  embed = (patch * patch * in_ch * d + d) + (256 * d + d + d * d + d) + (num_classes + 1) * d
  final = (d * 2 * d + 2 * d) + (d * patch * patch * out_ch + patch * patch * out_ch)
  return depth * block + embed + final


@pytest.mark.parametrize('name', dit.MODEL_NAMES)
def test_registry_param_counts(name):
  size, patch = dit.parse_name(name)
  model = dit.create_model(name, input_size=32)
  shapes = jax.eval_shape(functools.partial(dit.init_params, model), jax.random.key(0))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert n == _closed_form_params(size.depth, size.hidden_size, patch)


def test_xl2_matches_published_count():
  # train.py of the original prints "DiT Parameters: 675,129,632" for DiT-XL/2 at 256x256;
  # that count includes the frozen (256 x 1152) pos_embed buffer, which Flax computes instead.
  model = dit.create_model('DiT-XL/2', input_size=32)
  shapes = jax.eval_shape(functools.partial(dit.init_params, model), jax.random.key(0))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert n + 256 * 1152 == 675_129_632


def test_unknown_name_and_bad_input_size():
  with pytest.raises(ValueError, match='DiT-XL/2'):
    dit.create_model('DiT-XXL/2', input_size=32)
  with pytest.raises(ValueError, match='multiple of the patch size'):
    dit.create_model('DiT-S/8', input_size=36)


def test_init_follows_original_scheme():
  model = dit.create_model('DiT-S/8', input_size=16, num_classes=10)
  params = dit.init_params(model, jax.random.key(0))
  for i in range(model.depth):
    assert not np.any(params[f'blocks_{i}']['adaLN_modulation']['kernel'])
  assert not np.any(params['final_layer']['linear']['kernel'])
  assert params['y_embedder']['embedding_table']['embedding'].shape == (11, 384)
  # adaLN-Zero: a freshly initialised DiT outputs exactly zero.
  x = jnp.ones((2, 16, 16, 4))
  out = model.apply({'params': params}, x, jnp.array([1, 2]), jnp.array([0, 10]))
  assert not np.any(out)


def test_pos_embed_matches_diffusers():
  from diffusers.models.embeddings import get_2d_sincos_pos_embed as ref

  for dim, grid in [(384, 4), (1152, 16)]:
    want = np.asarray(ref(dim, grid, base_size=grid, output_type='np'))
    np.testing.assert_allclose(dit.get_2d_sincos_pos_embed(dim, grid), want, atol=1e-6)


def test_label_dropout(converted):
  _, spec, params = converted
  model = spec.create()
  x, t = _inputs(4), T_VALUES
  y = np.array([1, 2, 3, 4])
  null = model.apply({'params': params}, x, t, np.full(4, 10))
  forced = model.apply({'params': params}, x, t, y, force_drop_ids=np.ones(4, np.int32))
  np.testing.assert_array_equal(forced, null)
  # Training drops labels with probability 0.1: check the fraction over many draws.
  y_big = jnp.zeros((4000,), jnp.int32)
  emb = dit.LabelEmbedder(10, 8, 0.1)
  variables = emb.init(jax.random.key(0), y_big, False)
  out = emb.apply(variables, y_big, True, rngs={'dropout': jax.random.key(1)})
  table = variables['params']['embedding_table']['embedding']
  dropped = np.mean(np.all(np.isclose(out, table[10]), axis=-1))
  assert 0.08 < dropped < 0.12
  # In eval mode nothing is dropped.
  out = emb.apply(variables, y_big, False)
  assert np.allclose(out, table[0])


def test_bfloat16_compute_keeps_float32_params(converted):
  ref, spec, params = converted
  model32, model16 = spec.create(), spec.create(dtype=jnp.bfloat16)
  x, y = _inputs(), np.array([0, 3, 9, 10])
  v16 = model16.init(jax.random.key(0), x, T_VALUES, y)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v16))
  out32 = model32.apply({'params': params}, x, T_VALUES, y)
  out16 = model16.apply({'params': params}, x, T_VALUES, y)
  assert out16.dtype == jnp.float32
  assert 0 < _rel_err(out16, out32) < 5e-2


def test_custom_size_names():
  assert dit.parse_name('DiT-4x256x4/2') == (dit.DiTSize(depth=4, hidden_size=256, num_heads=4), 2)
  model = dit.create_model('DiT-2x64x2/2', input_size=8, in_channels=1, num_classes=10)
  params = dit.init_params(model, jax.random.key(0))
  # Closed form of the original's layers: per block 4h^2+4h (attn) + 8h^2+5h (mlp) + 6h^2+6h (adaLN).
  h, n = 64, sum(x.size for x in jax.tree.leaves(params))
  blocks = 2 * (18 * h * h + 15 * h)
  embed = (2 * 2 * 1 * h + h) + (256 * h + h + h * h + h) + 11 * h
  final = 2 * h * h + 2 * h + h * 2 * 2 * 2 + 2 * 2 * 2
  assert n == blocks + embed + final
  for bad in ('DiT-4x250x3/2', 'DiT-0x64x2/2', 'DiT-4x64/2'):
    with pytest.raises(ValueError, match='unknown DiT model'):
      dit.parse_name(bad)


def test_cfg_guides_every_eps_channel_of_one_channel_models():
  model = dit.create_model('DiT-1x32x2/2', input_size=4, in_channels=1, num_classes=10)
  params = jax.tree.map(lambda p: p + 0.05, dit.init_params(model, jax.random.key(0)))
  x = np.random.default_rng(0).standard_normal((2, 4, 4, 1)).astype(np.float32)
  xc, t, y = np.concatenate([x, x]), np.array([3, 3, 3, 3]), np.array([1, 2, 10, 10])
  got = np.asarray(model.apply({'params': params}, xc, t, y, 4.0, method='forward_with_cfg'))
  raw = np.asarray(model.apply({'params': params}, xc, t, y))
  cond, uncond = raw[:2], raw[2:]
  want_eps = uncond[..., :1] + 4.0 * (cond[..., :1] - uncond[..., :1])
  np.testing.assert_allclose(got[:2, ..., :1], want_eps, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[2:, ..., :1], want_eps, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[..., 1:], raw[..., 1:], rtol=1e-6)  # the variance channel is never guided
