"""Flax SD-VAE against diffusers' AutoencoderKL (random weights), its converter, the CLI and refusals."""

import json

import jax
import numpy as np
import pytest
import torch

from dpq_jax import convert, errors
from dpq_jax.models import vae as vae_lib
from dpq_jax.models.spec import ModelSpec
from tests import helpers

SMALL = {'block_out_channels': (32, 64), 'layers_per_block': 1, 'norm_num_groups': 8}


def _reference(block_out_channels, layers_per_block, norm_num_groups, seed=0):
  """A diffusers AutoencoderKL whose norms and biases are random too (nothing at its trivial init)."""
  from diffusers import AutoencoderKL

  torch.manual_seed(seed)
  n = len(block_out_channels)
  model = AutoencoderKL(
    down_block_types=('DownEncoderBlock2D',) * n,
    up_block_types=('UpDecoderBlock2D',) * n,
    block_out_channels=block_out_channels,
    layers_per_block=layers_per_block,
    norm_num_groups=norm_num_groups,
    latent_channels=4,
  ).eval()
  with torch.no_grad():
    for key, value in model.state_dict().items():
      if 'norm' in key and key.endswith('weight'):
        value.copy_(1 + 0.1 * torch.randn_like(value))
      elif key.endswith('bias'):
        value.copy_(0.1 * torch.randn_like(value))
  return model


def _rel(got, want):
  return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope='module')
def small():
  ref = _reference(**SMALL)
  cfg = vae_lib.VAEConfig.from_diffusers(dict(ref.config))
  params = convert.vae_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, cfg)
  return ref, cfg, params


def _check_parity(ref, cfg, params, size):
  rng = np.random.RandomState(0)
  images = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  latents = rng.randn(2, size // cfg.downscale, size // cfg.downscale, 4).astype(np.float32)
  module = vae_lib.AutoencoderKL(cfg)
  with torch.no_grad():
    posterior = ref.encode(torch.from_numpy(_nchw(images))).latent_dist
    # DiT's sample.py: vae.decode(latents / 0.18215).sample
    want_images = ref.decode(torch.from_numpy(_nchw(latents)) / 0.18215).sample.numpy()
  mean, logvar = jax.jit(lambda p, x: module.apply({'params': p}, x, method='encode'))(params, images)
  assert _rel(_nchw(mean), posterior.mean.numpy()) <= 1e-4
  assert _rel(_nchw(logvar), posterior.logvar.numpy()) <= 1e-4
  got_latents = vae_lib.encode_images(module, params, images)  # DiT's train.py: mean/sample * 0.18215
  assert _rel(_nchw(got_latents), posterior.mean.numpy() * 0.18215) <= 1e-4
  got_images = vae_lib.decode_latents(module, params, latents)
  assert got_images.shape == (2, size, size, 3)
  assert _rel(_nchw(got_images), want_images) <= 1e-4


def test_small_parity_with_diffusers(small):
  _check_parity(*small, size=16)


def test_real_widths_parity_with_diffusers():
  """sd-vae-ft-ema's architecture (128, 256, 512, 512; 2 layers; 32 groups) on a 32x32 image."""
  ref = _reference((128, 256, 512, 512), 2, 32)
  cfg = vae_lib.VAEConfig.from_diffusers(dict(ref.config))
  assert cfg == vae_lib.VAEConfig() and cfg.downscale == 8
  params = convert.vae_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, cfg)
  _check_parity(ref, cfg, params, size=32)


def test_sampled_latents_use_the_posterior_std(small):
  _, cfg, params = small
  module = vae_lib.AutoencoderKL(cfg)
  images = np.random.RandomState(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  key = jax.random.key(3)
  mean, logvar = module.apply({'params': params}, images, method='encode')
  eps = np.asarray(jax.random.normal(key, mean.shape))
  want = (np.asarray(mean) + np.exp(0.5 * np.asarray(logvar)) * eps) * 0.18215
  np.testing.assert_allclose(vae_lib.encode_images(module, params, images, key=key), want, rtol=1e-6, atol=1e-7)


def test_cli_converts_safetensors_folder(small, tmp_path):
  ref, cfg, params = small
  ref.save_pretrained(tmp_path / 'vae')  # config.json + diffusion_pytorch_model.safetensors
  out = tmp_path / 'converted'
  r = helpers.run_convert('--vae', '--checkpoint', str(tmp_path / 'vae'), '--output', out)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads((out / 'model.json').read_text())['kind'] == 'vae'
  got_cfg, got = convert.load_vae(str(out))
  assert got_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, got, params)


def test_bin_state_dict_and_legacy_attention_names(small, tmp_path):
  """A .bin (torch.load weights_only) with the pre-0.14 names query/key/value/proj_attn as 1x1 convs."""
  ref, cfg, params = small
  folder = tmp_path / 'old'
  folder.mkdir()
  (folder / 'config.json').write_text(json.dumps(dict(ref.config)))
  legacy = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  state = {}
  for key, value in ref.state_dict().items():
    for new, old in legacy.items():
      if f'.{new}.' in key:
        key = key.replace(f'.{new}.', f'.{old}.')
        value = value[:, :, None, None] if value.ndim == 2 else value
    state[key] = value.clone()
  assert any('proj_attn' in k for k in state)
  torch.save(state, folder / 'diffusion_pytorch_model.bin')
  got_cfg, got = convert.load_vae(str(folder))
  assert got_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, got, params)


def _folder(tmp_path, config, state):
  from safetensors.torch import save_file

  folder = tmp_path / 'bad'
  folder.mkdir(parents=True)
  if config is not None:
    (folder / 'config.json').write_text(json.dumps(config))
  save_file({k: v.contiguous() for k, v in state.items()}, folder / 'diffusion_pytorch_model.safetensors')
  return str(folder)


def test_bad_inputs_fail_clearly(small, tmp_path):
  ref, _, _ = small
  state = dict(ref.state_dict())
  config = dict(ref.config)
  with pytest.raises(errors.CheckpointError, match='no config.json'):
    convert.load_torch_vae(_folder(tmp_path / 'a', None, state))
  with pytest.raises(errors.CheckpointError, match='unconsumed source keys: extra/kernel'):
    convert.load_torch_vae(_folder(tmp_path / 'b', config, {**state, 'extra.weight': torch.zeros(2, 2)}))
  missing = {k: v for k, v in state.items() if not k.startswith('post_quant_conv')}
  with pytest.raises(errors.CheckpointError, match='missing for the config: post_quant_conv/bias'):
    convert.load_torch_vae(_folder(tmp_path / 'c', config, missing))
  wider = {**config, 'latent_channels': 8}
  with pytest.raises(
    errors.CheckpointError,
    match=r'conv_in/kernel has shape \(3, 3, 4, 64\); the config.json architecture expects \(3, 3, 8, 64\)',
  ):
    convert.load_torch_vae(_folder(tmp_path / 'd', wider, state))
  with pytest.raises(errors.CheckpointError, match="act_fn='gelu'"):
    convert.load_torch_vae(_folder(tmp_path / 'e', {**config, 'act_fn': 'gelu'}, state))
  with pytest.raises(errors.CheckpointError, match='not a directory'):
    convert.load_vae(str(tmp_path / 'nope'))


def test_cli_failure_keeps_previous_output(tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep').write_text('x')
  (tmp_path / 'empty').mkdir()
  r = helpers.run_convert('--vae', '--checkpoint', tmp_path / 'empty', '--output', out)
  errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert r.returncode == 2 and len(errors) == 1 and 'no config.json' in errors[0], r.stderr
  assert [p.name for p in out.iterdir()] == ['keep']


def test_converted_dit_and_vae_are_not_confused(small, tmp_path):
  _, cfg, params = small
  convert.save_converted_vae(str(tmp_path / 'vae'), cfg, params)
  with pytest.raises(errors.CheckpointError, match='is a converted VAE, not a DiT'):
    convert.load_converted(str(tmp_path / 'vae'))
  spec = ModelSpec('DiT-S/8', input_size=8, num_classes=10)
  convert.save_converted(str(tmp_path / 'dit'), spec, {'x_embedder': {'bias': np.zeros(3, np.float32)}})
  with pytest.raises(errors.CheckpointError, match='is a converted DiT, not a VAE'):
    convert.load_vae(str(tmp_path / 'dit'))
