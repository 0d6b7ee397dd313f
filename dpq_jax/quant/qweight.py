"""Quantized kernels as pytrees, and the one place that knows where PQDense keeps them.

PQWeight is one PQ/VQ kernel W_hat [in_features, out_features] = decode(codebooks, codes) [* scale];
RTNWeight one round-to-nearest kernel. Both are flax.struct dataclasses: they pass through jax.jit,
jax.tree.map and jax.device_put like any pytree (None fields are empty subtrees).

The Flax runtime (layers.PQDense) keeps a PQ/VQ layer's codebooks and scale in `params` (optax sees only
floats) and its integer codes and alive mask in the `quant` collection; calibration adds a `latent` float
weight. `modules`, `gather`, `scatter` and `split` translate between those variable trees and
{module path: PQWeight}; a module path joins the tree keys with '/' ('blocks_0/attn/qkv').
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

from dpq_jax.quant import packing, pq, rtn

# PQDense's variable names (layers.py declares them).
CODEBOOKS = 'codebooks'  # params: [num_codebooks, K, d]
SCALE = 'scale'  # params: [out_features], where quantized with a per-output-channel scale
CODES = 'codes'  # quant: [num_subvectors, out_features]
ALIVE = 'alive'  # quant: [num_codebooks, K] bool, after codebook compression
LATENT = 'latent'  # quant ('dynamic') or params ('ste'): the float weight [in_features, out_features]
KERNEL = 'kernel'  # a plain Dense layer's weight [in_features, out_features]
METRIC = 'metric'  # quant, calibration only: whitening factors [num_subvectors, d, d] of the assignment's metric


@struct.dataclass
class PQWeight:
  """One PQ/VQ-quantized kernel.

  VQ is the case of one codebook shared by every sub-vector position (num_codebooks == 1).
  """

  codebooks: Any  # [num_codebooks, K, d] float32: num_codebooks = num_subvectors (PQ) or 1 (VQ)
  codes: Any  # [num_subvectors, out_features] uint8 (K <= 256) or uint16
  alive: Any = None  # [num_codebooks, K] bool, the live codewords first (after compression), or None: all live
  scale: Any = None  # [out_features] float32 per-output-channel scale, or None

  @property
  def num_codebooks(self) -> int:
    return self.codebooks.shape[0]

  @property
  def codebook_size(self) -> int:
    return self.codebooks.shape[1]

  @property
  def subvector_dim(self) -> int:
    return self.codebooks.shape[2]

  @property
  def num_subvectors(self) -> int:
    return self.codes.shape[0]

  @property
  def shared(self) -> bool:
    """VQ: one codebook for every sub-vector position."""
    return self.num_codebooks == 1 and self.num_subvectors > 1

  @property
  def in_features(self) -> int:
    return self.num_subvectors * self.subvector_dim

  @property
  def out_features(self) -> int:
    return self.codes.shape[1]

  @property
  def index_bits(self) -> int:
    """Bits per code before compression: ceil(log2 K)."""
    return packing.index_bits(self.codebook_size)

  @property
  def spec(self) -> pq.CodebookSpec:
    return pq.CodebookSpec(self.codebook_size, self.subvector_dim, self.shared)

  def decode(self) -> jax.Array:
    """The kernel [in_features, out_features] the layer computes with."""
    kernel = pq.decode(self.codebooks, self.codes)
    return kernel if self.scale is None else kernel * self.scale


@struct.dataclass
class RTNWeight:
  """One round-to-nearest kernel (rtn.quantize): per output channel and group, a uniform grid."""

  codes: Any  # [out_features, num_groups, group_size] int32 < 2**bits
  scale: Any  # [out_features, num_groups, 1]
  offset: Any  # [out_features, num_groups, 1]
  bits: int = struct.field(pytree_node=False)

  def decode(self) -> jax.Array:
    """The kernel [in_features, out_features] (Flax layout)."""
    return rtn.dequantize(self.codes, self.scale, self.offset).T


def _copy(tree: dict) -> dict:
  """The nested dicts copied, the leaves shared."""
  return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _node(tree: dict, keys: list[str], create: bool = False) -> dict | None:
  for k in keys:
    if not isinstance(tree, dict):
      return None
    if k not in tree:
      if not create:
        return None
      tree[k] = {}
    tree = tree[k]
  return tree if isinstance(tree, dict) else None


def _prune(tree: dict) -> dict:
  """Drops the dicts left empty (a module whose only variable was removed)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      v = _prune(v)
      if not v:
        continue
    out[k] = v
  return out


def modules(params: dict) -> list[str]:
  """Paths of the PQ/VQ modules of a params tree (those holding codebooks), in tree (sorted-key) order."""
  out = []

  def walk(node: dict, keys: tuple[str, ...]) -> None:
    if CODEBOOKS in node and not isinstance(node[CODEBOOKS], dict):
      out.append('/'.join(keys))
      return
    for k in sorted(node):
      if isinstance(node[k], dict):
        walk(node[k], keys + (k,))

  walk(params, ())
  return out


def gather(params: dict, quant: dict) -> dict[str, PQWeight]:
  """{module path: PQWeight} of every PQ/VQ module of a (params, quant) pair of PQDense variables.

  Other variables (biases, latent weights) are left out. Raises ValueError for codebooks without codes.
  """
  out = {}
  for name in modules(params):
    keys = name.split('/')
    p, q = _node(params, keys), _node(quant, keys) or {}
    if CODES not in q:
      raise ValueError(f'{name}: codebooks in params but no codes in the quant collection')
    out[name] = PQWeight(p[CODEBOOKS], q[CODES], q.get(ALIVE), p.get(SCALE))
  return out


def scatter(weights: dict[str, PQWeight], params: dict, quant: dict) -> tuple[dict, dict]:
  """(params, quant) with every weight written where PQDense reads it (copies; the inputs are unchanged).

  A module's dense kernel is removed, and so are an alive mask or scale its weight does not have; its
  other variables (bias, latent) stay.
  """
  params, quant = _copy(params), _copy(quant)
  for name, w in weights.items():
    keys = name.split('/')
    p, q = _node(params, keys, create=True), _node(quant, keys, create=True)
    p.pop(KERNEL, None)
    p[CODEBOOKS] = w.codebooks
    q[CODES] = w.codes
    for node, key, value in ((q, ALIVE, w.alive), (p, SCALE, w.scale)):
      if value is None:
        node.pop(key, None)
      else:
        node[key] = value
  return params, quant


def split(params: dict, quant: dict) -> tuple[dict, dict[str, PQWeight]]:
  """(float leftovers, {module path: PQWeight}) of a (params, quant) pair: the inverse of `scatter` on them.

  The leftovers are params without the PQ/VQ variables (biases, norms, embedders, unquantized layers).
  Raises ValueError where the trees hold anything else of a quantized layer (latent weights are training
  state, not part of the quantized model).
  """
  weights = gather(params, quant)
  fp, rest = _copy(params), _copy(quant)
  for name in weights:
    keys = name.split('/')
    p, q = _node(fp, keys), _node(rest, keys)
    for key in (CODEBOOKS, SCALE):
      p.pop(key, None)
    for key in (CODES, ALIVE):
      q.pop(key, None)
    if LATENT in p:
      raise ValueError(f'{name}: a latent weight in params; expected the quantized layer only')
  rest = _prune(rest)
  if rest:
    raise ValueError(f'quant collection: {", ".join(_paths(rest))} are not codes or alive masks of a PQ/VQ layer')
  return _prune(fp), weights


def set_kernels(params: dict, kernels: dict[str, Any]) -> dict:
  """params (copied) with a dense kernel [in_features, out_features] written at each module path."""
  params = _copy(params)
  for name, kernel in kernels.items():
    _node(params, name.split('/'), create=True)[KERNEL] = kernel
  return params


def drop_kernels(params: dict, names: list[str]) -> dict:
  """params (copied) without the dense kernels of the named modules."""
  params = _copy(params)
  for name in names:
    node = _node(params, name.split('/'))
    if node is not None:
      node.pop(KERNEL, None)
  return _prune(params)


def codes(quant: dict) -> list[Any]:
  """Every codes array of a quant collection, in tree order (the leaves named `codes`)."""
  return [v for path, v in jax.tree_util.tree_leaves_with_path(quant) if getattr(path[-1], 'key', None) == CODES]


def is_latent(path: str) -> bool:
  """Whether a '/'-joined variable path names a latent weight."""
  return path.rsplit('/', 1)[-1] == LATENT


def is_assignment_input(path: str) -> bool:
  """Whether a '/'-joined variable path names a constant input of the dynamic assignment (the latent weight
  or the metric's whitening factors): calibration state, never part of the quantized model."""
  return path.rsplit('/', 1)[-1] in (LATENT, METRIC)


def _paths(tree: dict) -> list[str]:
  return ['/'.join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
