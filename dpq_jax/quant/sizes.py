"""Size accounting of a quantized model, in report.json's vocabulary (DESIGN.md)."""

from __future__ import annotations

from typing import Any

import numpy as np


def summary(rows: list[dict[str, Any]], sizes: dict[str, int], num_params: int) -> dict[str, Any]:
  """Report keys from per-layer rows, the artifact's on-disk sizes and the fp model's param count.

  index_bits_per_weight: code bits per quantized weight (as packed on disk);
  effective_bits_per_quantized_weight: codes + codebooks per quantized weight;
  effective_bits_per_weight: the whole artifact per weight of the model;
  compression_ratio: fp32 bytes of the quantized kernels / their codes + codebooks;
  compression_ratio_model: fp32 bytes of the model / the artifact.
  output_rel_err: the mean over layers of each layer's relative output error under its input moments
  (metric.rel_error), where the rows have one (objective 'output').
  Every byte figure is measured on disk (storage.sizes_on_disk), never derived from a bytes-per-value
  formula: `codebooks` is all of codebooks.bin (codebook values in config.quant.codebook_dtype, the float16
  scale per codebook of int8 codebooks, per-output-channel scales, K' of compressed codebooks).
  """
  quantized = int(sum(np.prod(r['shape']) for r in rows))
  compressed = sizes['codes'] + sizes['codebooks']
  sq = sum(r['sq_norm'] for r in rows)
  err = sum(r['rel_mse'] * r['sq_norm'] for r in rows)
  out_err = [r['rel_out_err'] for r in rows if 'rel_out_err' in r]
  return {
    'num_params': num_params,
    'quantized_weights': quantized,
    'index_bits_per_weight': 8 * sizes['codes'] / quantized if quantized else None,
    'effective_bits_per_quantized_weight': 8 * compressed / quantized if quantized else None,
    'effective_bits_per_weight': 8 * sizes['total'] / num_params,
    'bytes': dict(sizes),
    'fp32_bytes': 4 * num_params,
    'compression_ratio': 4 * quantized / compressed if compressed else None,
    'compression_ratio_model': 4 * num_params / sizes['total'],
    'weight_rel_mse': err / sq if sq else 0.0,
    **({'output_rel_err': float(np.mean(out_err))} if out_err else {}),
    'layers': [{k: v for k, v in r.items() if k != 'sq_norm'} for r in rows],
  }
