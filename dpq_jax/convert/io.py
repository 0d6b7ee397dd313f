"""Reading PyTorch tensors without executing pickled code, and nesting converted arrays.

.pt files go through `torch.load(weights_only=True)` with exactly `argparse.Namespace` allowed
(train.py checkpoints pickle their args), and safetensors are tensor-only by design.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Mapping

import numpy as np

from dpq_jax.errors import CheckpointError

Params = dict[str, Any]


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch .pt state_dict into float32 numpy arrays (a checkpoint's EMA weights preferred)."""
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


def read_safetensors(path: str, files: list[str]) -> dict[str, np.ndarray]:
  """The tensors of path/files (safetensors: no pickled code) as float32 numpy arrays."""
  from safetensors.numpy import load_file

  state = {}
  for name in files:
    try:
      state.update(load_file(os.path.join(path, name)))
    except Exception as e:
      raise CheckpointError(f'cannot read {os.path.join(path, name)!r} (truncated or corrupt?): {e}') from None
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def nest_checked(params: dict, flat_expected: dict, prefix: str, expects: str) -> Params:
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
