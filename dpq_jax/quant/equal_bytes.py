"""Equal-bytes comparison rows: PQ K=256/d=8 compressed to the bytes of each baseline, against that baseline
(benchmarks/compress_budget.py; the demo reuses it on its trained model)."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from dpq_jax.quant import allocation, surgery
from dpq_jax.quant import layers as layers_lib


def compress_tree(q: surgery.QuantizedParams, reference: dict, target: int, **kwargs) -> surgery.QuantizedParams:
  """q's PQ/VQ layers compressed to `target` bytes of codes + codebooks (biases outside the scope)."""
  lays = allocation.layers_of(q, reference)
  compressed, info = allocation.compress_layers(lays, target, **kwargs)
  return q.replace(pq=dict(zip(q.pq, compressed)), rows=info['rows'])


def summary_row(name: str, q: surgery.QuantizedParams, seconds: float) -> dict[str, Any]:
  weights = sum(int(np.prod(r['shape'])) for r in q.rows)
  nbytes = sum(r['bytes'] for r in q.rows)
  sq = sum(r['sq_norm'] for r in q.rows)
  return {
    'name': name,
    'bytes': int(nbytes),  # codes + codebooks of the quantized layers, as packed on disk
    'effective_bits_per_weight': 8 * nbytes / weights,
    'index_bits_per_weight': float(sum(r['index_bits'] * np.prod(r['shape']) / r['d'] for r in q.rows) / weights),
    'compression_ratio': 4 * weights / nbytes,
    'weight_rel_mse': sum(r['rel_mse'] * r['sq_norm'] for r in q.rows) / sq,
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
  order: str = 'importance',
  lloyd_steps: int = 2,
  channel_scale: bool = True,
  codebook_dtype: str = 'float16',
  progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, surgery.QuantizedParams]]:
  """PQ K=256/d=8 compressed to the bytes of each baseline (name, method, K, d) vs that baseline, on any
  params tree (the layers matched by `pattern`). Rows `pq-k256-d8-compressed@<baseline>`. Every row
  stores its codebooks as `codebook_dtype` (codebook_values), baselines included.

  Returns (rows, models): rows with name, bytes, effective/index bits per weight, compression ratio,
  weight relative MSE and seconds; models the QuantizedParams of every row (to sample from them). merge, order:
  as allocation.compress_layers.
  """
  models, rows = {}, []

  def quantize(name: str, method: str, k: int, d: int) -> surgery.QuantizedParams:
    start = time.perf_counter()
    q = surgery.quantize_params(params, surgery.default_rules(method, k, d, pattern=pattern), key, method=method,
                                iters=iters, channel_scale=channel_scale, codebook_dtype=codebook_dtype,
                                progress=progress)  # fmt: skip
    models[name] = q
    rows.append(summary_row(name, q, time.perf_counter() - start))
    return q

  for name, method, k, d in baselines:
    quantize(name, method, k, d)
  big = quantize('pq-k256-d8', 'pq', 256, 8)
  for ref, *_ in baselines:
    start = time.perf_counter()
    target = next(r['bytes'] for r in rows if r['name'] == ref)
    name = f'pq-k256-d8-compressed@{ref}'
    models[name] = compress_tree(big, params, target, merge=merge, order=order, lloyd_steps=lloyd_steps,
                                  codebook_dtype=codebook_dtype, progress=progress)  # fmt: skip
    rows.append(summary_row(name, models[name], time.perf_counter() - start))
  return rows, models
