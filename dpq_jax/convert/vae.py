"""The SD VAE (diffusers AutoencoderKL) -> Flax params of models/vae.py, and converted VAE directories."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from dpq_jax import io_utils
from dpq_jax.convert import checkpoint
from dpq_jax.convert.io import nest_checked, read_safetensors, read_torch_state_dict
from dpq_jax.errors import CheckpointError

Params = dict[str, Any]

RANDOM_VAE = 'random'  # config.vae.checkpoint for smoke runs: the SD kl-f8 architecture, random weights

# Pre-0.14 diffusers names of the mid-block attention (the sd-vae-ft-* files still use them).
_VAE_LEGACY_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def read_vae_folder(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A diffusers AutoencoderKL folder (config.json + *.safetensors, else a .bin state_dict) -> (state, config).

  A whole pipeline folder is accepted too (its `vae/` subfolder is read).
  """
  if not os.path.isdir(path):
    raise CheckpointError(f'VAE {path!r} is not a directory (expected a diffusers AutoencoderKL folder)')
  if os.path.isdir(os.path.join(path, 'vae')):
    path = os.path.join(path, 'vae')
  cfg_path = os.path.join(path, 'config.json')
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f'{path!r} is not a diffusers VAE folder: no config.json')
  try:
    with open(cfg_path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f'cannot read {cfg_path!r}: {e}') from None
  files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
  if files:
    return read_safetensors(path, files), config
  bins = sorted(f for f in os.listdir(path) if f.endswith('.bin'))
  if len(bins) != 1:
    raise CheckpointError(f'{path!r} holds no .safetensors and {len(bins)} .bin files; expected weights in one of them')
  return read_torch_state_dict(os.path.join(path, bins[0])), config


def _vae_flax_key(key: str) -> tuple[str, ...]:
  """'encoder.mid_block.attentions.0.query.weight' -> ('encoder', 'mid_block', 'attentions_0', 'to_q', 'kernel')."""
  parts = key.split('.')
  if len(parts) >= 2 and parts[-2] in _VAE_LEGACY_ATTENTION:
    parts = parts[:-2] + _VAE_LEGACY_ATTENTION[parts[-2]].split('.') + parts[-1:]
  key = re.sub(r'\.(\d+)(?=\.)', r'_\1', '.'.join(parts))
  path = key.split('.')
  if path[-1] == 'weight':
    path[-1] = 'scale' if 'norm' in path[-2] else 'kernel'
  return tuple(path)


def vae_to_flax(state: Mapping[str, np.ndarray], config: Any) -> Params:
  """Maps a diffusers AutoencoderKL state dict onto the Flax tree of `config` (a VAEConfig), consuming every key."""
  import jax

  from dpq_jax.models import vae as vae_lib

  expected = jax.eval_shape(lambda: vae_lib.init_params(vae_lib.AutoencoderKL(config), jax.random.key(0)))
  flat_expected = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(expected)}
  params: dict[tuple[str, ...], np.ndarray] = {}
  for key, value in state.items():
    path = _vae_flax_key(key)
    want = flat_expected.get(path)
    if path[-1] == 'kernel' and value.ndim == 4 and want is not None and len(want.shape) == 2:
      value = value[:, :, 0, 0]  # 1x1-conv attention projections of older exports
    if path[-1] == 'kernel' and value.ndim == 2:
      value = value.T
    elif path[-1] == 'kernel' and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
    params[path] = np.ascontiguousarray(value, np.float32)
  leftovers = sorted('/'.join(p) for p in set(params) - set(flat_expected))
  missing = sorted('/'.join(p) for p in set(flat_expected) - set(params))
  if leftovers or missing:
    parts = []
    if leftovers:
      parts.append(f'unconsumed source keys: {", ".join(leftovers[:20])}' + (' ...' if len(leftovers) > 20 else ''))
    if missing:
      parts.append(f'missing for the config: {", ".join(missing[:20])}' + (' ...' if len(missing) > 20 else ''))
    raise CheckpointError('VAE checkpoint does not match its config.json; ' + '; '.join(parts))
  return nest_checked(params, flat_expected, 'VAE ', 'the config.json architecture')


def load_torch_vae(path: str) -> tuple[Any, Params]:
  """A diffusers AutoencoderKL folder -> (VAEConfig, numpy Flax params)."""
  from dpq_jax.models import vae as vae_lib

  state, config = read_vae_folder(
    io_utils.local_copy(path) if io_utils.is_remote(path) and io_utils.isdir(path) else path
  )
  try:
    vae_config = vae_lib.VAEConfig.from_diffusers(config)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'{path!r}: {e}') from None
  return vae_config, vae_to_flax(state, vae_config)


def save_converted_vae(output_dir: str, config: Any, params: Params, source: str = '') -> None:
  """Writes DIR/model.json ({'kind': 'vae', 'config': ...}) and DIR/params atomically."""
  checkpoint.save_dir(output_dir, {'kind': 'vae', 'config': config.to_json(), 'source': source}, params)


def load_vae(path: str) -> tuple[Any, Params]:
  """A converted VAE directory, a diffusers AutoencoderKL folder, or 'random' (the SD kl-f8 VAE with seeded
  random weights: smoke runs of the pipeline with no download) -> (VAEConfig, params)."""
  from dpq_jax.models import vae as vae_lib

  if path == RANDOM_VAE:
    import jax

    config = vae_lib.VAEConfig()
    return config, vae_lib.init_params(vae_lib.AutoencoderKL(config), jax.random.key(0))
  if not checkpoint.is_converted(path):
    return load_torch_vae(path)
  meta = checkpoint.read_meta(path)
  if meta.get('kind') != 'vae':
    raise CheckpointError(f'{path!r} is a converted DiT, not a VAE (expected a VAE converted with --vae)')
  config = vae_lib.VAEConfig.from_diffusers(meta['config'])
  return config, checkpoint.restore_params(path)
