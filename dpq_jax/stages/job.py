"""Job: what the stages of one run hand to each other.

A stage reads the fields it needs and returns the job with the fields it produced; nothing else passes
between stages. The full-precision model is `spec` + `fp_params`; the quantized model, once a stage made
or loaded one, is `quantized` (its weights, the rules that placed them and the artifact's meta), held
once: the module and variables that run it are derived (`Job.runtime`), never stored beside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

from dpq_jax.models import load as load_lib
from dpq_jax.models import scan as scan_lib
from dpq_jax.quant import layers, lineage, surgery


@dataclasses.dataclass
class QuantizedModel:
  """The run's current quantized model."""

  weights: surgery.QuantizedParams
  rules: layers.QuantRules  # which layers are quantized, with which (K, d)
  meta: dict[str, Any]  # what DIR/quantized/index.json records: model, method, rules, lineage, compress


@dataclasses.dataclass
class Job:
  """The typed hand-off between stages (see the module docstring)."""

  report: dict[str, Any]  # report.json as it is being built
  notes: list[str] = dataclasses.field(default_factory=list)  # lines for report.md
  spec: Any = None  # ModelSpec of the model (load, train)
  fp_params: dict | None = None  # its full-precision params (load, train)
  quantized: QuantizedModel | None = None  # quantize, compress, calibrate
  data: dict[str, Any] | None = None  # the train stage's dataset: train/heldout images and labels
  classifier: dict | None = None  # the train stage's digit classifier params (demo metrics)
  samples: str | None = None  # path of the ADM sample batch the sample stage wrote
  chain: list[dict[str, str]] | None = None  # the pipeline's planned lineage of quantize/compress/calibrate
  moments: dict[str, Any] | None = None  # input second moments {layer: [num_subvectors, d, d]} (objective 'output')
  grad2: dict[str, Any] | None = None  # output-gradient energies {layer: [out_features]} (compress distortion 'loss')
  # (steps, fn(step, job)): stage `calibrate` calls fn with the job's model as it stands after each of those steps
  # (0: before the first); the demo's calibration-budget curves. None: no probe.
  calibration_probe: tuple[tuple[int, ...], Callable[[int, Job], None]] | None = None
  hessians: dict[str, Any] | None = None  # full input second moments {layer: [in, in]} (quant.error_feedback)

  @classmethod
  def start(cls, config: ml_collections.ConfigDict) -> Job:
    """An empty job for `config`: the report's header and nothing else."""
    report = {'config_name': config.name, 'stages': list(config.stages), 'metrics': {}, 'timings_s': {}}
    return cls(report=report)

  def links(self, stage: str) -> list[dict[str, str]] | None:
    """The planned lineage up to `stage` (what its artifact records), or None outside a planned chain
    (e.g. the demo's rows)."""
    return lineage.upto(self.chain, stage) if self.chain else None

  def runtime(self, config: ml_collections.ConfigDict) -> tuple[Any, dict]:
    """(module, variables) that run the job's current model: the quantized one where there is one.

    With config.model.scan_blocks the blocks run under nn.scan on variables stacked per block (a note says
    so where the blocks differ and run unrolled)."""
    dtype = load_lib.DTYPES[config.model.dtype]
    scan = bool(config.model.get('scan_blocks', False))
    if self.quantized is None:
      module, variables = self.spec.create(dtype=dtype), {'params': self.fp_params}
    else:
      q = self.quantized
      variables, module = surgery.runtime_model(self.spec, q.weights, q.rules, config.quant, dtype)
    module, variables, why = scan_lib.runnable(module.clone(scan_blocks=scan), variables)
    if why and why not in ''.join(self.notes):
      self.notes.append(f'config.model.scan_blocks: the blocks run unrolled: {why}')
    return module, variables
