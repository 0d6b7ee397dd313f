"""Stage `compress`: codebook compression of the quantized model to `config.compress`'s size budget.

Runs after `quantize` and may run again after calibration: it reads the current model (the job's
quantized model, or the artifact in DIR/quantized when the job holds none), compresses every PQ/VQ
layer (quant/allocation.py), and rewrites DIR/quantized atomically, refusing to replace it unless the
written files meet the budget.
"""

from __future__ import annotations

import os
import time

import ml_collections
import numpy as np

from dpq_jax import errors, io_utils, tree_utils
from dpq_jax.calibrate import source as source_lib
from dpq_jax.models import load as load_lib
from dpq_jax.quant import allocation, codebook_values, compress, statistics, storage, surgery
from dpq_jax.quant import layers as layers_lib
from dpq_jax.quant import sizes as sizes_lib
from dpq_jax.stages.job import Job, QuantizedModel

IMPORTANCE = ('usage', 'sensitivity')
DISTORTION = ('absolute', 'relative', 'loss')
REFERENCES = ('original', 'decoded')
ORDERS = compress.ORDERS


def check(config: ml_collections.ConfigDict) -> list[str]:
  """Problems with config.compress, each naming the value and what was expected."""
  cfg, quant_method, problems = config.compress, config.quant.method, []
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
  if cfg.order not in ORDERS:
    problems.append(f'config.compress.order={cfg.order!r}: expected one of {", ".join(ORDERS)}')
  elif cfg.order == 'cost' and not cfg.merge:
    problems.append(
      "config.compress.order='cost' with config.compress.merge=False: removal by merge cost needs merge=True"
    )
  if cfg.distortion == 'loss' and config.quant.objective != 'output':
    problems.append(
      f"config.compress.distortion='loss' weights each layer's output error: needs config.quant.objective='output' "
      f'(got {config.quant.objective!r})'
    )
  if cfg.reference not in REFERENCES:
    problems.append(f'config.compress.reference={cfg.reference!r}: expected one of {", ".join(REFERENCES)}')
  if cfg.lloyd_steps < 0:
    problems.append(f'config.compress.lloyd_steps={cfg.lloyd_steps}: expected >= 0')
  if cfg.min_live < 1:
    problems.append(f'config.compress.min_live={cfg.min_live}: expected >= 1 live codeword per codebook')
  if cfg.sensitivity_batches < 1:
    problems.append(f'config.compress.sensitivity_batches={cfg.sensitivity_batches}: expected >= 1')
  return problems


def check_model(config: ml_collections.ConfigDict, params: dict) -> list[str]:
  """The budget is reachable, from the model's shapes alone (before any k-means): the smallest artifact compress
  can make, every codebook at min_live codewords plus the biases and channel scales, fits the target."""
  cfg, qcfg = config.compress, config.quant
  if qcfg.method not in ('pq', 'vq'):
    return []
  rules = surgery.default_rules(qcfg.method, qcfg.k, qcfg.d, tuple(qcfg.overrides), qcfg.pattern)
  value_bytes = codebook_values.value_bytes(qcfg.codebook_dtype)
  overhead = codebook_values.overhead_bytes(qcfg.codebook_dtype)
  side_bytes = np.dtype(codebook_values.side_dtype(qcfg.codebook_dtype)).itemsize
  minimum = fixed = quantized = 0
  for path, kernel in surgery.module_kernels(params):
    spec = rules.spec_for('/'.join(path))
    if spec is None:
      continue
    in_f, out_f = kernel.shape
    positions = in_f // spec.subvector_dim
    codebooks, points = (1, positions * out_f) if spec.shared else (positions, out_f)
    per = compress.codebook_bytes(np.array([min(cfg.min_live, spec.codebook_size)]), points, spec.subvector_dim,
                                  value_bytes, compress.size_dtype(spec.codebook_size).itemsize, overhead)  # fmt: skip
    bias = tree_utils.get_path(params, list(path) + ['bias'])
    fixed += 0 if bias is None else 4 * int(np.size(bias))
    minimum += codebooks * int(per[0]) + (out_f * side_bytes if qcfg.channel_scale else 0)
    quantized += in_f * out_f
  target = allocation.target_bytes(cfg, 4 * quantized + fixed, quantized)
  if quantized and minimum + fixed > target:
    return [
      f'config.compress: a budget of {target} bytes is below the smallest reachable size, {minimum + fixed} bytes '
      f'({cfg.min_live} live codeword(s) per codebook and {fixed} bytes of full-precision biases); raise it'
    ]
  return []


def run(config: ml_collections.ConfigDict, workdir: str, job: Job) -> Job:
  cfg = config.compress
  qcfg = config.quant
  start = time.perf_counter()
  artifact = os.path.join(workdir, storage.ARTIFACT_DIR)
  fp_params = job.fp_params
  if job.quantized is None:  # stages ('load', 'compress', ...): compress the artifact already on disk
    if not io_utils.isdir(artifact):
      raise errors.ConfigError(
        f"stage 'compress': no quantized model in the job or at {artifact}; run 'quantize' first"
      )
    meta, q = storage.load(artifact)
    rules = surgery.default_rules(qcfg.method, qcfg.k, qcfg.d, tuple(qcfg.overrides), qcfg.pattern)
    job.quantized = QuantizedModel(q, rules, meta)
  q = job.quantized.weights
  if cfg.reference == 'original' and fp_params is None and q.pq:
    fp_params = load_lib.load_model(config.model, config.seed)[2]
  energy = {}
  if cfg.importance == 'sensitivity':
    # PQ modules decoding on the fly, whatever the runtime: the interceptor records PQDense inputs.
    dtype = load_lib.DTYPES[config.model.dtype]
    model = job.spec.create(dtype=dtype, dense=layers_lib.dense_factory(job.quantized.rules))
    energy = statistics.activation_energy(model, q.variables(), job.spec, cfg.sensitivity_batches, config.seed)
  reference = fp_params if cfg.reference == 'original' else None
  moments = None
  if qcfg.objective == 'output':  # the quantize stage's statistics, or the same ones from DIR/stats
    stale = (cfg.distortion == 'loss' and not job.grad2) or (qcfg.error_feedback and job.hessians is None)
    if job.moments is None or stale:
      if job.fp_params is None or job.spec is None:
        job.spec, _, job.fp_params = load_lib.load_model(config.model, config.seed)
      dims = surgery.subvector_dims(job.fp_params, job.quantized.rules, qcfg.method)
      gradients = cfg.distortion == 'loss'
      job.moments, job.grad2, job.hessians = source_lib.layer_statistics(config, workdir, job, dims, gradients)
    moments = job.moments
  layers = allocation.layers_of(q, reference, energy, biases=True, moments=moments,
                                grad2=job.grad2 if cfg.distortion == 'loss' else None,
                                hessians=job.hessians if qcfg.error_feedback and moments is not None else None)  # fmt: skip
  quantized = sum(int(np.prod(layer.reference.shape)) for layer in layers)
  fp32 = 4 * quantized + sum(layer.bias_bytes for layer in layers)
  target = allocation.target_bytes(cfg, fp32, quantized)
  try:
    compressed, info = allocation.compress_layers(
      layers,
      target,
      merge=cfg.merge,
      order=cfg.order,
      lloyd_steps=cfg.lloyd_steps,
      min_live=cfg.min_live,
      codebook_dtype=qcfg.codebook_dtype,
      distortion=cfg.distortion,
      damping=qcfg.damping,
      scale_rule=qcfg.scale_rule,
      scaled_codes=bool(qcfg.scaled_codes),
      feedback_group=qcfg.feedback_group,
      feedback_iters=cfg.lloyd_steps,
    )
  except compress.BudgetError as e:
    raise errors.ConfigError(f'config.compress: {e}') from None
  new_q = q.replace(pq=dict(zip(q.pq, compressed)), rows=info['rows'])
  bias_paths = {f'{name}/bias' for name in q.pq}
  measured: dict[str, int] = {}

  def check(sizes: dict[str, int], entries: list[dict]) -> None:
    scope = sizes['codes'] + sizes['codebooks'] + sum(e['nbytes'] for e in entries if e['path'] in bias_paths)
    measured['bytes'] = scope
    if scope > target or scope != info['predicted_bytes']:
      raise RuntimeError(f'compressed artifact holds {scope} bytes in the budget scope: predicted '
                         f"{info['predicted_bytes']}, budget {target}")  # fmt: skip

  meta = dict(job.quantized.meta)
  meta['compress'] = {'target_bytes': target, 'merge': cfg.merge, 'order': cfg.order, 'importance': cfg.importance}
  meta['lineage'] = job.links('compress')
  sizes = storage.save(artifact, new_q, meta, qcfg.codebook_dtype, check=check)
  seconds = time.perf_counter() - start
  rows = info['rows']
  entropy = sum(r['code_entropy_bits'] for r in rows)
  report = job.report
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
    'order': cfg.order,
    'lloyd_steps': cfg.lloyd_steps,
    'reference': cfg.reference,
    'seconds': round(seconds, 2),
  }
  job.quantized = QuantizedModel(new_q, job.quantized.rules, meta)
  return job
