"""Stage `quantize`: PQ / VQ / RTN of the config's layers of the full-precision model, artifact in DIR/quantized/."""

from __future__ import annotations

import os
import time

import jax
import ml_collections

from dpq_jax import errors
from dpq_jax.calibrate import source as source_lib
from dpq_jax.quant import codebook_values, pq, rtn, storage, surgery
from dpq_jax.quant import sizes as sizes_lib
from dpq_jax.stages.job import Job, QuantizedModel

DEQUANTIZE = ('on_the_fly', 'load')
OBJECTIVES = ('weight', 'output')


def check(config: ml_collections.ConfigDict) -> list[str]:
  """Problems with config.quant, each naming the value and what was expected."""
  cfg, errors = config.quant, []
  if cfg.method not in surgery.METHODS:
    errors.append(f'config.quant.method={cfg.method!r}: expected one of {", ".join(surgery.METHODS)}')
  elif cfg.method == 'rtn':
    if not 1 <= cfg.bits <= 16:
      errors.append(f'config.quant.bits={cfg.bits}: expected 1..16 bits for rtn')
  else:
    if cfg.k < 1:
      errors.append(f'config.quant.k={cfg.k}: expected a codebook size >= 1')
    elif cfg.k > 2**16:
      errors.append(f'config.quant.k={cfg.k}: at most 65536 codewords (16-bit codes) are supported')
    if cfg.d < 1:
      errors.append(f'config.quant.d={cfg.d}: expected a sub-vector length >= 1')
  if cfg.rtn_clip not in rtn.CLIPS:  # checked for every method, as surgery.quantize_params does
    errors.append(f'config.quant.rtn_clip={cfg.rtn_clip!r}: expected one of {", ".join(rtn.CLIPS)}')
  if cfg.kmeans_iters < 0:
    errors.append(f'config.quant.kmeans_iters={cfg.kmeans_iters}: expected >= 0')
  if cfg.dequantize not in DEQUANTIZE:
    errors.append(f'config.quant.dequantize={cfg.dequantize!r}: expected one of {", ".join(DEQUANTIZE)}')
  if cfg.codebook_dtype not in codebook_values.DTYPES:
    errors.append(
      f"config.quant.codebook_dtype={cfg.codebook_dtype!r}: expected 'float16', 'bfloat16', 'float32' or 'int8'"
    )
  if cfg.objective not in OBJECTIVES:
    errors.append(f'config.quant.objective={cfg.objective!r}: expected one of {", ".join(OBJECTIVES)}')
  if cfg.scale_rule not in pq.SCALE_RULES:
    errors.append(f'config.quant.scale_rule={cfg.scale_rule!r}: expected one of {", ".join(pq.SCALE_RULES)}')
  if cfg.error_feedback:  # PQ/VQ layers; RTN rounds without it
    if cfg.objective != 'output':
      errors.append(f"config.quant.error_feedback=True: needs objective 'output' (got {cfg.objective!r})")
    if cfg.scale_rule == 'lsq':
      errors.append(
        "config.quant.error_feedback=True: scale_rule 'lsq' is not supported; expected 'norm' or 'output_norm'"
      )
    if cfg.feedback_group < 1:
      errors.append(f'config.quant.feedback_group={cfg.feedback_group}: expected >= 1 positions')
  if cfg.scale_rule == 'output_norm' and cfg.objective != 'output':
    errors.append(f"config.quant.scale_rule='output_norm': needs objective 'output' (got {cfg.objective!r})")
  if cfg.damping < 0:
    errors.append(f'config.quant.damping={cfg.damping}: expected >= 0 (a fraction of mean(diag H))')
  if cfg.objective == 'output':
    for key in ('stats_batches', 'stats_batch_size'):
      if cfg[key] < 1:
        errors.append(f"config.quant.{key}={cfg[key]}: expected >= 1 for objective 'output'")
    if cfg.stats_conditions < 0:
      errors.append(f'config.quant.stats_conditions={cfg.stats_conditions}: expected >= 0 (0: no conditioning pass)')
    if cfg.stats_guidance < 0:
      errors.append(f'config.quant.stats_guidance={cfg.stats_guidance}: expected >= 0 (0: no guided inputs)')
    config = source_lib.effective_config(config)
    errors += source_lib.check(config.data, config)
  try:
    surgery.default_rules(cfg.method, max(cfg.k, 1), max(cfg.d, 1), tuple(cfg.overrides), cfg.pattern)
  except ValueError as e:
    errors.append(str(e))
  return errors


def check_shapes(cfg: ml_collections.ConfigDict, params: dict) -> None:
  """Every matched layer's (K, d) fits its shape; raises ConfigError before any k-means."""
  try:
    _check_shapes(cfg, params)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None


def _check_shapes(cfg: ml_collections.ConfigDict, params: dict) -> None:
  if cfg.method == 'rtn':
    return
  rules = surgery.default_rules(cfg.method, cfg.k, cfg.d, tuple(cfg.overrides), cfg.pattern)
  matched = 0
  for path, kernel in surgery.module_kernels(params):
    name = '/'.join(path)
    spec = rules.spec_for(name)
    if spec is not None:
      matched += 1
      spec.check(kernel.shape[0], kernel.shape[1], f'config.quant: layer {name}')
  if not matched:
    raise ValueError(f'config.quant.pattern={cfg.pattern!r} matches no linear layer of the model')


def run(config: ml_collections.ConfigDict, workdir: str, job: Job) -> Job:
  cfg = config.quant
  params = job.fp_params
  check_shapes(cfg, params)
  rules = surgery.default_rules(cfg.method, cfg.k, cfg.d, tuple(cfg.overrides), cfg.pattern)
  moments = None
  if cfg.objective == 'output':
    start = time.perf_counter()
    dims = surgery.subvector_dims(params, rules, cfg.method)
    loss = config.compress.distortion == 'loss' and 'compress' in config.stages  # compress will need the gradients
    job.moments, job.grad2, job.hessians = source_lib.layer_statistics(config, workdir, job, dims, gradients=loss)
    moments = job.moments
    job.report['stats_seconds'] = round(time.perf_counter() - start, 2)
  start = time.perf_counter()
  q = surgery.quantize_params(
    params,
    rules,
    jax.random.key(cfg.seed),
    method=cfg.method,
    iters=cfg.kmeans_iters,
    rtn_bits=cfg.bits,
    rtn_group_size=cfg.group_size or None,
    rtn_clip=cfg.rtn_clip,
    # {module path: h [in_features]}: E[x_i^2] of each RTN layer's inputs (its d=1 moments) weights the clipping
    # search by the layer-output error (objective 'output'); None: plain weight MSE.
    rtn_weights=None
    if moments is None or cfg.method != 'rtn' or cfg.rtn_clip != 'mse'
    else {n: m[:, 0, 0] for n, m in moments.items()},  # fmt: skip
    codebook_dtype=cfg.codebook_dtype,
    channel_scale=bool(cfg.channel_scale),
    moments=None if cfg.method == 'rtn' else moments,
    damping=cfg.damping,
    scale_rule=cfg.scale_rule,
    scaled_codes=bool(cfg.scaled_codes),
    # {module path: [in, in]}: only with error_feedback (layer_statistics); RTN rounds without feedback
    hessians=job.hessians if moments is not None and cfg.method != 'rtn' else None,
    feedback_group=cfg.feedback_group,
  )
  seconds = time.perf_counter() - start
  spec = job.spec
  meta = {
    'name': spec.name,
    'input_size': spec.input_size,
    'num_classes': spec.num_classes,
    'learn_sigma': spec.learn_sigma,
    'in_channels': spec.in_channels,
    'method': cfg.method,
    'rules': [[p, s.codebook_size, s.subvector_dim, s.shared] for p, s in rules.rules],
    'lineage': job.links('quantize'),
  }
  sizes = storage.save(os.path.join(workdir, storage.ARTIFACT_DIR), q, meta, cfg.codebook_dtype)
  num_params = job.report['num_params']
  summary = sizes_lib.summary(q.rows, sizes, num_params)
  if cfg.method == 'rtn':
    method = f'rtn-{cfg.bits}bit' + ('-mse' if cfg.rtn_clip == 'mse' else '')
  else:
    method = f'{cfg.method}-k{cfg.k}-d{cfg.d}'
  job.report.update(summary, method=method, quantize_kmeans_seconds=round(seconds, 2))
  job.quantized = QuantizedModel(q, rules, meta)
  return job
