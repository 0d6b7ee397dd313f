"""Converted checkpoints on disk: DIR/model.json (what the params are) + DIR/params (orbax).

A DiT's model.json is its ModelSpec plus `source`; a VAE's is {'kind': 'vae', 'config': ...}.
A directory is written in a temp dir and renamed into place (io_utils.replace_dir), so a failed
write leaves any existing DIR intact. model.json also records the size and digest of every file of
params/ (`files`), verified before orbax reads them: a damaged or truncated file is named, never restored
(directories converted before digests were recorded are read unverified).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from dpq_jax import errors, integrity, io_utils, workdir
from dpq_jax.convert import dit
from dpq_jax.errors import CheckpointError
from dpq_jax.models import dit as dit_lib
from dpq_jax.models.spec import ModelSpec

Params = dict[str, Any]

SPEC_FILE = 'model.json'
PARAMS_DIR = 'params'


def save_converted(output_dir: str, spec: ModelSpec, params: Params, source: str = '') -> None:
  """Writes DIR/model.json and DIR/params atomically: a failure leaves any existing DIR intact."""
  save_dir(output_dir, {**dataclasses.asdict(spec), 'source': source}, params)


def save_dir(output_dir: str, meta: dict[str, Any], params: Params) -> None:
  """DIR/model.json (meta) and DIR/params (orbax), built in a temp dir and renamed into place."""
  import orbax.checkpoint as ocp

  output_dir = io_utils.abspath(output_dir)
  parent = check_writable_dir_parent(output_dir)
  if io_utils.is_remote(output_dir):
    parent = None  # built in the local temp dir, uploaded with model.json last (io_utils.replace_dir)
  else:
    os.makedirs(parent, exist_ok=True)
  with io_utils.building_dir(output_dir, parent) as tmp:
    try:
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
    except BaseException:
      io_utils.join_threads_of('orbax.')  # the rest of a failed save, before building_dir removes tmp
      raise
    with open(os.path.join(tmp, SPEC_FILE), 'w') as f:
      json.dump({**meta, 'files': integrity.tree_digests(os.path.join(tmp, PARAMS_DIR))}, f, indent=2)
    io_utils.replace_dir(tmp, output_dir, commit_file=SPEC_FILE)


def check_writable_dir_parent(output_dir: str) -> str:
  """Returns the parent of `output_dir`; raises CheckpointError unless it is, or can be created as, a writable dir.

  A gs:// URL is only checked not to be a file (write permission shows at the upload)."""
  try:
    workdir.check(output_dir, what='output')
  except errors.WorkdirError as e:
    raise CheckpointError(str(e)) from None
  if io_utils.is_remote(output_dir):
    return output_dir.rstrip('/').rsplit('/', 1)[0]
  return os.path.dirname(os.path.abspath(output_dir))


def is_converted(path: str) -> bool:
  return io_utils.isfile(os.path.join(path, SPEC_FILE)) and io_utils.isdir(os.path.join(path, PARAMS_DIR))


def read_meta(path: str) -> dict[str, Any]:
  """DIR/model.json of a converted directory (`files`, the digests of params/, left out)."""
  where = os.path.join(path, SPEC_FILE)
  try:
    meta = io_utils.read_json(where)
    if not isinstance(meta, dict):
      raise ValueError('expected a JSON object')
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{where}: unreadable ({type(e).__name__}: {e}); convert the checkpoint again') from None
  meta.pop('files', None)
  return meta


def restore_params(path: str) -> Params:
  """DIR/params of a converted directory (orbax reads gs:// itself), its files verified against model.json."""
  import orbax.checkpoint as ocp

  params_dir = os.path.join(io_utils.abspath(path), PARAMS_DIR)
  fix = f'convert the checkpoint again into {path}'
  recorded = io_utils.read_json(os.path.join(path, SPEC_FILE)).get('files')
  if recorded is not None:  # before orbax opens a file: tensorstore is not fed damaged files
    integrity.verified(lambda: None, integrity.tree_checks(params_dir, recorded, fix))
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(params_dir)
  except Exception as e:  # orbax raises many types for a damaged tree; all mean the same thing here
    first = (str(e).strip().splitlines() or [''])[0][:200]
    raise CheckpointError(f'{params_dir}: cannot be restored ({type(e).__name__}: {first}); {fix}') from None
  integrity.check_finite(params, params_dir)
  return params


def load_converted(path: str) -> tuple[ModelSpec, Params]:
  """Reads a directory written by `save_converted`, checked against the model its model.json names."""
  import jax

  if not is_converted(path):
    raise CheckpointError(f'{path!r} is not a converted checkpoint (expected {SPEC_FILE} and {PARAMS_DIR}/)')
  meta = read_meta(path)
  meta.pop('source', None)
  if meta.get('kind') == 'vae':
    raise CheckpointError(f'{path!r} is a converted VAE, not a DiT (give it as config.vae.checkpoint)')
  try:
    spec = ModelSpec(**meta)
    expected = jax.eval_shape(lambda: dit_lib.init_params(spec.create(), jax.random.key(0)))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'{os.path.join(path, SPEC_FILE)}: not a model description ({e})') from None
  params = restore_params(path)
  shapes = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  for p, want in jax.tree_util.tree_leaves_with_path(expected):
    if shapes.pop(jax.tree_util.keystr(p), None) != want.shape:
      raise CheckpointError(f'{path}: params{jax.tree_util.keystr(p)} is missing or not {want.shape}, as '
                            f'{spec.name} ({SPEC_FILE}) needs; convert the checkpoint again')  # fmt: skip
  if shapes:
    raise CheckpointError(f'{path}: params{next(iter(shapes))} is not part of {spec.name} ({SPEC_FILE})')
  return spec, params


def load_any(path: str, name: str | None = None, input_size: int | None = None) -> tuple[ModelSpec, Params]:
  """A converted directory, an original .pt or a diffusers folder -> (spec, params)."""
  if is_converted(path):
    spec, params = load_converted(path)
    if name is not None and name != spec.name:
      raise CheckpointError(f'model name {name!r} does not match the converted checkpoint {path!r} ({spec.name})')
    return spec, params
  return dit.load_torch_checkpoint(path, name, input_size)
