"""PyTorch DiT checkpoints -> Flax params.

Two sources are read: the original repository's checkpoints (the released
`DiT-XL-2-256x256.pt` is a plain state_dict; train.py checkpoints hold `model`, `ema`, `opt`
and a pickled `argparse.Namespace` under `args`) and diffusers' DiTTransformer2DModel folders
(config.json + safetensors). diffusers keys are first renamed to the original's, so one
table (in `_flax_key`) maps everything onto the Flax module tree of `models/dit.py`.

Loading never executes pickled code (see convert/io.py). Converted checkpoints on disk are
convert/checkpoint.py's; the SD VAE is convert/vae.py's.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from dpq_jax import integrity, io_utils
from dpq_jax.convert.io import nest_checked, read_safetensors, read_torch_state_dict
from dpq_jax.errors import CheckpointError
from dpq_jax.models import dit as dit_lib
from dpq_jax.models.spec import ModelSpec

Params = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Reading diffusers folders (.pt files: convert.io.read_torch_state_dict).


def read_diffusers_folder(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads a diffusers DiTTransformer2DModel folder: (state dict, config)."""
  if os.path.isdir(os.path.join(path, 'transformer')):
    path = os.path.join(path, 'transformer')  # A whole DiTPipeline folder.
  cfg_path = os.path.join(path, 'config.json')
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f'{path!r} is not a diffusers model folder: no config.json')
  try:
    with open(cfg_path) as f:
      config = json.load(f)
    size = config.get('sample_size') if isinstance(config, dict) else 'no JSON object'
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
      raise ValueError(f'sample_size={size!r}, expected a positive latent size')
  except ValueError as e:  # (json's decode errors are ValueErrors)
    raise CheckpointError(f'{cfg_path}: not a diffusers DiT config ({e})') from None
  files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
  if not files:
    raise CheckpointError(f'{path!r} holds no .safetensors weights (only safetensors are read, never pickles)')
  return read_safetensors(path, files), config


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
  found = [s for s, z in dit_lib.SIZES.items() if (z.hidden_size, z.depth) == (hidden, depth)]
  inferred = f'DiT-{found[0]}/{patch}' if found and patch in dit_lib.PATCH_SIZES else None
  if name is None:
    if inferred is None:
      raise CheckpointError(
        f'checkpoint shapes (hidden {hidden}, depth {depth}, patch {patch}) match no DiT in {dit_lib.MODEL_NAMES}'
      )
    name = inferred
  else:
    dit_lib.parse_name(name)  # Raises on an unknown name.
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
  expected = jax.eval_shape(lambda: dit_lib.init_params(model, jax.random.key(0)))
  flat_expected = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(expected)}
  params: dict[tuple[str, ...], np.ndarray] = {}
  leftovers = []
  for key, value in state.items():
    if key == 'pos_embed':
      grid = spec.input_size // dit_lib.parse_name(spec.name)[1]
      want = dit_lib.get_2d_sincos_pos_embed(value.shape[-1], grid)
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
  return nest_checked(params, flat_expected, '', spec.name)


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
  integrity.check_finite(state, f'checkpoint {path}')
  spec = infer_spec(state, name, input_size)
  return spec, original_to_flax(state, spec)


def load_torch_dit(path: str, name: str | None = None) -> tuple[str, Params]:
  """Public API: an original .pt file or a diffusers DiT folder -> (model name, Flax params)."""
  spec, params = load_torch_checkpoint(path, name)
  return spec.name, params
