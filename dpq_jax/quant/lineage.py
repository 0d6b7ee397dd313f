"""Which stages produced the quantized artifact, so a rerun of the same job skips them.

The stages that write DIR/quantized/ (quantize, then compress and calibrate, in config order) form a
chain. Each link's fingerprint hashes the previous link's, the stage name and the config sections that
decide its output (and, for the first, the full-precision weights' digest), so equal fingerprints mean
equal inputs all the way up. Every chain stage stores the fingerprints up to itself in the artifact's
index.json (`lineage`), and the pipeline writes DIR/lineage.json (the same list, the artifact's digest and
the report as it stood after that stage) once the stage is done. A rerun whose whole planned chain equals
both, on an artifact whose digest is the recorded one, loads the artifact instead of recomputing it and restores those report sections; any difference (a config value,
other weights, a run stopped inside the chain, an artifact edited or damaged since) recomputes the chain, where calibration still resumes
from its own checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpq_jax import io_utils

CHAIN = ('quantize', 'compress', 'calibrate')
FILE = 'lineage.json'
# Config keys that change how a stage runs, not what it writes.
_IGNORED = {
  'quant': ('dequantize',),
  'calibrate': ('log_every', 'checkpoint_every', 'keep', 'remat', 'mesh'),
}


def weights_digest(tree: Any) -> str:
  """A short digest of a param tree: every leaf's path, shape, sum and sum of absolute values."""
  if tree is None:
    return ''
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    x = jnp.asarray(x, jnp.float32)
    stats = np.asarray([jnp.sum(x), jnp.sum(jnp.abs(x))], np.float32)
    h.update(f'{jax.tree_util.keystr(path)}:{x.shape}:{stats.tobytes().hex()};'.encode())
  return h.hexdigest()[:16]


def _section(config: ml_collections.ConfigDict, name: str) -> dict:
  part = config.get(name)
  out = part.to_dict() if isinstance(part, ml_collections.ConfigDict) else {}
  for key in _IGNORED.get(name, ()):
    out.pop(key, None)
  return out


def plan(config: ml_collections.ConfigDict, fp_params: Any) -> list[dict[str, str]]:
  """[{'stage', 'fingerprint'}] of the chain stages in config.stages, in order."""
  sections = {'quantize': ('quant',), 'compress': ('quant', 'compress'), 'calibrate': ('quant', 'calibrate', 'data')}
  if config.get('quant') is not None and config.quant.get('objective') == 'output':
    sections['quantize'] = ('quant', 'data')  # the input statistics come from the data
  previous = json.dumps({
    'model': _section(config, 'model'), 'seed': config.get('seed'), 'weights': weights_digest(fp_params),
  }, sort_keys=True, default=str)  # fmt: skip
  out = []
  for stage in config.stages:
    if stage not in CHAIN:
      continue
    key = json.dumps([previous, stage, {s: _section(config, s) for s in sections[stage]}], sort_keys=True, default=str)
    previous = hashlib.sha256(key.encode()).hexdigest()[:24]
    out.append({'stage': stage, 'fingerprint': previous})
  return out


def upto(chain: list[dict[str, str]], stage: str) -> list[dict[str, str]]:
  """The links of `chain` up to and including `stage`."""
  names = [link['stage'] for link in chain]
  return chain[: names.index(stage) + 1]


def fingerprint(chain: list[dict[str, str]] | None) -> str | None:
  """The last link's fingerprint: it decides everything up to that stage."""
  return chain[-1]['fingerprint'] if chain else None


def record(workdir: str, chain: list[dict[str, str]], report: dict, artifact_digest: str) -> None:
  """DIR/lineage.json after a chain stage: its links so far, the artifact's digest and the report as it stands
  (no timings)."""
  kept = {k: v for k, v in report.items() if k not in ('timings_s', 'stages', 'config_name')}
  io_utils.write_json(os.path.join(workdir, FILE), {'lineage': chain, 'artifact': artifact_digest, 'report': kept})


def finished(
  workdir: str, artifact_meta: dict | None, chain: list[dict[str, str]], artifact_digest: str
) -> dict | None:
  """The report sections of a finished chain equal to `chain` (artifact, its digest and lineage.json agree), else
  None; an unreadable lineage.json is no record (the chain is recomputed)."""
  path = os.path.join(workdir, FILE)
  if not chain or artifact_meta is None or artifact_meta.get('lineage') != chain or not io_utils.exists(path):
    return None
  try:
    saved = io_utils.read_json(path)
    same = saved['lineage'] == chain and saved['artifact'] == artifact_digest
    return saved['report'] if same else None
  except (ValueError, KeyError, TypeError):
    return None
