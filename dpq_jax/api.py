"""The main job from Python: load a DiT, quantize it, compress it to a budget, save it, and load it back.

Each step is the stage the CLI runs (dpq_jax/stages), after the same checks, on one config and workdir:

  run = api.Run('runs/xl', checkpoint='ckpt/dit_xl_2_256')  # or name=..., input_size=... for random weights
  run.quantize('pq', bits=1)  # K=256, d=8: DIR/quantized/ written
  run.compress(budget=24.0)  # codebooks until 24x smaller than fp32: DIR/quantized/ rewritten
  run.save()  # DIR/report.json, DIR/report.md
  model, variables, report = api.load_quantized('runs/xl')  # for model.apply and the sampler

README "Python API" has the whole example.
"""

from __future__ import annotations

import math
import os
from typing import Any

import ml_collections

from dpq_jax import errors, io_utils, pipeline
from dpq_jax.configs import common
from dpq_jax.evaluate import report as report_lib
from dpq_jax.models import load as load_lib
from dpq_jax.models.spec import ModelSpec
from dpq_jax.quant import sizes as sizes_lib
from dpq_jax.quant import storage, surgery
from dpq_jax.stages import REGISTRY, Job


def codebook_shape(bits: int, k: int = 256) -> tuple[int, int]:
  """(K, d) of PQ/VQ at `bits` index bits per weight with K codewords: d = log2(K) / bits."""
  d = math.log2(k) / bits if k > 1 and bits > 0 else 0.0
  if d < 1 or not d.is_integer():
    raise errors.ConfigError(f'bits={bits} with k={k}: log2(k) / bits must be a whole sub-vector length >= 1')
  return k, int(d)


class Run:
  """A job driven step by step; `config` is the run's ConfigDict (common.base_config), `job` the stages' Job."""

  def __init__(self, workdir: str, checkpoint: str = '', *, config: ml_collections.ConfigDict | None = None,
               **model: Any) -> None:  # fmt: skip
    """Loads the model: `checkpoint` (a converted dir, original .pt or diffusers folder; the model is inferred
    from its shapes unless `name` is given), or random weights of config.model keys given in `model`
    (`name='DiT-S/8', input_size=16`)."""
    config = (config or common.base_config()).copy_and_resolve_references()
    config.model.update(model)
    if checkpoint:
      config.model.update(init='checkpoint', checkpoint=checkpoint, name=model.get('name', ''))
    else:
      config.model.init = 'random'
    config.stages = ()
    self.config, self.workdir = config, workdir
    self.job = Job.start(config)
    self._stage('load')

  def _stage(self, name: str) -> Run:
    self.config.stages = (*self.config.stages, name)
    pipeline.check_config(self.config)  # ConfigError, one line per problem, before the stage runs
    self.job = REGISTRY[name].run(self.config, self.workdir, self.job)
    self.job.report['stages'] = list(self.config.stages)
    return self

  def quantize(self, method: str = 'pq', bits: int = 1, *, k: int = 256, d: int | None = None, **quant: Any) -> Run:
    """PQ ('pq'), VQ ('vq') or round-to-nearest ('rtn') at `bits` index bits per weight (PQ/VQ: K=k codewords of
    d = log2(k) / bits values, or the d given); more config.quant keys in `quant`. Writes DIR/quantized/."""
    if method != 'rtn' and d is None:
      k, d = codebook_shape(bits, k)
    self.config.quant.update(method=method, bits=bits, k=k, d=d or self.config.quant.d, **quant)
    return self._stage('quantize')

  def compress(self, budget: float = 24.0, **compress: Any) -> Run:
    """Codebook compression until the quantized layers are `budget` times smaller than in fp32 (or
    config.compress's budget_bytes / budget_bits given in `compress`). Rewrites DIR/quantized/."""
    self.config.compress.update(budget=budget, **compress)
    return self._stage('compress')

  def save(self) -> str:
    """Writes DIR/report.json and DIR/report.md (DIR/quantized/ holds the model since the last step);
    returns DIR."""
    report_lib.write(self.workdir, self.job.report, self.job.notes, self.config)
    return self.workdir

  @property
  def report(self) -> dict[str, Any]:
    """report.json as built so far: sizes (`bytes`, `effective_bits_per_weight`, `compression_ratio`, ...)."""
    return self.job.report

  def model(self) -> tuple[Any, dict]:
    """(module, variables) of the current model, quantized once quantize ran."""
    return self.job.runtime(self.config)


def load_quantized(path: str, dequantize: str = 'on_the_fly') -> tuple[Any, dict, dict[str, Any]]:
  """(module, variables, report) of a saved quantized model; `path` is a workdir or its quantized/ folder.

  module.apply(variables, x, t, y) runs it (PQ layers decode their codebooks on the fly; dequantize='load'
  decodes every kernel once into a plain DiT). report is the workdir's report.json, or the artifact's sizes
  where there is none."""
  artifact = path if io_utils.exists(os.path.join(path, storage.INDEX)) else os.path.join(path, storage.ARTIFACT_DIR)
  if not io_utils.exists(os.path.join(artifact, storage.INDEX)):
    raise errors.ConfigError(f'{path!r}: no quantized model ({storage.ARTIFACT_DIR}/{storage.INDEX}) there')
  meta, q = storage.load(artifact)
  spec = ModelSpec(meta['name'], meta['input_size'], meta['num_classes'], meta['learn_sigma'], meta['in_channels'])
  quant = ml_collections.ConfigDict({'method': meta['method'], 'dequantize': dequantize})
  variables, module = surgery.runtime_model(spec, q, surgery.rules_of(meta), quant, load_lib.DTYPES['float32'])
  report_file = os.path.join(os.path.dirname(artifact.rstrip('/')), 'report.json')
  if io_utils.exists(report_file):
    report = io_utils.read_json(report_file)
  else:
    num_params = load_lib.param_count(q.dense_params())
    report = sizes_lib.summary([], storage.sizes_on_disk(artifact), num_params)
  return module, variables, report
