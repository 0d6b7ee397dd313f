"""Converted checkpoints on disk: DIR/model.json (what the params are) + DIR/params (orbax).

A DiT's model.json is its ModelSpec plus `source`; a VAE's is {'kind': 'vae', 'config': ...}.
A directory is written in a temp dir and renamed into place (io_utils.replace_dir), so a failed
write leaves any existing DIR intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from dpq_jax import io_utils
from dpq_jax.convert import dit
from dpq_jax.errors import CheckpointError
from dpq_jax.models.spec import ModelSpec

Params = dict[str, Any]

SPEC_FILE = 'model.json'
PARAMS_DIR = 'params'


def save_converted(output_dir: str, spec: ModelSpec, params: Params, source: str = '') -> None:
  """Writes DIR/model.json and DIR/params atomically: a failure leaves any existing DIR intact."""
  save_dir(output_dir, {**dataclasses.asdict(spec), 'source': source}, params)


def save_dir(output_dir: str, meta: dict[str, Any], params: Params) -> None:
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


def read_meta(path: str) -> dict[str, Any]:
  """DIR/model.json of a converted directory."""
  return io_utils.read_json(os.path.join(path, SPEC_FILE))


def restore_params(path: str) -> Params:
  """DIR/params of a converted directory (orbax reads gs:// itself)."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(io_utils.abspath(path), PARAMS_DIR))


def load_converted(path: str) -> tuple[ModelSpec, Params]:
  """Reads a directory written by `save_converted`."""
  if not is_converted(path):
    raise CheckpointError(f'{path!r} is not a converted checkpoint (expected {SPEC_FILE} and {PARAMS_DIR}/)')
  meta = read_meta(path)
  meta.pop('source', None)
  if meta.get('kind') == 'vae':
    raise CheckpointError(f'{path!r} is a converted VAE, not a DiT (give it as config.vae.checkpoint)')
  spec = ModelSpec(**meta)
  return spec, restore_params(path)


def load_any(path: str, name: str | None = None, input_size: int | None = None) -> tuple[ModelSpec, Params]:
  """A converted directory, an original .pt or a diffusers folder -> (spec, params)."""
  if is_converted(path):
    spec, params = load_converted(path)
    if name is not None and name != spec.name:
      raise CheckpointError(f'model name {name!r} does not match the converted checkpoint {path!r} ({spec.name})')
    return spec, params
  return dit.load_torch_checkpoint(path, name, input_size)
