"""PyTorch DiT checkpoints -> Flax params.

Two sources are read: the original repository's checkpoints (the released
`DiT-XL-2-256x256.pt` is a plain state_dict; train.py checkpoints hold `model`, `ema`, `opt`
and a pickled `argparse.Namespace` under `args`) and diffusers' DiTTransformer2DModel folders
(config.json + safetensors). diffusers keys are first renamed to the original's, so one
table (`_ORIGINAL_TO_FLAX`) maps everything onto the Flax module tree of `models/dit.py`.

Loading never executes pickled code: .pt files go through `torch.load(weights_only=True)`
with exactly `argparse.Namespace` allowed, and safetensors are tensor-only by design.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from typing import Any, Mapping

import numpy as np

from dpq_jax import io_utils
from dpq_jax.models import dit

Params = dict[str, Any]


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not match the requested model."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What `create_model` needs to rebuild a converted DiT."""

  name: str
  input_size: int
  num_classes: int = 1000
  learn_sigma: bool = True
  in_channels: int = 4

  def create(self, **kwargs) -> dit.DiT:
    return dit.create_model(
      self.name,
      input_size=self.input_size,
      num_classes=self.num_classes,
      learn_sigma=self.learn_sigma,
      in_channels=self.in_channels,
      **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# Reading tensors.


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads an original DiT .pt file into float32 numpy arrays (EMA weights preferred)."""
  import argparse

  import torch

  if not os.path.isfile(path):
    raise CheckpointError(f'checkpoint {path!r} does not exist or is not a file')
  if not zipfile.is_zipfile(path):
    raise CheckpointError(f'checkpoint {path!r} is not a PyTorch zip archive (truncated or not a .pt file)')
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError or zip errors here.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if 'weights_only' in str(e) or 'Unsupported global' in str(e) or 'UnpicklingError' in type(e).__name__:
      raise CheckpointError(
        f'refusing to load {path!r}: it carries pickled objects other than tensors and argparse.Namespace ({first})'
      ) from None
    raise CheckpointError(f'cannot read checkpoint {path!r} (truncated or corrupt?): {first}') from None
  if isinstance(obj, Mapping) and ('ema' in obj or 'model' in obj):
    obj = obj['ema'] if 'ema' in obj else obj['model']  # As the original's find_model.
  if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise CheckpointError(f'checkpoint {path!r} holds no DiT state_dict (expected a dict of tensors)')
  return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}


def read_diffusers_folder(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads a diffusers DiTTransformer2DModel folder: (state dict, config)."""
  if os.path.isdir(os.path.join(path, 'transformer')):
    path = os.path.join(path, 'transformer')  # A whole DiTPipeline folder.
  cfg_path = os.path.join(path, 'config.json')
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f'{path!r} is not a diffusers model folder: no config.json')
  with open(cfg_path) as f:
    config = json.load(f)
  files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
  if not files:
    raise CheckpointError(f'{path!r} holds no .safetensors weights (only safetensors are read, never pickles)')
  return _read_safetensors(path, files), config


def _read_safetensors(path: str, files: list[str]) -> dict[str, np.ndarray]:
  """The tensors of path/files (safetensors: no pickled code) as float32 numpy arrays."""
  from safetensors.numpy import load_file

  state = {}
  for name in files:
    try:
      state.update(load_file(os.path.join(path, name)))
    except Exception as e:
      raise CheckpointError(f'cannot read {os.path.join(path, name)!r} (truncated or corrupt?): {e}') from None
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# diffusers -> original key names.

_DIFFUSERS_BLOCK = {
  'norm1.linear': 'adaLN_modulation.1',
  'attn1.to_out.0': 'attn.proj',
  'ff.net.0.proj': 'mlp.fc1',
  'ff.net.2': 'mlp.fc2',
}
_DIFFUSERS_EMB = {
  'norm1.emb.timestep_embedder.linear_1': 't_embedder.mlp.0',
  'norm1.emb.timestep_embedder.linear_2': 't_embedder.mlp.2',
  'norm1.emb.class_embedder.embedding_table': 'y_embedder.embedding_table',
}


def diffusers_to_original(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a diffusers DiT state dict to the original's keys.

  diffusers stores q, k, v apart (the original fuses them as qkv) and gives every block its
  own copy of the timestep/label embedders; the copies must agree, block 0's is kept.
  """
  state = dict(state)
  out: dict[str, np.ndarray] = {}

  def take(src: str, dst: str) -> None:
    for suffix in ('.weight', '.bias'):
      if src + suffix in state:
        out[dst + suffix] = state.pop(src + suffix)

  take('pos_embed.proj', 'x_embedder.proj')
  take('proj_out_1', 'final_layer.adaLN_modulation.1')
  take('proj_out_2', 'final_layer.linear')
  blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r'transformer_blocks\.(\d+)\.', k))})
  for i in blocks:
    pre = f'transformer_blocks.{i}.'
    for src, dst in _DIFFUSERS_BLOCK.items():
      take(pre + src, f'blocks.{i}.{dst}')
    qkv = [pre + f'attn1.to_{n}' for n in 'qkv']
    for suffix in ('.weight', '.bias'):
      if all(q + suffix in state for q in qkv):
        out[f'blocks.{i}.attn.qkv{suffix}'] = np.concatenate([state.pop(q + suffix) for q in qkv], axis=0)
    for src, dst in _DIFFUSERS_EMB.items():
      for suffix in ('.weight', '.bias'):
        if pre + src + suffix not in state:
          continue
        value = state.pop(pre + src + suffix)
        if dst + suffix not in out:
          out[dst + suffix] = value
        elif not np.array_equal(out[dst + suffix], value):
          raise CheckpointError(
            f'diffusers block {i} has its own {src}{suffix} that differs from block 0: the original DiT '
            'shares one timestep/label embedder, so this model cannot be converted exactly'
          )
  out.update(state)  # Leftovers go through and are reported by original_to_flax.
  return out


# ---------------------------------------------------------------------------------------------
# original keys -> Flax params.


def infer_spec(state: Mapping[str, np.ndarray], name: str | None = None, input_size: int | None = None) -> ModelSpec:
  """Model name and sizes from tensor shapes; checks them against `name` when given."""
  try:
    proj = state['x_embedder.proj.weight']  # (hidden, in_channels, p, p)
    table = state['y_embedder.embedding_table.weight']  # (num_classes + 1, hidden)
    final = state['final_layer.linear.weight']  # (p * p * out_channels, hidden)
  except KeyError as e:
    raise CheckpointError(f'not a DiT state dict: missing {e.args[0]!r}') from None
  hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
  depth = len({int(m.group(1)) for k in state if (m := re.match(r'blocks\.(\d+)\.', k))})
  found = [s for s, z in dit.SIZES.items() if (z.hidden_size, z.depth) == (hidden, depth)]
  inferred = f'DiT-{found[0]}/{patch}' if found and patch in dit.PATCH_SIZES else None
  if name is None:
    if inferred is None:
      raise CheckpointError(
        f'checkpoint shapes (hidden {hidden}, depth {depth}, patch {patch}) match no DiT in {dit.MODEL_NAMES}'
      )
    name = inferred
  else:
    dit.parse_name(name)  # Raises on an unknown name.
    if name != inferred:
      raise CheckpointError(
        f'--model {name} does not match the checkpoint (hidden {hidden}, depth {depth}, patch {patch}'
        f'{"" if inferred is None else ", i.e. " + inferred})'
      )
  out_channels = final.shape[0] // (patch * patch)
  if out_channels not in (in_channels, 2 * in_channels):
    raise CheckpointError(
      f'final layer has {out_channels} output channels; expected {in_channels} or {2 * in_channels}'
    )
  if 'pos_embed' in state:
    tokens = state['pos_embed'].shape[1]
    inferred_size = int(round(tokens**0.5)) * patch
    if input_size is not None and input_size != inferred_size:
      raise CheckpointError(f"input size {input_size} does not match the checkpoint's pos_embed ({inferred_size})")
    input_size = inferred_size
  if input_size is None:
    raise CheckpointError('input size is not in the checkpoint: pass --image-size')
  return ModelSpec(
    name=name,
    input_size=input_size,
    num_classes=table.shape[0] - 1,
    learn_sigma=out_channels == 2 * in_channels,
    in_channels=in_channels,
  )


def _flax_key(key: str) -> tuple[tuple[str, ...], str] | None:
  """original key -> (Flax path, transform), or None for keys that hold no parameter."""
  table = [
    (r'x_embedder\.proj\.weight', ('x_embedder', 'proj', 'kernel'), 'conv'),
    (r'x_embedder\.proj\.bias', ('x_embedder', 'proj', 'bias'), ''),
    (r't_embedder\.mlp\.([02])\.(weight|bias)', ('t_embedder', 'mlp_{0}', '{1}'), 'linear'),
    (r'y_embedder\.embedding_table\.weight', ('y_embedder', 'embedding_table', 'embedding'), ''),
    (r'blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)', ('blocks_{0}', 'attn', '{1}', '{2}'), 'linear'),
    (r'blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)', ('blocks_{0}', 'mlp', '{1}', '{2}'), 'linear'),
    (r'blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)', ('blocks_{0}', 'adaLN_modulation', '{1}'), 'linear'),
    (r'final_layer\.adaLN_modulation\.1\.(weight|bias)', ('final_layer', 'adaLN_modulation', '{0}'), 'linear'),
    (r'final_layer\.linear\.(weight|bias)', ('final_layer', 'linear', '{0}'), 'linear'),
  ]
  for pattern, path, kind in table:
    m = re.fullmatch(pattern, key)
    if m:
      path = tuple(p.format(*m.groups()).replace('weight', 'kernel') for p in path)
      return path, kind
  return None


def original_to_flax(state: Mapping[str, np.ndarray], spec: ModelSpec) -> Params:
  """Maps an original-format state dict onto the Flax tree of `spec`, consuming every key."""
  import jax

  model = spec.create()
  expected = jax.eval_shape(lambda: dit.init_params(model, jax.random.key(0)))
  flat_expected = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(expected)}
  params: dict[tuple[str, ...], np.ndarray] = {}
  leftovers = []
  for key, value in state.items():
    if key == 'pos_embed':
      grid = spec.input_size // dit.parse_name(spec.name)[1]
      want = dit.get_2d_sincos_pos_embed(value.shape[-1], grid)
      if value.reshape(want.shape).shape != want.shape or not np.allclose(value.reshape(want.shape), want, atol=1e-5):
        raise CheckpointError('pos_embed differs from the fixed 2-D sin-cos embedding this model computes')
      continue
    mapped = _flax_key(key)
    if mapped is None:
      leftovers.append(key)
      continue
    path, kind = mapped
    if path[-1] == 'kernel' and kind == 'linear':
      value = value.T
    elif kind == 'conv':
      value = value.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
    params[path] = np.ascontiguousarray(value, np.float32)
  unexpected = sorted(set(params) - set(flat_expected))
  missing = sorted(set(flat_expected) - set(params))
  leftovers += ['/'.join(p) for p in unexpected]
  if leftovers or missing:
    parts = []
    if leftovers:
      parts.append(
        f'unconsumed source keys: {", ".join(sorted(leftovers)[:20])}' + (' ...' if len(leftovers) > 20 else '')
      )
    if missing:
      parts.append(f'missing for {spec.name}: {", ".join("/".join(p) for p in missing[:20])}')
    raise CheckpointError('checkpoint does not match the model; ' + '; '.join(parts))
  return _nest_checked(params, flat_expected, '', spec.name)


def _nest_checked(params: dict, flat_expected: dict, prefix: str, expects: str) -> Params:
  """{path tuple: array} -> nested params, each array's shape checked against the model's."""
  tree: Params = {}
  for path, value in params.items():
    if value.shape != flat_expected[path].shape:
      raise CheckpointError(
        f'{prefix}{"/".join(path)} has shape {value.shape}; {expects} expects {flat_expected[path].shape}'
      )
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return tree


# ---------------------------------------------------------------------------------------------
# Entry points.


def load_torch_checkpoint(
  path: str, name: str | None = None, input_size: int | None = None
) -> tuple[ModelSpec, Params]:
  """Reads an original .pt or a diffusers folder into (spec, numpy Flax params); gs:// is downloaded first."""
  path = io_utils.local_copy(path) if io_utils.is_remote(path) and io_utils.exists(path) else path
  if os.path.isdir(path):
    state, config = read_diffusers_folder(path)
    state = diffusers_to_original(state)
    size = config.get('sample_size')
    if input_size is not None and size is not None and input_size != size:
      raise CheckpointError(f'input size {input_size} does not match the diffusers config sample_size {size}')
    input_size = input_size or size
  else:
    state = read_torch_state_dict(path)
  spec = infer_spec(state, name, input_size)
  return spec, original_to_flax(state, spec)


def load_torch_dit(path: str, name: str | None = None) -> tuple[str, Params]:
  """Public API: an original .pt file or a diffusers DiT folder -> (model name, Flax params)."""
  spec, params = load_torch_checkpoint(path, name)
  return spec.name, params


# ---------------------------------------------------------------------------------------------
# Converted checkpoints on disk: DIR/model.json + DIR/params (orbax).

SPEC_FILE = 'model.json'
PARAMS_DIR = 'params'


def save_converted(output_dir: str, spec: ModelSpec, params: Params, source: str = '') -> None:
  """Writes DIR/model.json and DIR/params atomically: a failure leaves any existing DIR intact."""
  _save_dir(output_dir, {**dataclasses.asdict(spec), 'source': source}, params)


def _save_dir(output_dir: str, meta: dict[str, Any], params: Params) -> None:
  """DIR/model.json (meta) and DIR/params (orbax), built in a temp dir and renamed into place."""
  import shutil
  import tempfile

  import orbax.checkpoint as ocp

  output_dir = io_utils.abspath(output_dir)
  parent = check_writable_dir_parent(output_dir)
  if io_utils.is_remote(output_dir):
    parent = None  # built in the local temp dir, uploaded with model.json last (io_utils.replace_dir)
  else:
    os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(output_dir.rstrip('/')) + '.tmp-', dir=parent)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
    with open(os.path.join(tmp, SPEC_FILE), 'w') as f:
      json.dump(meta, f, indent=2)
    io_utils.replace_dir(tmp, output_dir, commit_file=SPEC_FILE)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def check_writable_dir_parent(output_dir: str) -> str:
  """Returns the parent of `output_dir`; raises unless it is, or can be created as, a writable dir.

  A gs:// URL is only checked not to be a file (write permission shows at the upload)."""
  if io_utils.is_remote(output_dir):
    if io_utils.isfile(output_dir):
      raise CheckpointError(f'output {output_dir!r} exists and is not a directory')
    return output_dir.rstrip('/').rsplit('/', 1)[0]
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise CheckpointError(f'output {output_dir!r} exists and is not a directory')
  parent = os.path.dirname(output_dir)
  probe = parent
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
    raise CheckpointError(f'output directory {output_dir!r} is not writable (at {probe!r})')
  return parent


def is_converted(path: str) -> bool:
  return io_utils.isfile(os.path.join(path, SPEC_FILE)) and io_utils.isdir(os.path.join(path, PARAMS_DIR))


def load_converted(path: str) -> tuple[ModelSpec, Params]:
  """Reads a directory written by `save_converted`."""
  import orbax.checkpoint as ocp

  if not is_converted(path):
    raise CheckpointError(f'{path!r} is not a converted checkpoint (expected {SPEC_FILE} and {PARAMS_DIR}/)')
  meta = io_utils.read_json(os.path.join(path, SPEC_FILE))
  meta.pop('source', None)
  if meta.get('kind') == 'vae':
    raise CheckpointError(f'{path!r} is a converted VAE, not a DiT (give it as config.vae.checkpoint)')
  spec = ModelSpec(**meta)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(io_utils.abspath(path), PARAMS_DIR))  # orbax reads gs:// itself
  return spec, params


def load_any(path: str, name: str | None = None, input_size: int | None = None) -> tuple[ModelSpec, Params]:
  """A converted directory, an original .pt or a diffusers folder -> (spec, params)."""
  if is_converted(path):
    spec, params = load_converted(path)
    if name is not None and name != spec.name:
      raise CheckpointError(f'model name {name!r} does not match the converted checkpoint {path!r} ({spec.name})')
    return spec, params
  return load_torch_checkpoint(path, name, input_size)


# ---------------------------------------------------------------------------------------------
# The SD VAE (diffusers AutoencoderKL) -> Flax params of models/vae.py.

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
    return _read_safetensors(path, files), config
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
  return _nest_checked(params, flat_expected, 'VAE ', 'the config.json architecture')


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
  _save_dir(output_dir, {'kind': 'vae', 'config': config.to_json(), 'source': source}, params)


RANDOM_VAE = 'random'  # config.vae.checkpoint for smoke runs: the SD kl-f8 architecture, random weights


def load_vae(path: str) -> tuple[Any, Params]:
  """A converted VAE directory, a diffusers AutoencoderKL folder, or 'random' (the SD kl-f8 VAE with seeded
  random weights: smoke runs of the pipeline with no download) -> (VAEConfig, params)."""
  import orbax.checkpoint as ocp

  from dpq_jax.models import vae as vae_lib

  if path == RANDOM_VAE:
    import jax

    config = vae_lib.VAEConfig()
    return config, vae_lib.init_params(vae_lib.AutoencoderKL(config), jax.random.key(0))
  if not is_converted(path):
    return load_torch_vae(path)
  meta = io_utils.read_json(os.path.join(path, SPEC_FILE))
  if meta.get('kind') != 'vae':
    raise CheckpointError(f'{path!r} is a converted DiT, not a VAE (expected a VAE converted with --vae)')
  config = vae_lib.VAEConfig.from_diffusers(meta['config'])
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(io_utils.abspath(path), PARAMS_DIR))  # orbax reads gs:// itself
  return config, params
