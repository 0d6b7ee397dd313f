"""Stage `calibrate`: end-to-end calibration of the quantized DiT's codebooks on the DDPM loss.

Reads what `load` and `quantize` (and `compress`) left in the job, trains the
config's trainable set (codebooks by default) with dynamic assignments, rewrites DIR/quantized
with the calibrated codebooks and codes, and adds `calibrate` to report.json. Checkpoints go
to DIR/checkpoints; metrics (one JSON line per step) to DIR/metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpq_jax import errors, tree_utils
from dpq_jax.calibrate import data as data_lib
from dpq_jax.calibrate import loop as loop_lib
from dpq_jax.calibrate import sharding
from dpq_jax.calibrate import source as source_lib
from dpq_jax.calibrate import train_step as step_lib
from dpq_jax.calibrate import trainable as trainable_lib
from dpq_jax.models import load as load_lib
from dpq_jax.quant import feedback, lineage, metric, qweight, storage, surgery
from dpq_jax.quant import pq as pq_lib
from dpq_jax.quant import sizes as sizes_lib
from dpq_jax.stages.job import Job, QuantizedModel

ASSIGNMENTS = ('dynamic', 'ste')
ASSIGN_TARGETS = ('auto', 'weight', 'feedback')


def check(config: ml_collections.ConfigDict) -> list[str]:
  """Problems with config.calibrate / config.data, each naming the value and what was expected."""
  config = source_lib.effective_config(config)
  cfg, data = config.calibrate, config.data
  errs = []
  stages = list(config.stages)
  if 'calibrate' in stages and ('quantize' not in stages or stages.index('quantize') > stages.index('calibrate')):
    errs.append(f"config.stages={stages}: 'calibrate' needs 'quantize' before it")
  if config.quant.method == 'rtn':
    errs.append("config.quant.method='rtn': calibrate trains PQ/VQ codebooks; use method 'pq' or 'vq'")
  for key in ('steps', 'batch_size', 'checkpoint_every', 'log_every'):
    if cfg[key] < 1:
      errs.append(f'config.calibrate.{key}={cfg[key]}: expected >= 1')
  if cfg.lr <= 0:
    errs.append(f'config.calibrate.lr={cfg.lr}: expected > 0')
  if cfg.assign_every < 0:
    errs.append(f'config.calibrate.assign_every={cfg.assign_every}: expected >= 0 (0 keeps the codes fixed)')
  if cfg.assignment not in ASSIGNMENTS:
    errs.append(f'config.calibrate.assignment={cfg.assignment!r}: expected one of {", ".join(ASSIGNMENTS)}')
  if cfg.assign_target not in ASSIGN_TARGETS:
    errs.append(f'config.calibrate.assign_target={cfg.assign_target!r}: expected one of {", ".join(ASSIGN_TARGETS)}')
  elif cfg.assign_target == 'feedback' and not (config.quant.error_feedback and config.quant.objective == 'output'):
    errs.append("config.calibrate.assign_target='feedback': needs quant.error_feedback=True with quant.objective="
                f"'output' (got {config.quant.error_feedback}, {config.quant.objective!r})")  # fmt: skip
  elif cfg.assign_target == 'feedback' and cfg.assignment != 'dynamic':
    errs.append(f"config.calibrate.assign_target='feedback': needs assignment='dynamic' (got {cfg.assignment!r})")
  if cfg.remat not in step_lib.REMAT_MODES:
    errs.append(f'config.calibrate.remat={cfg.remat!r}: expected one of {", ".join(step_lib.REMAT_MODES)}')
  if cfg.optimizer not in trainable_lib.OPTIMIZERS:
    errs.append(f'config.calibrate.optimizer={cfg.optimizer!r}: expected one of {", ".join(trainable_lib.OPTIMIZERS)}')
  if cfg.schedule not in trainable_lib.SCHEDULES:
    errs.append(f'config.calibrate.schedule={cfg.schedule!r}: expected one of {", ".join(trainable_lib.SCHEDULES)}')
  if not 0 <= cfg.label_dropout < 1:
    errs.append(f'config.calibrate.label_dropout={cfg.label_dropout}: expected a probability in [0, 1)')
  if cfg.distill_weight < 0:
    errs.append(f'config.calibrate.distill_weight={cfg.distill_weight}: expected >= 0')
  try:
    patterns = trainable_lib.trainable_patterns(cfg.trainable)
    if cfg.assignment != 'ste' and any(re.fullmatch(p, 'blocks_0/mlp/fc1/latent') for p in patterns):
      errs.append(f"config.calibrate.trainable={cfg.trainable!r} trains latent weights: needs assignment='ste'")
  except ValueError as e:
    errs.append(str(e))
  try:
    mesh_names, mesh_sizes = sharding.mesh_shape(tuple(tuple(a) for a in cfg.mesh), jax.device_count())
    dp = int(np.prod(mesh_sizes))
    if cfg.batch_size % dp:
      errs.append(
        f'config.calibrate.batch_size={cfg.batch_size} is not divisible by the data-parallel size {dp} '
        f'(mesh {dict(zip(mesh_names, mesh_sizes))})'
      )
  except ValueError as e:
    errs.append(str(e))
  errs += source_lib.check(data, config)
  return errs


def run(config: ml_collections.ConfigDict, workdir: str, job: Job) -> Job:
  config = source_lib.effective_config(config)
  cfg = config.calibrate
  if job.quantized is None or job.fp_params is None:
    raise errors.ConfigError("config.stages: 'calibrate' runs after 'load' and 'quantize'")
  q, rules, spec = job.quantized.weights, job.quantized.rules, job.spec
  dtype = load_lib.DTYPES[config.model.dtype]
  variables = q.variables()  # PQDense's collections: codebooks/scale in params, codes/alive in quant
  params, quant = variables['params'], variables['quant']
  assignment = 'ste' if cfg.assignment == 'ste' else 'dynamic'
  scan = bool(config.model.get('scan_blocks', False))
  model = spec.create(dtype=dtype).clone(scan_blocks=scan)
  dynamic_model, frozen_model = step_lib.calibration_models(model, rules, assignment, cfg.remat)
  try:
    trainable_lib.split_trainable(params, trainable_lib.trainable_patterns(cfg.trainable))
  except ValueError as e:
    if cfg.assignment != 'ste':
      raise errors.ConfigError(str(e)) from None
  source = source_lib.resolve(config, workdir, job)
  metrics = latents = None
  feedback_targets = assign_target(config) == 'feedback'
  if config.quant.objective == 'output':  # argmin in the metric quantize fitted in (quantize's statistics)
    if job.moments is None or (feedback_targets and job.hessians is None):
      dims = surgery.subvector_dims(job.fp_params, rules, 'pq')
      job.moments, job.grad2, job.hessians = source_lib.layer_statistics(config, workdir, job, dims)
    metrics = {}
    if feedback_targets:  # their own conditional metrics (assign_target's check: objective 'output')
      latents, metrics, kept = _feedback_targets(q, job.fp_params, job.hessians, config.quant)
      job.notes.append(f'calibrate: assignment against the fed-back targets of {len(latents)} layers; at the start '
                       f'they keep {kept:.2%} of the codes')  # fmt: skip
    metrics.update({name: metric.factor(job.moments[name], config.quant.damping) for name in q.pq
                    if name in job.moments and name not in metrics})  # fmt: skip
  # The loop holds the latent weights stacked with the blocks; the fp kernels it takes as latents are lent to it, so
  # that the job does not keep a second, per-block copy through the steps (DiT-XL/2: 2.35 GiB), and come back after.
  lent = _lendable(job, q, cfg, latents)
  latents = {**(latents or {}), **{name: _kernel(job.fp_params, name) for name in lent}}
  if lent:
    job.fp_params = qweight.drop_kernels(job.fp_params, lent)
  try:
    out = loop_lib.calibrate(
      dynamic_model=dynamic_model,
      frozen_model=frozen_model,
      params=params,
      quant=quant,
      fp_params=job.fp_params,
      source=source,
      cfg=cfg,
      num_classes=spec.num_classes,
      workdir=workdir,
      seed=cfg.seed,
      fp_model=model,
      codebook_dtype=jnp.dtype(config.quant.codebook_dtype),
      fingerprint=lineage.fingerprint(job.links('calibrate')),
      metrics=metrics,
      latents=latents,
      probe=_probe(job, q, rules),
    )
  except BaseException:
    if lent:
      job.fp_params = None  # its lent kernels went with the failed calibration
    raise
  if lent:  # (on CPU the loop's host copy is a view of its stacked latents, and may_alias keeps it so)
    kernels = {name: jax.device_put(out['latents'][name], may_alias=True) for name in lent}
    job.fp_params = qweight.set_kernels(job.fp_params, kernels)
  q = surgery.QuantizedParams.from_variables(out['params'], out['quant'], q.rtn, q.rows)
  q = q.replace(rows=_layer_rows(q, job.fp_params))
  meta = dict(job.quantized.meta, lineage=job.links('calibrate'))
  sizes = storage.save(os.path.join(workdir, storage.ARTIFACT_DIR), q, meta, config.quant.codebook_dtype)
  job.report.update(sizes_lib.summary(q.rows, sizes, job.report['num_params']))
  summary = _summary(out, cfg, source)
  job.report['calibrate'] = summary
  job.notes.append(
    f'calibrate: {summary["steps"]} steps of batch {cfg.batch_size} on {len(source)} {config.data.source} latents '
    f'(trainable {cfg.trainable}: {summary["num_trainable_params"]:,} params); DDPM loss '
    f'{_fmt(summary["loss_first"])} -> {_fmt(summary["loss_last"])} (first/last logged steps), '
    f'{_fmt(summary["step_time_s"])} s/step; per-step metrics in metrics.jsonl'
  )
  if out['unrolled_because']:
    job.notes.append(f'calibrate: config.model.scan_blocks, but the blocks ran unrolled: {out["unrolled_because"]}')
  job.quantized = QuantizedModel(q, rules, meta)
  return job


def _lendable(job: Job, q: surgery.QuantizedParams, cfg: ml_collections.ConfigDict, latents: dict | None) -> list[str]:
  """The PQ/VQ layers whose fp kernel the loop can hold as its latent weight and give back unchanged: dynamic
  assignment (the latent is a constant, never trained), float32 kernels (attach_latent's latents are float32), not a
  fed-back target's layer; none where distillation runs the whole fp model or a probe is handed the job mid-way."""
  if cfg.assignment != 'dynamic' or cfg.distill_weight > 0 or job.calibration_probe is not None:
    return []
  return [name for name in q.pq if name not in (latents or {}) and _kernel(job.fp_params, name).dtype == jnp.float32]


def _kernel(fp_params: dict, name: str):
  return tree_utils.get_path(fp_params, name.split('/') + [qweight.KERNEL])


def assign_target(config: ml_collections.ConfigDict) -> str:
  """config.calibrate.assign_target with 'auto' resolved: 'feedback' where PQ/VQ codes were chosen with error
  feedback (quant.error_feedback, objective 'output', dynamic assignment), else 'weight'."""
  target = config.calibrate.assign_target
  if target != 'auto':
    return target
  feedback_codes = config.quant.error_feedback and config.quant.objective == 'output' and config.quant.method != 'rtn'
  return 'feedback' if feedback_codes and config.calibrate.assignment == 'dynamic' else 'weight'


def _feedback_targets(
  q: surgery.QuantizedParams, fp_params: dict, hessians: dict, qcfg: ml_collections.ConfigDict
) -> tuple[dict, dict, float]:
  """({layer: latent [in, out]}, {layer: metric factors [num_subvectors, d, d]}, fraction of codes kept) for
  config.calibrate.assign_target='feedback': each layer's fed-back targets for its starting codebooks
  (feedback.assignment_targets) times its channel scale (PQDense assigns latent / scale), and their conditional
  whitening. The fraction is how many of the artifact's codes that assignment keeps (1 for codes that error
  feedback chose for these codebooks)."""
  latents, factors, same, total = {}, {}, 0, 0
  for name, w in q.pq.items():
    if name not in hessians:
      continue
    kernel = _kernel(fp_params, name)
    codes, targets, t = feedback.assignment_targets(kernel, hessians[name], w.codebooks, w.alive,
                                                    group=qcfg.feedback_group, damping=qcfg.damping)  # fmt: skip
    latents[name] = targets if w.scale is None else targets * jnp.asarray(w.scale, jnp.float32)
    factors[name] = t
    same += int(np.sum(np.asarray(codes) == np.asarray(w.codes)))
    total += int(np.size(codes))
  return latents, factors, same / max(total, 1)


def _probe(job: Job, q: surgery.QuantizedParams, rules) -> loop_lib.Probe | None:
  """The loop's probe for job.calibration_probe (steps, fn(step, job)): fn gets the job with the model as it
  stands after that step."""
  if job.calibration_probe is None:
    return None
  steps, fn = job.calibration_probe

  def on_step(step: int, params: dict, quant: dict) -> None:
    weights = surgery.QuantizedParams.from_variables(params, quant, q.rtn, q.rows)
    fn(step, dataclasses.replace(job, quantized=QuantizedModel(weights, rules, job.quantized.meta)))

  return tuple(steps), on_step


def _layer_rows(q: surgery.QuantizedParams, fp_params: dict) -> list[dict]:
  """The quantize stage's per-layer rows with rel_mse of the calibrated weights."""
  new = []
  for row in q.rows:
    w = q.pq.get(row['name'])
    if w is not None:
      kernel = _kernel(fp_params, row['name'])
      row = dict(row, rel_mse=pq_lib.rel_mse(kernel, pq_lib.decode(w.codebooks, w.codes)))
    new.append(row)
  return new


def _fmt(v) -> str:
  return 'n/a' if v is None else f'{v:.4g}'


def _summary(out: dict, cfg: ml_collections.ConfigDict, source: data_lib.ArraySource) -> dict:
  hist = out['history']
  window = max(1, min(len(hist) // 10, 50))

  def mean(rows, key):
    return float(np.mean([r[key] for r in rows])) if rows else None

  return {
    'steps': out['steps'],
    'resumed_from_step': out['start_step'] or None,
    'batch_size': cfg.batch_size,
    'num_examples': len(source),
    'trainable': cfg.trainable,
    'num_trainable_params': out['num_trainable'],
    'loss_first': mean(hist[:window], 'loss'),
    'loss_last': mean(hist[-window:], 'loss'),
    'mse_last': mean(hist[-window:], 'mse'),
    'vb_last': mean(hist[-window:], 'vb'),
    'changed_last': mean(hist[-window:], 'changed'),
    'step_time_s': out['step_time_s'],
    'compile_s': round(out['compile_s'], 2),
  }
