"""Model surgery: quantize the linear layers of a DiT param tree chosen by path rules.

The result is a QuantizedParams: the float leftovers, the PQ/VQ layers as qweight.PQWeight and the RTN
layers as qweight.RTNWeight, by module path. Its `variables()` run in the same DiT module with
`dense=layers.dense_factory(rules)` (a PQ/VQ layer's `kernel` replaced by `codebooks` in params and
`codes` in the `quant` collection; RTN layers as dense kernels of the dequantized weights, RTN being the
scalar baseline whose packed codes and scales are what the artifact stores), and `dense_params()` in the
plain DiT.
"""

from __future__ import annotations

import os
import re
from concurrent import futures
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dpq_jax.quant import codebook_values, feedback, layers, metric, packing, pq, qweight, rtn

METHODS = ('pq', 'vq', 'rtn')


@struct.dataclass
class QuantizedParams:
  """A quantized model: a pytree (jit, tree.map, device_put) whose report rows ride along as static data."""

  fp: dict  # full-precision leftovers: biases, norms, embedders, unquantized layers; no quantized kernel
  pq: dict[str, qweight.PQWeight]  # PQ/VQ layers by module path ('blocks_0/attn/qkv')
  rtn: dict[str, qweight.RTNWeight]  # RTN layers by module path
  rows: list[dict[str, Any]] = struct.field(pytree_node=False, default_factory=list)  # per-layer report rows

  @classmethod
  def from_variables(
    cls, params: dict, quant: dict, rtn: dict[str, qweight.RTNWeight] | None = None, rows: list | tuple = ()
  ) -> QuantizedParams:
    """From PQDense variables (RTN layers' dense kernels in params are dropped: `rtn` holds them)."""
    rtn = dict(rtn or {})
    fp, weights = qweight.split(params, quant)
    return cls(qweight.drop_kernels(fp, list(rtn)), weights, rtn, list(rows))

  def variables(self) -> dict[str, dict]:
    """{'params', 'quant'} of the PQDense runtime (RTN layers as dense kernels)."""
    params, quant = qweight.scatter(self.pq, self.fp, {})
    params = qweight.set_kernels(params, {name: w.decode() for name, w in self.rtn.items()})
    return {'params': params, 'quant': quant}

  def dense_params(self) -> dict:
    """Params of the plain DiT: every quantized kernel decoded once."""
    return qweight.set_kernels(self.fp, {name: w.decode() for name, w in {**self.pq, **self.rtn}.items()})


def module_kernels(params: dict) -> list[tuple[tuple[str, ...], np.ndarray]]:
  """(module path, kernel) of every 2-D 'kernel' leaf of the param tree (the Dense layers)."""
  flat = jax.tree_util.tree_leaves_with_path(params)
  return [
    (tuple(k.key for k in path[:-1]), leaf) for path, leaf in flat if path[-1].key == qweight.KERNEL and leaf.ndim == 2
  ]


def quantize_params(
  params: dict,
  rules: layers.QuantRules,
  key: jax.Array,
  *,
  method: str = 'pq',
  iters: int = 25,
  rtn_bits: int = 2,
  rtn_group_size: int | None = None,
  rtn_clip: str = 'minmax',
  rtn_weights: dict[str, np.ndarray] | None = None,
  codebook_dtype: Any = jnp.float16,
  channel_scale: bool = False,
  moments: dict[str, Any] | None = None,
  damping: float = 0.01,
  scale_rule: str = 'norm',
  scaled_codes: bool = False,
  hessians: dict[str, Any] | None = None,
  feedback_group: int = 1,
  progress: bool = True,
) -> QuantizedParams:
  """Quantizes every Dense kernel whose module path matches `rules` (all others untouched).

  codebook_dtype: how codebook values are stored ('float16', 'bfloat16', 'float32' or 'int8'; see
  codebook_values): the codebooks are rounded to what they decode to, and bytes counted as stored.
  channel_scale: PQ/VQ layers also get a `scale` [out_features] (stored like the codebooks; float16 for
  int8 codebooks); the layer computes (x @ W_hat) * scale. scale_rule 'norm' restores each output channel's
  norm (pq.channel_scale); 'lsq' is the least-squares scale in the objective (pq.lsq_scale), after which the codes
  are re-assigned to W / scale and the scale solved again (both steps lower the objective). scaled_codes: then
  every code re-assigned to the nearest codeword of W / scale (pq.scaled_target), what calibration's dynamic
  assignment picks: lower error per layer, but the channels shrink again (README: worse samples on the demo).
  moments: {module path: [num_subvectors, d, d]} input second moments (statistics.input_moments): the layers
  found there are fitted, encoded and scaled by their output error (metric.py, `damping`) instead of the weight
  error, and their rows gain `rel_out_err`.
  hessians: {module path: [in_features, in_features]} full input second moments: the layers found there (and in
  `moments`) are quantized with error feedback across positions (feedback.py, groups of `feedback_group`
  positions; VQ: the metric's codebook, codes assigned with feedback) and their rows gain `rel_out_err_full`.
  rtn_clip: the RTN grid range per group, 'minmax' or 'mse' (rtn.quantize's clip).
  rtn_weights: {module path: h [in_features]} for rtn_clip='mse', the per-input-channel weights of each RTN
  layer's squared error (the diagonal of its inputs' second moment E[x_i^2]); None: plain MSE for every layer.
  """
  if method not in METHODS:
    raise ValueError(f'method={method!r}: expected one of {METHODS}')
  if rtn_clip not in rtn.CLIPS:
    raise ValueError(f'rtn_clip={rtn_clip!r}: expected one of {rtn.CLIPS}')
  if hessians and (method == 'rtn' or scale_rule == 'lsq' or moments is None):
    raise ValueError(f'hessians: error feedback needs PQ/VQ with moments and a norm scale rule (method={method!r}, '
                     f'scale_rule={scale_rule!r})')  # fmt: skip
  if rtn_weights is not None and (method != 'rtn' or rtn_clip != 'mse'):
    raise ValueError(f"rtn_weights: only method='rtn' with rtn_clip='mse' uses them (method={method!r})")
  codebook_dtype = codebook_values.dtype_name(codebook_dtype)
  side_dtype = codebook_values.side_dtype(codebook_dtype)  # channel / RTN scales: never int8
  side_bytes = np.dtype(side_dtype).itemsize
  targets = [(p, k) for p, k in module_kernels(params) if rules.spec_for('/'.join(p)) is not None]
  for path, kernel in targets:  # every spec is checked before any k-means runs
    name = '/'.join(path)
    if method == 'rtn':
      rtn._groups(jnp.zeros((kernel.shape[1], kernel.shape[0])), rtn_group_size)
      if rtn_weights is not None and np.shape(rtn_weights.get(name)) != (kernel.shape[0],):
        raise ValueError(
          f'rtn_weights[{name!r}]: expected weights of shape [in_features]=({kernel.shape[0]},), '
          f'got {None if name not in rtn_weights else np.shape(rtn_weights[name])}'
        )
    else:
      rules.spec_for(name).check(kernel.shape[0], kernel.shape[1], name)
  pq_weights: dict[str, qweight.PQWeight] = {}
  rtn_layers: dict[str, qweight.RTNWeight] = {}
  rows = []
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(targets), desc=f'quantize ({method})', unit='layer')
  stacked = {}  # target index -> (codebooks, codes, scale, rel_mse, sq_norm) of the layers quantized in stacks
  if method != 'rtn' and not (channel_scale and scale_rule == 'lsq'):
    plain = [i for i, (p, _) in enumerate(targets) if moments is None or '/'.join(p) not in moments]
    layers_ = [(targets[i][1], rules.spec_for('/'.join(targets[i][0]))) for i in plain]
    out = _quantize_stacks(
      layers_, key, plain, iters, codebook_dtype, side_dtype if channel_scale else None, bar, scaled_codes
    )
    stacked = {plain[j]: result for j, result in out.items()}
  for i, (path, kernel) in enumerate(targets):
    name = '/'.join(path)
    spec = rules.spec_for(name)
    if i in stacked:
      codebooks, codes, scale, rel_mse, sq_norm = stacked[i]
      code_dtype = packing.code_dtype(spec.codebook_size)
      w = qweight.PQWeight(jnp.asarray(codebooks), jnp.asarray(codes.astype(code_dtype)))
      if scale is not None:
        w = w.replace(scale=jnp.asarray(scale))
      pq_weights[name] = w
      rows.append({'name': name, 'shape': [kernel.shape[1], kernel.shape[0]],
                   'k': spec.codebook_size, 'd': spec.subvector_dim, 'index_bits': spec.index_bits,
                   'bytes': _pq_bytes(w, spec, codebook_dtype, side_bytes), 'rel_mse': rel_mse, 'sq_norm': sq_norm})  # fmt: skip
      continue
    kernel = jnp.asarray(kernel, jnp.float32)
    in_f, out_f = kernel.shape
    hessian = None
    if method == 'rtn':
      h = None if rtn_weights is None else rtn_weights[name]  # [in_features]
      codes, scale, offset = rtn.quantize(kernel.T, rtn_bits, rtn_group_size, clip=rtn_clip, weights=h)
      scale = codebook_values.round_side(scale, codebook_dtype)
      offset = codebook_values.round_side(offset, codebook_dtype)
      approx = rtn.dequantize(codes, scale, offset).T
      rtn_layers[name] = qweight.RTNWeight(np.asarray(codes), np.asarray(scale), np.asarray(offset), rtn_bits)
      nbytes = packing.packed_nbytes(codes.size, rtn_bits) + 2 * side_bytes * scale.size
      row = {'k': 2**rtn_bits, 'd': 1, 'index_bits': rtn_bits}
    else:
      layer_moments = None if moments is None else moments.get(name)
      hessian = None if hessians is None or layer_moments is None else hessians.get(name)  # [in, in]
      u = None if layer_moments is None else metric.factor(layer_moments, damping)  # [M, d, d]
      layer_key = jax.random.fold_in(key, i)
      if hessian is not None and not spec.shared:  # PQ: each group's codebooks fitted on its fed-back targets
        books = jnp.zeros((spec.num_codebooks(in_f), spec.codebook_size, spec.subvector_dim), jnp.float32)
        codebooks, codes = feedback.quantize(kernel, hessian, books, layer_key, iters=iters, group=feedback_group,
                                             damping=damping, codebook_dtype=codebook_dtype)  # fmt: skip
      else:
        codebooks, codes, _ = pq.fit(kernel, spec, layer_key, iters, u=u)
        codebooks = codebook_values.round_codebooks(codebooks, codebook_dtype)  # [num_codebooks, K, d] as stored
        if hessian is not None:  # VQ: the metric's codebook, codes one position at a time with feedback
          _, codes = feedback.quantize(kernel, hessian, codebooks, layer_key, fit='fixed', damping=damping)
        else:
          codes = pq.encode(kernel, codebooks, spec, u)  # nearest codeword of the stored (rounded) codebooks
      code_dtype = packing.code_dtype(spec.codebook_size)
      w = qweight.PQWeight(codebooks, codes.astype(code_dtype))
      if channel_scale:
        # [out_features]
        scale = pq.scale_of(kernel, w.decode(), scale_rule, layer_moments, side_dtype, hessian=hessian)
        if scale_rule == 'lsq':  # codes for W / s, then s again (of the unscaled codewords): each lowers the objective
          codes = pq.encode(kernel, codebooks, spec, u, scale=scale)
          scale = pq.scale_of(kernel, pq.decode(codebooks, codes), scale_rule, layer_moments, side_dtype)
        if scaled_codes:  # the nearest codewords of W / s, in the metric the codebooks were fitted in
          codes = pq.encode(kernel, codebooks, spec, u, scale=scale)
        w = w.replace(codes=codes.astype(code_dtype), scale=scale)
      nbytes = _pq_bytes(w, spec, codebook_dtype, side_bytes)
      approx = w.decode()
      pq_weights[name] = w
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
    if method != 'rtn' and layer_moments is not None:
      rows[-1]['rel_out_err'] = metric.rel_error(kernel, approx, layer_moments)
    if method != 'rtn' and hessian is not None:
      rows[-1]['rel_out_err_full'] = feedback.rel_error(kernel, approx, hessian)
    if bar is not None:
      bar.update(1)
      bar.set_postfix(rel_mse=f'{rows[-1]["rel_mse"]:.3f}')
  if bar is not None:
    bar.close()
  fp = qweight.drop_kernels(params, ['/'.join(path) for path, _ in targets])
  return QuantizedParams(fp, pq_weights, rtn_layers, rows)


def _quantize_stacks(
  layers_: list[tuple[Any, pq.CodebookSpec]],
  key: jax.Array,
  indices: list[int],
  iters: int,
  codebook_dtype: str,
  scale_dtype: str | None,
  bar: Any,
  scaled_codes: bool = False,
) -> dict[int, tuple]:
  """pq.quantize_stack over the groups of `stack_groups`; {position in layers_: (codebooks, codes, scale, rel_mse,
  sq_norm)} as numpy arrays and floats. A group's seeding key is key folded with indices[its first layer].

  Every distinct program (one per kernel shape and spec) is compiled up front on a thread pool: XLA's compiles
  release the GIL, so on a multi-core host they run side by side, and beside the k-means of the groups whose
  program is ready.
  """
  groups = stack_groups([(np.shape(kernel), spec) for kernel, spec in layers_])
  keys = [jax.random.fold_in(key, indices[g[0]]) for g in groups]
  programs = {}
  with futures.ThreadPoolExecutor(max_workers=max(1, min(len(groups), os.cpu_count() or 1))) as pool:
    for g, group_key in zip(groups, keys):
      kernel, spec = layers_[g[0]]
      signature = ((len(g), *np.shape(kernel)), spec)
      if signature not in programs:
        stack = jax.ShapeDtypeStruct(signature[0], jnp.float32)
        lowered = pq.quantize_stack.lower(stack, spec, group_key, iters, codebook_dtype, scale_dtype, scaled_codes)
        programs[signature] = pool.submit(lowered.compile)
    out = {}
    for g, group_key in zip(groups, keys):
      kernels = np.stack([np.asarray(layers_[i][0], np.float32) for i in g])  # [num_layers, in, out]
      compiled = programs[(kernels.shape, layers_[g[0]][1])].result()
      result = jax.device_get(compiled(kernels, group_key))
      for j, i in enumerate(g):
        scale = None if result.scale is None else result.scale[j]
        out[i] = (result.codebooks[j], result.codes[j], scale, float(result.rel_mse[j]), float(result.sq_norm[j]))
      if bar is not None:
        bar.update(len(g))
        bar.set_postfix(rel_mse=f'{float(np.mean(result.rel_mse)):.3f}')
  return out


def _pq_bytes(w: qweight.PQWeight, spec: pq.CodebookSpec, codebook_dtype: str, side_bytes: int) -> int:
  """Bytes of a PQ/VQ layer as stored: packed codes, codebook values (+ int8 scales), channel scales."""
  nbytes = (
    packing.packed_nbytes(w.codes.size, spec.index_bits)
    + w.codebooks.size * codebook_values.value_bytes(codebook_dtype)
    + w.codebooks.shape[0] * codebook_values.overhead_bytes(codebook_dtype)
  )
  return nbytes + (0 if w.scale is None else w.scale.size * side_bytes)


def stack_groups(layers: list[tuple[tuple[int, int], Any]], budget: int = pq.STACK_BUDGET_BYTES) -> list[list[int]]:
  """Which layers quantize together (pq.quantize_stack): those of one (kernel shape, spec), in consecutive groups
  of equal size (so that one compiled program serves them all) of at most `budget` float32 kernel bytes (one layer
  per group where a layer alone is larger).

  Args:
    layers: (kernel shape, spec) of each layer, in order.

  Returns:
    groups of indices into `layers`, every index once.
  """
  buckets: dict[tuple, list[int]] = {}
  for i, (shape, spec) in enumerate(layers):
    buckets.setdefault((tuple(shape), spec), []).append(i)
  groups = []
  for (shape, _), members in buckets.items():
    fit = max(1, budget // (4 * int(np.prod(shape))))  # layers per call within the budget
    size = max(s for s in range(1, min(fit, len(members)) + 1) if len(members) % s == 0)  # equal groups
    groups += [members[g : g + size] for g in range(0, len(members), size)]
  return groups


def subvector_dims(params: dict, rules: layers.QuantRules, method: str) -> dict[str, int]:
  """{module path: sub-vector length d} of the layers `rules` quantize (1 for RTN: its metric is per input channel)."""
  out = {}
  for path, _ in module_kernels(params):
    spec = rules.spec_for('/'.join(path))
    if spec is not None:
      out['/'.join(path)] = 1 if method == 'rtn' else spec.subvector_dim
  return out


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
  for regex, _ in rules:
    try:
      re.compile(regex)
    except re.error as e:
      key = 'pattern' if regex == pattern else 'overrides'
      raise ValueError(f'config.quant.{key}: {regex!r} is not a valid regex ({e})') from None
  return layers.QuantRules(tuple(rules))


def rules_of(meta: dict[str, Any]) -> layers.QuantRules:
  """The rules an artifact was quantized with, as its meta records them (`rules`: [regex, K, d, shared] rows)."""
  return layers.QuantRules(tuple((p, pq.CodebookSpec(k, d, shared)) for p, k, d, shared in meta['rules']))


def runtime_model(spec, q: QuantizedParams, rules: layers.QuantRules, cfg, dtype) -> tuple[dict, Any]:
  """(variables, module) that run the quantized model: PQDense decoding on the fly, or the plain
  DiT on weights dequantized once (config.quant.dequantize == 'load'; always for RTN). `cfg` is
  config.quant, `spec` the models.ModelSpec."""
  if cfg.method == 'rtn' or cfg.dequantize == 'load':
    return {'params': q.dense_params()}, spec.create(dtype=dtype)
  return q.variables(), spec.create(dtype=dtype, dense=layers.dense_factory(rules))
