"""Model surgery: quantize the linear layers of a DiT param tree chosen by path rules.

The result runs in the same DiT module with `dense=layers.dense_factory(rules)`: a PQ/VQ
layer's `kernel` is replaced by `codebooks` (params) and `codes` (the `quant` collection).
RTN layers keep a dense kernel holding the dequantized weights (RTN is the scalar baseline;
its packed codes and scales are what the artifact stores).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpq_jax import tree_utils
from dpq_jax.quant import codebook_values, layers, packing, pq, rtn

METHODS = ('pq', 'vq', 'rtn')


@dataclasses.dataclass
class RTNLayer:
  codes: np.ndarray  # [out_features, num_groups, group_size] integers < 2**bits
  scale: np.ndarray  # [out_features, num_groups, 1]
  offset: np.ndarray  # [out_features, num_groups, 1]
  bits: int


@dataclasses.dataclass
class QuantizedParams:
  params: dict  # float params; PQ/VQ layers hold `codebooks` instead of `kernel`
  quant: dict  # integer codes of PQ/VQ layers: <path>/codes [num_subvectors, out_features]
  rtn: dict[str, RTNLayer]  # RTN layers by module path
  layers: list[dict[str, Any]]  # per-layer report rows


def module_kernels(params: dict) -> list[tuple[tuple[str, ...], np.ndarray]]:
  """(module path, kernel) of every 2-D 'kernel' leaf of the param tree (the Dense layers)."""
  flat = jax.tree_util.tree_leaves_with_path(params)
  return [(tuple(k.key for k in path[:-1]), leaf) for path, leaf in flat if path[-1].key == 'kernel' and leaf.ndim == 2]


def quantize_params(
  params: dict,
  rules: layers.QuantRules,
  key: jax.Array,
  *,
  method: str = 'pq',
  iters: int = 25,
  rtn_bits: int = 2,
  rtn_group_size: int | None = None,
  codebook_dtype: Any = jnp.float16,
  channel_scale: bool = False,
  progress: bool = True,
) -> QuantizedParams:
  """Quantizes every Dense kernel whose module path matches `rules` (all others untouched).

  codebook_dtype: how codebook values are stored ('float16', 'bfloat16', 'float32' or 'int8'; see
  codebook_values): the codebooks are rounded to what they decode to, and bytes counted as stored.
  channel_scale: PQ/VQ layers also get a `scale` [out_features] (stored like the codebooks; float16 for
  int8 codebooks) that restores each output channel's norm (pq.channel_scale); the layer computes
  (x @ W_hat) * scale.
  """
  if method not in METHODS:
    raise ValueError(f'method={method!r}: expected one of {METHODS}')
  codebook_dtype = codebook_values.dtype_name(codebook_dtype)
  side_dtype = codebook_values.side_dtype(codebook_dtype)  # channel / RTN scales: never int8
  side_bytes = np.dtype(side_dtype).itemsize
  targets = [(p, k) for p, k in module_kernels(params) if rules.spec_for('/'.join(p)) is not None]
  for path, kernel in targets:  # every spec is checked before any k-means runs
    name = '/'.join(path)
    if method == 'rtn':
      rtn._groups(jnp.zeros((kernel.shape[1], kernel.shape[0])), rtn_group_size)
    else:
      rules.spec_for(name).check(kernel.shape[0], kernel.shape[1], name)
  out = jax.tree.map(lambda x: x, params)
  quant: dict = {}
  rtn_layers: dict[str, RTNLayer] = {}
  rows = []
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(targets), desc=f'quantize ({method})', unit='layer')
  for i, (path, kernel) in enumerate(targets):
    name = '/'.join(path)
    spec = rules.spec_for(name)
    kernel = jnp.asarray(kernel, jnp.float32)
    in_f, out_f = kernel.shape
    node = out
    for p in path:
      node = node[p]
    if method == 'rtn':
      codes, scale, offset = rtn.quantize(kernel.T, rtn_bits, rtn_group_size)
      scale = codebook_values.round_side(scale, codebook_dtype)
      offset = codebook_values.round_side(offset, codebook_dtype)
      approx = rtn.dequantize(codes, scale, offset).T
      node['kernel'] = approx
      rtn_layers[name] = RTNLayer(np.asarray(codes), np.asarray(scale), np.asarray(offset), rtn_bits)
      nbytes = packing.packed_nbytes(codes.size, rtn_bits) + 2 * side_bytes * scale.size
      row = {'k': 2**rtn_bits, 'd': 1, 'index_bits': rtn_bits}
    else:
      codebooks, codes, _ = pq.fit(kernel, spec, jax.random.fold_in(key, i), iters)
      codebooks = codebook_values.round_codebooks(codebooks, codebook_dtype)  # [num_codebooks, K, d] as stored
      codes = pq.encode(kernel, codebooks, spec)  # nearest codeword of the stored (rounded) codebooks
      approx = pq.decode(codebooks, codes)
      del node['kernel']
      node['codebooks'] = codebooks
      tree_utils.set_path(quant, path + ('codes',), codes.astype(packing.code_dtype(spec.codebook_size)))
      nbytes = (
        packing.packed_nbytes(codes.size, spec.index_bits)
        + codebooks.size * codebook_values.value_bytes(codebook_dtype)
        + codebooks.shape[0] * codebook_values.overhead_bytes(codebook_dtype)
      )
      if channel_scale:
        node['scale'] = pq.channel_scale(kernel, approx, side_dtype)  # [out_features]
        approx = approx * node['scale']
        nbytes += node['scale'].size * side_bytes
      row = {'k': spec.codebook_size, 'd': spec.subvector_dim, 'index_bits': spec.index_bits}
    rows.append(
      {
        'name': name,
        'shape': [out_f, in_f],  # [out_features, in_features], PyTorch's convention
        **row,
        'bytes': int(nbytes),
        'rel_mse': pq.rel_mse(kernel, approx),
        'sq_norm': float(jnp.sum(jnp.square(kernel))),
      }
    )
    if bar is not None:
      bar.update(1)
      bar.set_postfix(rel_mse=f'{rows[-1]["rel_mse"]:.3f}')
  if bar is not None:
    bar.close()
  return QuantizedParams(out, quant, rtn_layers, rows)


def dequantize_params(params: dict, quant: dict) -> dict:
  """Dense params of a quantized tree: every `codebooks` + `codes` pair becomes a `kernel`
  (dequantize once at load; the plain DiT module then runs them)."""

  def walk(p: dict, q: dict) -> dict:
    out = {}
    for k, v in p.items():
      if k == 'codebooks':
        out['kernel'] = pq.decode(v, q['codes'])
        if 'scale' in p:  # per-output-channel scale (quantize_params(channel_scale=True))
          out['kernel'] = out['kernel'] * p['scale']
      elif k == 'scale' and 'codebooks' in p:
        continue
      elif isinstance(v, dict):
        out[k] = walk(v, q.get(k, {}))
      else:
        out[k] = v
    return out

  return walk(params, quant)


def default_rules(method: str, k: int, d: int, overrides: tuple[str, ...] = (), pattern: str = layers.DEFAULT_PATTERN):
  """Rules from config values; overrides are 'regex=K:d' strings tried first."""
  shared = method == 'vq'
  rules = []
  for item in overrides:
    regex, _, kd = item.rpartition('=')
    try:
      ok, od = (int(v) for v in kd.split(':'))
    except ValueError:
      raise ValueError(
        f"config.quant.overrides item {item!r}: expected 'regex=K:d', e.g. 'blocks_0/.*=256:8'"
      ) from None
    rules.append((regex, pq.CodebookSpec(ok, od, shared)))
  if method == 'rtn':  # RTN uses the rule only for selection; k/d do not apply
    rules.append((pattern, pq.CodebookSpec(1, 1, False)))
  else:
    rules.append((pattern, pq.CodebookSpec(k, d, shared)))
  return layers.QuantRules(tuple(rules))


def runtime_model(spec, q: QuantizedParams, rules: layers.QuantRules, cfg, dtype) -> tuple[dict, Any]:
  """(variables, module) that run the quantized model: PQDense decoding on the fly, or the plain
  DiT on weights dequantized once (config.quant.dequantize == 'load'; always for RTN). `cfg` is
  config.quant, `spec` the models.ModelSpec."""
  if cfg.method == 'rtn' or cfg.dequantize == 'load':
    return {'params': dequantize_params(q.params, q.quant)}, spec.create(dtype=dtype)
  return {'params': q.params, 'quant': q.quant}, spec.create(dtype=dtype, dense=layers.dense_factory(rules))
