"""Stage `compress`: codebook compression of the quantized model to `config.compress`'s size budget.

Runs after `quantize` and may run again after calibration: it reads the current model (the live
variables in `state`, or the artifact in DIR/quantized when the state holds none), compresses every
PQ/VQ layer with `compress.py`, and rewrites DIR/quantized atomically, refusing to replace it unless
the written files meet the budget.

Budget scope (what "24x vs fp32" measures): the quantized layers' codes, codebooks (live rows and K'
of each codebook) and their full-precision biases, against the fp32 bytes of those kernels and biases.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpq_jax import errors, io_utils, tree_utils
from dpq_jax.quant import codebook_values, compress, lineage, packing, pq, storage, surgery
from dpq_jax.quant import layers as layers_lib
from dpq_jax.quant import sizes as sizes_lib
from dpq_jax.quant import stage as quantize_stage

IMPORTANCE = ('usage', 'sensitivity')
DISTORTION = ('absolute', 'relative')
REFERENCES = ('original', 'decoded')


@dataclasses.dataclass
class Layer:
  """One PQ/VQ layer to compress."""

  name: str
  codebooks: np.ndarray  # [num_codebooks, K, d]
  codes: np.ndarray  # [num_subvectors, out_features]
  reference: np.ndarray  # [in_features, out_features]: the weights the codes approximate
  bias_bytes: int = 0  # full-precision bias bytes kept with the layer (inside the budget scope)
  energy: np.ndarray | None = None  # [in_features] input-activation energy (sensitivity), or None
  scale: np.ndarray | None = None  # [out_features] per-output-channel scale: recomputed after compression


def _problems(layer: Layer, distortion: str = 'absolute') -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(x [num_codebooks, num_points, d], codes [num_codebooks, num_points], weights or None).

  distortion 'relative': the point weights divided by the layer's own scale, sum_i e_i ||W_i||^2 over input
  channels i (e_i the activation energy, or 1), so every layer's squared error counts relative to its size
  (the allocation across layers no longer favours layers with large weights or inputs); within a layer the
  order and the centroids are unchanged."""
  num_codebooks, _, d = layer.codebooks.shape
  x = pq.to_subvectors(jnp.asarray(layer.reference, jnp.float32), d)  # [M, out, d]
  codes = jnp.asarray(layer.codes, jnp.int32)  # [M, out]
  weights = None
  if layer.energy is not None:
    per_position = np.asarray(layer.energy, np.float32).reshape(-1, d).mean(axis=1)  # [M]
    weights = jnp.broadcast_to(jnp.asarray(per_position)[:, None], codes.shape)
  if distortion == 'relative':
    ref = np.asarray(layer.reference, np.float32)  # [in, out]
    energy = np.ones(ref.shape[0], np.float32) if layer.energy is None else np.asarray(layer.energy, np.float32)
    norm = float(np.sum(energy[:, None] * np.square(ref)))
    weights = (jnp.ones(codes.shape, jnp.float32) if weights is None else weights) / max(norm, 1e-30)
  if num_codebooks == 1:  # VQ: one problem over all of the layer's sub-vectors
    x, codes = x.reshape(1, -1, d), codes.reshape(1, -1)
    weights = None if weights is None else weights.reshape(1, -1)
  return x, codes, weights


def compress_layers(
  layers: list[Layer],
  target_bytes: int,
  *,
  merge: bool = True,
  lloyd_steps: int = 2,
  min_live: int = 1,
  codebook_dtype: str = 'float16',
  progress: bool = True,
  distortion: str = 'absolute',
) -> tuple[list[compress.Compressed], dict[str, Any]]:
  """Compresses `layers` so that their codes + codebooks + biases fit `target_bytes` on disk.

  Returns the compressed layers (codebooks rounded to what codebook_dtype stores, codebook_values.round_codebooks
  over the survivors; codes re-assigned to the rounded survivors) and an info dict with the predicted bytes,
  the allocation and per-layer rows.

  Raises:
    compress.BudgetError: target below the minimum reachable size (named in the message).
  """
  value_bytes = codebook_values.value_bytes(codebook_dtype)
  overhead = codebook_values.overhead_bytes(codebook_dtype)  # per codebook (int8: its fp16 scale)
  side_dtype = codebook_values.side_dtype(codebook_dtype)  # per-output-channel scales: never int8
  side_bytes = np.dtype(side_dtype).itemsize
  bar = _bar(progress, 2 * len(layers), 'compress')
  if len({layer.codebooks.shape[1:] for layer in layers}) > 1:
    raise ValueError('compress_layers: every layer needs the same codebook size K and sub-vector length d')
  w_all, m_all, nbytes = [], [], []
  for layer in layers:
    x, codes, weights = _problems(layer, distortion)
    num_codebooks, codebook_size, d = layer.codebooks.shape
    w, m = compress.atoms(x, layer.codebooks, codes, weights)
    w_all.append(np.asarray(w))
    m_all.append(np.asarray(m))
    live = np.arange(codebook_size, 0, -1)  # K' after 0, 1, ..., K - 1 removals
    size_bytes = compress.size_dtype(codebook_size).itemsize
    per = compress.codebook_bytes(live, x.shape[1], d, value_bytes, size_bytes, overhead)
    nbytes.append(np.broadcast_to(per, (num_codebooks, codebook_size)))
    _tick(bar)
  path_all = compress.paths_of_atoms(np.concatenate(w_all), np.concatenate(m_all), merge=merge)
  fixed = sum(layer.bias_bytes for layer in layers)
  scale_bytes = sum(0 if layer.scale is None else layer.scale.size * side_bytes for layer in layers)
  try:
    alloc = compress.allocate(path_all.cost, np.concatenate(nbytes), target_bytes - fixed - scale_bytes, min_live)
  except compress.BudgetError as e:
    minimum = e.min_bytes + fixed + scale_bytes
    raise compress.BudgetError(
      f'budget of {target_bytes} bytes is below the minimum reachable size of {minimum} bytes '
      f'({min_live} live codeword(s) per codebook, their codes at ceil(log2 {min_live}) bits, and {fixed} bytes '
      'of full-precision biases)',
      minimum,
    ) from None
  out, rows, scales, offset = [], [], [], 0
  for layer in layers:
    x, codes, weights = _problems(layer, distortion)
    num_codebooks = layer.codebooks.shape[0]
    part = slice(offset, offset + num_codebooks)
    path = compress.Path(*(jnp.asarray(a[part]) for a in path_all))
    num_live = jnp.asarray(alloc.num_live[part], jnp.int32)
    offset += num_codebooks
    result = compress.realize(x, layer.codebooks, codes, path, num_live, weights, merge=merge, lloyd_steps=lloyd_steps)
    rounded = codebook_values.round_codebooks(result.codebooks, codebook_dtype, result.alive)
    new_codes = compress.assign_survivors(x, rounded, result.alive)  # nearest survivor of the stored codebooks
    new_codes = new_codes.reshape(layer.codes.shape)
    scale = None
    if layer.scale is not None:  # the norms the re-assigned reconstruction restores
      scale = pq.channel_scale(layer.reference, pq.decode(rounded, new_codes), side_dtype)
    out.append(compress.Compressed(rounded, new_codes, result.alive))
    scales.append(scale)
    rows.append(_row(layer, rounded, new_codes, np.asarray(num_live), codebook_dtype, scale))
    _tick(bar)
  if bar is not None:
    bar.close()
  predicted = int(sum(r['bytes'] for r in rows)) + fixed
  info = {
    'target_bytes': int(target_bytes),
    'predicted_bytes': predicted,
    'min_bytes': int(alloc.min_bytes + fixed + scale_bytes),
    'estimated_distortion_increase': alloc.distortion,
    'rows': rows,
    'scales': scales,  # per layer: the recomputed per-output-channel scale [out_features], or None
  }
  return out, info


def _row(layer: Layer, codebooks: jax.Array, codes: jax.Array, num_live: np.ndarray, codebook_dtype: str,
         scale: jax.Array | None = None) -> dict:  # fmt: skip
  num_codebooks, codebook_size, d = layer.codebooks.shape
  in_f, out_f = layer.reference.shape
  per_codebook = np.asarray(codes).reshape(num_codebooks, -1)
  nbytes = compress.codebook_bytes(
    num_live,
    per_codebook.shape[1],
    d,
    codebook_values.value_bytes(codebook_dtype),
    compress.size_dtype(codebook_size).itemsize,
    codebook_values.overhead_bytes(codebook_dtype),
  )
  bits = compress.bits_of(num_live)
  reference = jnp.asarray(layer.reference, jnp.float32)
  decoded = pq.decode(codebooks, codes)
  nbytes = int(nbytes.sum())
  if scale is not None:
    decoded = decoded * scale
    nbytes += scale.size * np.dtype(codebook_values.side_dtype(codebook_dtype)).itemsize
  return {
    'name': layer.name,
    'shape': [out_f, in_f],
    'k': codebook_size,
    'd': d,
    'k_live': float(num_live.mean()),
    'index_bits': float(bits.mean()),
    'bytes': nbytes,
    'rel_mse': pq.rel_mse(reference, decoded),
    'sq_norm': float(jnp.sum(jnp.square(reference))),
    'code_entropy_bits': compress.code_entropy_bits(per_codebook, codebook_size),
  }


def _bar(progress: bool, total: int, desc: str):
  if not progress:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, unit='step')


def _tick(bar) -> None:
  if bar is not None:
    bar.update(1)


# ---------------------------------------------------------------------------------------------------------
# Budget forms and config.


def target_bytes(cfg: ml_collections.ConfigDict, fp32_bytes: int, quantized_weights: int) -> int:
  """Bytes of the budget scope: budget_bytes, else budget_bits per quantized weight, else fp32 / budget."""
  if cfg.budget_bytes:
    return int(cfg.budget_bytes)
  if cfg.budget_bits:
    return int(cfg.budget_bits * quantized_weights // 8)
  return int(fp32_bytes // cfg.budget)


def check_config(cfg: ml_collections.ConfigDict, quant_method: str) -> list[str]:
  """Problems with config.compress, each naming the value and what was expected."""
  problems = []
  if quant_method not in ('pq', 'vq'):
    problems.append(f"config.quant.method={quant_method!r}: stage 'compress' needs 'pq' or 'vq' codebooks")
  for key in ('budget_bytes', 'budget_bits'):
    if cfg[key] < 0:
      problems.append(f'config.compress.{key}={cfg[key]}: expected a positive value, or 0 to leave it unset')
  if not (cfg.budget_bytes or cfg.budget_bits) and not cfg.budget > 1:
    problems.append(f'config.compress.budget={cfg.budget}: expected a compression ratio > 1 vs fp32')
  if cfg.importance not in IMPORTANCE:
    problems.append(f'config.compress.importance={cfg.importance!r}: expected one of {", ".join(IMPORTANCE)}')
  if cfg.distortion not in DISTORTION:
    problems.append(f'config.compress.distortion={cfg.distortion!r}: expected one of {", ".join(DISTORTION)}')
  if cfg.reference not in REFERENCES:
    problems.append(f'config.compress.reference={cfg.reference!r}: expected one of {", ".join(REFERENCES)}')
  if cfg.lloyd_steps < 0:
    problems.append(f'config.compress.lloyd_steps={cfg.lloyd_steps}: expected >= 0')
  if cfg.min_live < 1:
    problems.append(f'config.compress.min_live={cfg.min_live}: expected >= 1 live codeword per codebook')
  if cfg.sensitivity_batches < 1:
    problems.append(f'config.compress.sensitivity_batches={cfg.sensitivity_batches}: expected >= 1')
  return problems


# ---------------------------------------------------------------------------------------------------------
# The stage.


def _modules(params: dict) -> list[tuple[str, ...]]:
  flat = jax.tree_util.tree_leaves_with_path(params)
  return [tuple(k.key for k in p[:-1]) for p, _ in flat if p[-1].key == 'codebooks']


def activation_energy(model, variables: dict, spec, num_batches: int, seed: int, batch_size: int = 4) -> dict:
  """Mean squared input per input channel {module path: [in_features]} of every PQ/VQ layer, from
  `num_batches` forward passes on random latents, timesteps and labels."""
  import flax.linen as nn

  def energies(variables: dict, x: jax.Array, t: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    found: dict[str, jax.Array] = {}

    def record(next_fun, args, kwargs, context):
      module = context.module
      if isinstance(module, layers_lib.PQDense) and context.method_name == '__call__':
        inputs = args[0].reshape(-1, args[0].shape[-1]).astype(jnp.float32)
        found['/'.join(module.path)] = jnp.mean(jnp.square(inputs), axis=0)  # [in_features]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):  # runs while tracing: the energies leave the jit as outputs
      model.apply(variables, x, t, y)
    return found

  energies = jax.jit(energies)
  sums: dict[str, Any] = {}
  key = jax.random.key(seed)
  size = spec.input_size
  for i in range(num_batches):
    kx, kt, ky = jax.random.split(jax.random.fold_in(key, i), 3)
    x = jax.random.normal(kx, (batch_size, size, size, spec.in_channels))
    t = jax.random.randint(kt, (batch_size,), 0, 1000)
    y = jax.random.randint(ky, (batch_size,), 0, spec.num_classes + 1)
    for name, energy in energies(variables, x, t, y).items():
      sums[name] = sums.get(name, 0.0) + energy / num_batches
  return {k: np.asarray(v) for k, v in sums.items()}


def run(config: ml_collections.ConfigDict, workdir: str, state: dict) -> dict:
  cfg = config.compress
  qcfg = config.quant
  start = time.perf_counter()
  artifact = os.path.join(workdir, quantize_stage.ARTIFACT_DIR)
  q = state.get('quantized')  # quantize and calibrate both leave the current model here
  fp_params = state.get('fp_params')
  if q is None:  # stages ('load', 'compress', ...): compress the artifact already on disk
    if not io_utils.isdir(artifact):
      raise errors.ConfigError(
        f"stage 'compress': no quantized model in the state or at {artifact}; run 'quantize' first"
      )
    fp_params = fp_params or state['variables']['params']
    _, q = storage.load(artifact)
  if 'rules' not in state:
    state['rules'] = surgery.default_rules(qcfg.method, qcfg.k, qcfg.d, tuple(qcfg.overrides), qcfg.pattern)
  live_params, live_quant = q.params, q.quant
  modules = _modules(live_params)
  get = tree_utils.get_path
  needs_original = any(get(live_quant, m + ('latent',)) is None and get(live_params, m + ('latent',)) is None
                       for m in modules)  # fmt: skip
  if cfg.reference == 'original' and fp_params is None and needs_original:
    from dpq_jax.models import load as load_stage

    fp_params = load_stage.load_model(config.model, config.seed)[2]
  energy = {}
  if cfg.importance == 'sensitivity':
    # PQ modules decoding on the fly, whatever the runtime: the interceptor records PQDense inputs.
    model = state['spec'].create(dtype=state['model'].dtype, dense=layers_lib.dense_factory(state['rules']))
    variables = {'params': live_params, 'quant': live_quant}
    energy = activation_energy(model, variables, state['spec'], cfg.sensitivity_batches, config.seed)
  layers = []
  for m in modules:
    name = '/'.join(m)
    codebooks = np.asarray(tree_utils.get_path(live_params, m + ('codebooks',)), np.float32)
    codes = np.asarray(tree_utils.get_path(live_quant, m + ('codes',)))
    reference = tree_utils.get_path(live_quant, m + ('latent',))
    if reference is None:
      reference = tree_utils.get_path(live_params, m + ('latent',))
    if reference is None and cfg.reference == 'original':
      reference = tree_utils.get_path(fp_params, m + ('kernel',))
    if reference is None:
      reference = pq.decode(codebooks, codes)
    bias = tree_utils.get_path(live_params, m + ('bias',))
    scale = tree_utils.get_path(live_params, m + ('scale',))
    layers.append(Layer(name, codebooks, codes, np.asarray(reference, np.float32),
                        0 if bias is None else 4 * int(np.size(bias)), energy.get(name),
                        None if scale is None else np.asarray(scale, np.float32)))  # fmt: skip
  quantized = sum(int(np.prod(layer.reference.shape)) for layer in layers)
  fp32 = 4 * quantized + sum(layer.bias_bytes for layer in layers)
  target = target_bytes(cfg, fp32, quantized)
  try:
    compressed, info = compress_layers(
      layers,
      target,
      merge=cfg.merge,
      lloyd_steps=cfg.lloyd_steps,
      min_live=cfg.min_live,
      codebook_dtype=qcfg.codebook_dtype,
      distortion=cfg.distortion,
    )
  except compress.BudgetError as e:
    raise errors.ConfigError(f'config.compress: {e}') from None
  new_params = jax.tree.map(lambda v: v, live_params)
  new_quant = jax.tree.map(lambda v: v, live_quant)
  _set_compressed(new_params, new_quant, modules, compressed, info['scales'])
  new_q = surgery.QuantizedParams(new_params, new_quant, q.rtn, info['rows'])
  bias_paths = {'/'.join(m + ('bias',)) for m in modules}
  measured: dict[str, int] = {}

  def check(sizes: dict[str, int], entries: list[dict]) -> None:
    scope = sizes['codes'] + sizes['codebooks'] + sum(e['nbytes'] for e in entries if e['path'] in bias_paths)
    measured['bytes'] = scope
    if scope > target or scope != info['predicted_bytes']:
      raise RuntimeError(f'compressed artifact holds {scope} bytes in the budget scope: predicted '
                         f"{info['predicted_bytes']}, budget {target}")  # fmt: skip

  if io_utils.exists(os.path.join(artifact, storage.INDEX)):
    meta = storage.load_meta(artifact)
  else:
    spec = state['spec']
    meta = {'name': spec.name, 'input_size': spec.input_size, 'num_classes': spec.num_classes,
            'learn_sigma': spec.learn_sigma, 'in_channels': spec.in_channels, 'method': qcfg.method}  # fmt: skip
  meta['compress'] = {'target_bytes': target, 'merge': cfg.merge, 'importance': cfg.importance}
  meta['lineage'] = lineage.of_state(state, 'compress')
  sizes = storage.save(artifact, new_q, meta, qcfg.codebook_dtype, check=check)
  seconds = time.perf_counter() - start
  rows = info['rows']
  entropy = sum(r['code_entropy_bits'] for r in rows)
  report = state['report']
  report.update(sizes_lib.summary(rows, sizes, report['num_params']))
  report['method'] = f'{qcfg.method}-k{qcfg.k}-d{qcfg.d}-compressed'
  report['compress'] = {
    'budget': next({k: cfg[k]} for k in ('budget_bytes', 'budget_bits', 'budget') if cfg[k]),
    'scope_fp32_bytes': fp32,
    'target_bytes': target,
    'measured_bytes': measured['bytes'],
    'compression_ratio_scope': fp32 / measured['bytes'],
    'min_reachable_bytes': info['min_bytes'],
    'k_live_mean': float(np.mean([r['k_live'] for r in rows])),
    'code_entropy_bits_per_weight': entropy / quantized,
    'code_entropy_bytes': int(np.ceil(entropy / 8)),
    'importance': cfg.importance,
    'distortion': cfg.distortion,
    'merge': bool(cfg.merge),
    'lloyd_steps': cfg.lloyd_steps,
    'reference': cfg.reference,
    'seconds': round(seconds, 2),
  }
  state['quantized'] = new_q
  state['variables'], state['model'] = quantize_stage.runtime_model(
    state['spec'], new_q, state['rules'], qcfg, state['model'].dtype
  )
  return state


# ---------------------------------------------------------------------------------------------------------
# Equal-bytes comparison rows (benchmarks/compress_budget.py; the demo reuses it on its trained model).


def _set_compressed(params: dict, quant: dict, modules: list[tuple[str, ...]], compressed, scales) -> None:
  """Writes compressed layers (codebooks, codes, alive, scale) into the params / quant trees in place."""
  for m, c, scale in zip(modules, compressed, scales):
    tree_utils.set_path(params, m + ('codebooks',), np.asarray(c.codebooks))
    tree_utils.set_path(quant, m + ('codes',), np.asarray(c.codes).astype(packing.code_dtype(c.codebooks.shape[1])))
    tree_utils.set_path(quant, m + ('alive',), np.asarray(c.alive))
    if scale is not None:
      tree_utils.set_path(params, m + ('scale',), np.asarray(scale))


def _compress_tree(q: surgery.QuantizedParams, reference: dict, target: int, **kwargs) -> surgery.QuantizedParams:
  """q's PQ/VQ layers compressed to `target` bytes of codes + codebooks (biases outside the scope)."""
  modules = _modules(q.params)
  lays = []
  get = tree_utils.get_path
  for m in modules:
    scale = get(q.params, m + ('scale',))
    lays.append(Layer('/'.join(m), np.asarray(get(q.params, m + ('codebooks',))), np.asarray(get(q.quant, m + ('codes',))),
                      np.asarray(get(reference, m + ('kernel',)), np.float32),
                      scale=None if scale is None else np.asarray(scale)))  # fmt: skip
  compressed, info = compress_layers(lays, target, **kwargs)
  params, quant = jax.tree.map(lambda v: v, q.params), jax.tree.map(lambda v: v, q.quant)
  _set_compressed(params, quant, modules, compressed, info['scales'])
  return surgery.QuantizedParams(params, quant, q.rtn, info['rows'])


def _summary_row(name: str, q: surgery.QuantizedParams, seconds: float) -> dict[str, Any]:
  weights = sum(int(np.prod(r['shape'])) for r in q.layers)
  nbytes = sum(r['bytes'] for r in q.layers)
  sq = sum(r['sq_norm'] for r in q.layers)
  return {
    'name': name,
    'bytes': int(nbytes),  # codes + codebooks of the quantized layers, as packed on disk
    'effective_bits_per_weight': 8 * nbytes / weights,
    'index_bits_per_weight': float(sum(r['index_bits'] * np.prod(r['shape']) / r['d'] for r in q.layers) / weights),
    'compression_ratio': 4 * weights / nbytes,
    'weight_rel_mse': sum(r['rel_mse'] * r['sq_norm'] for r in q.layers) / sq,
    'seconds': round(seconds, 2),
  }


BASELINES = (('pq-k16-d4', 'pq', 16, 4), ('vq-k256-d8', 'vq', 256, 8))


def equal_bytes_rows(
  params: dict,
  key: jax.Array,
  *,
  baselines: tuple[tuple[str, str, int, int], ...] = BASELINES,
  pattern: str = layers_lib.DEFAULT_PATTERN,
  iters: int = 25,
  merge: bool = True,
  lloyd_steps: int = 2,
  channel_scale: bool = True,
  codebook_dtype: str = 'float16',
  progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, surgery.QuantizedParams]]:
  """PQ K=256/d=8 compressed to the bytes of each baseline (name, method, K, d) vs that baseline, on any
  params tree (the layers matched by `pattern`). Rows `pq-k256-d8-compressed@<baseline>`. Every row
  stores its codebooks as `codebook_dtype` (codebook_values), baselines included.

  Returns (rows, models): rows with name, bytes, effective/index bits per weight, compression ratio,
  weight relative MSE and seconds; models the QuantizedParams of every row (to sample from them).
  """
  import time as time_lib

  models, rows = {}, []

  def quantize(name: str, method: str, k: int, d: int) -> surgery.QuantizedParams:
    start = time_lib.perf_counter()
    q = surgery.quantize_params(params, surgery.default_rules(method, k, d, pattern=pattern), key, method=method,
                                iters=iters, channel_scale=channel_scale, codebook_dtype=codebook_dtype,
                                progress=progress)  # fmt: skip
    models[name] = q
    rows.append(_summary_row(name, q, time_lib.perf_counter() - start))
    return q

  for name, method, k, d in baselines:
    quantize(name, method, k, d)
  big = quantize('pq-k256-d8', 'pq', 256, 8)
  for ref, *_ in baselines:
    start = time_lib.perf_counter()
    target = next(r['bytes'] for r in rows if r['name'] == ref)
    name = f'pq-k256-d8-compressed@{ref}'
    models[name] = _compress_tree(big, params, target, merge=merge, lloyd_steps=lloyd_steps,
                                  codebook_dtype=codebook_dtype, progress=progress)  # fmt: skip
    rows.append(_summary_row(name, models[name], time_lib.perf_counter() - start))
  return rows, models
