"""Codebook compression of a whole model to a byte budget: per-layer problems, the global allocation
of live codewords across layers (compress.allocate), and the per-layer realisation.

Budget scope (what "24x vs fp32" measures): the quantized layers' codes, codebooks (live rows and K'
of each codebook) and their full-precision biases, against the fp32 bytes of those kernels and biases.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpq_jax import tree_utils
from dpq_jax.quant import codebook_values, compress, feedback, metric, packing, pq, qweight


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
  moments: np.ndarray | None = None  # [num_subvectors, d, d] input moments: compress in the output metric (PQ)
  grad2: np.ndarray | None = None  # [out_features] output-gradient energies: point weights (distortion 'loss')
  hessian: np.ndarray | None = None  # [in_features, in_features] full input moment: survivors refitted with feedback


def layers_of(
  q, reference: dict | None, energy: dict | None = None, biases: bool = False, moments: dict | None = None,
  grad2: dict | None = None, hessians: dict | None = None,
) -> list[Layer]:  # fmt: skip
  """One Layer per PQ/VQ layer of q (a QuantizedParams): the weights its codes approximate are the fp kernel of
  `reference` (params), else the decoded codes; energy {name: [in_features]} where sensitivity is used; the fp32
  bytes of the layer's bias when `biases` (inside the budget scope); moments {name: [M, d, d]} where the
  objective is the layer output (used by PQ layers: VQ's shared codebook has no single metric); grad2
  {name: [out_features]} where the distortion is the loss estimate; hessians {name: [in_features, in_features]}
  where the codes are chosen with error feedback (quant.error_feedback)."""
  out = []
  for name, w in q.pq.items():
    keys = name.split('/')
    codebooks, codes = np.asarray(w.codebooks, np.float32), np.asarray(w.codes)
    kernel = None if reference is None else tree_utils.get_path(reference, keys + [qweight.KERNEL])
    kernel = pq.decode(codebooks, codes) if kernel is None else kernel
    bias = tree_utils.get_path(q.fp, keys + ['bias']) if biases else None
    layer_moments = (moments or {}).get(name) if codebooks.shape[0] > 1 else None
    out.append(Layer(name, codebooks, codes, np.asarray(kernel, np.float32), 0 if bias is None else 4 * int(np.size(bias)),
                     (energy or {}).get(name), None if w.scale is None else np.asarray(w.scale, np.float32),
                     layer_moments, (grad2 or {}).get(name), (hessians or {}).get(name)))  # fmt: skip
  return out


def _points(layer: Layer, scale: Any, u: jax.Array | None) -> jax.Array:
  """The sub-vectors [M, out, d] the layer's codewords approximate: of W / s (pq.scaled_target) with a
  per-output-channel scale s, whitened by u where given (the layer-output metric)."""
  x = pq.to_subvectors(pq.scaled_target(jnp.asarray(layer.reference, jnp.float32), scale), layer.codebooks.shape[2])
  return x if u is None else metric.whiten(x, u)


def _problems(
  layer: Layer, distortion: str = 'absolute', damping: float = 0.01, scaled: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
  """(x [num_codebooks, num_points, d], codes [num_codebooks, num_points], weights or None, codebooks
  [num_codebooks, K, d], whitening factors [M, d, d] or None): the compression problem of a layer.

  scaled (compress_layers' scaled_codes), with a per-output-channel scale s: the points are the sub-vectors of
  W / s, what the codewords approximate, each weighted by s_r^2 so that a squared distance is the error of the
  layer's own output channel; otherwise the points are W's, as quantize assigned them before its scale.
  With input moments (PQ, objective 'output') points and codebooks are whitened (metric.py): every squared
  distance, Ward merge cost and centroid of compress.py is then the layer-output error, and the codebooks
  are mapped back after realisation.
  distortion 'loss': each sub-vector of output channel r weighs G_r, the squared gradient of the noise-prediction
  error with respect to that channel (statistics.input_moments), so a step's cost estimates the loss increase
  G_r (w - c)^T H_j (w - c) and layers compare by what they cost the loss, not by their own size.
  distortion 'relative': the point weights divided by the layer's own scale, sum_i e_i ||W_i||^2 over input
  channels i (e_i the activation energy, or 1; with moments, the output energy sum_j w_j^T H_j w_j), so every
  layer's squared error counts relative to its size (the allocation across layers no longer favours layers
  with large weights or inputs); within a layer the order and the centroids are unchanged."""
  num_codebooks, _, d = layer.codebooks.shape
  u = None if layer.moments is None else metric.factor(layer.moments, damping)  # [M, d, d]
  x = _points(layer, layer.scale if scaled else None, u)
  codebooks = jnp.asarray(layer.codebooks, jnp.float32)
  if u is not None:
    codebooks = metric.whiten(codebooks, u)
  codes = jnp.asarray(layer.codes, jnp.int32)  # [M, out]
  weights = None
  if layer.energy is not None:
    per_position = np.asarray(layer.energy, np.float32).reshape(-1, d).mean(axis=1)  # [M]
    weights = jnp.broadcast_to(jnp.asarray(per_position)[:, None], codes.shape)
  if distortion == 'loss':
    if layer.grad2 is None:
      raise ValueError(f"{layer.name}: distortion 'loss' needs the layer's output-gradient energies (grad2)")
    weights = jnp.broadcast_to(jnp.asarray(layer.grad2, jnp.float32)[None, :], codes.shape)  # [M, out]
  if distortion == 'relative':
    ref = np.asarray(layer.reference, np.float32)  # [in, out]
    energy = np.ones(ref.shape[0], np.float32) if layer.energy is None else np.asarray(layer.energy, np.float32)
    norm = (
      float(jnp.sum(jnp.square(x if not scaled or layer.scale is None else _points(layer, None, u))))
      if u is not None
      else float(np.sum(energy[:, None] * np.square(ref)))
    )
    weights = (jnp.ones(codes.shape, jnp.float32) if weights is None else weights) / max(norm, 1e-30)
  if scaled and layer.scale is not None:  # ||w_r - s_r c||^2 = s_r^2 ||w_r / s_r - c||^2: the layer's own units
    s2 = jnp.broadcast_to(jnp.square(jnp.asarray(layer.scale, jnp.float32))[None, :], codes.shape)
    weights = s2 if weights is None else weights * s2
  if num_codebooks == 1:  # VQ: one problem over all of the layer's sub-vectors
    x, codes = x.reshape(1, -1, d), codes.reshape(1, -1)
    weights = None if weights is None else weights.reshape(1, -1)
  return x, codes, weights, codebooks, u


def compress_layers(
  layers: list[Layer],
  target_bytes: int,
  *,
  merge: bool = True,
  order: str = 'importance',
  lloyd_steps: int = 2,
  min_live: int = 1,
  codebook_dtype: str = 'float16',
  progress: bool = True,
  distortion: str = 'absolute',
  damping: float = 0.01,
  scale_rule: str = 'norm',
  scaled_codes: bool = False,
  feedback_group: int = 1,
  feedback_iters: int = 2,
) -> tuple[list[qweight.PQWeight], dict[str, Any]]:
  """Compresses `layers` so that their codes + codebooks + biases fit `target_bytes` on disk.

  Returns the compressed layers (codebooks rounded to what codebook_dtype stores, codebook_values.round_codebooks
  over the survivors; codes re-assigned to the rounded survivors, in the stored code dtype; the alive mask; the
  per-output-channel scale recomputed by `scale_rule` where the layer had one, and with scaled_codes the codes then
  re-assigned to the nearest survivors of W / scale, every step in W / s with s^2-weighted points) and an info dict with the predicted
  bytes, the allocation and per-layer rows. merge and order: how each codebook's removal path is made
  (compress.removal_path). A layer with a `hessian` then has its survivors refitted with error feedback across
  positions (feedback.quantize: `feedback_iters` Lloyd steps from the survivors on each group of `feedback_group`
  positions' fed-back targets, weighted like the compression's points; VQ: codes only), keeping the allocation.

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
    x, codes, weights, codebooks, _ = _problems(layer, distortion, damping, scaled_codes)
    num_codebooks, codebook_size, d = layer.codebooks.shape
    w, m = compress.atoms(x, codebooks, codes, weights)
    w_all.append(np.asarray(w))
    m_all.append(np.asarray(m))
    live = np.arange(codebook_size, 0, -1)  # K' after 0, 1, ..., K - 1 removals
    size_bytes = compress.size_dtype(codebook_size).itemsize
    per = compress.codebook_bytes(live, x.shape[1], d, value_bytes, size_bytes, overhead)
    nbytes.append(np.broadcast_to(per, (num_codebooks, codebook_size)))
    _tick(bar)
  path_all = compress.paths_of_atoms(np.concatenate(w_all), np.concatenate(m_all), merge=merge, order=order)
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
  out, rows, offset = [], [], 0
  for layer in layers:
    x, codes, weights, codebooks, u = _problems(layer, distortion, damping, scaled_codes)
    num_codebooks = layer.codebooks.shape[0]
    part = slice(offset, offset + num_codebooks)
    path = compress.Path(*(jnp.asarray(a[part]) for a in path_all))
    num_live = jnp.asarray(alloc.num_live[part], jnp.int32)
    offset += num_codebooks
    result = compress.realize(x, codebooks, codes, path, num_live, weights, merge=merge, lloyd_steps=lloyd_steps)
    survivors = result.codebooks if u is None else metric.unwhiten(result.codebooks, u)
    rounded = codebook_values.round_codebooks(survivors, codebook_dtype, result.alive)
    stored = rounded if u is None else metric.whiten(rounded, u)  # in the problem's space
    new_codes = compress.assign_survivors(x, stored, result.alive)  # nearest survivor of the stored codebooks
    new_codes = new_codes.reshape(layer.codes.shape)
    if layer.hessian is not None:
      rounded, new_codes = feedback.quantize(
        layer.reference, layer.hessian, rounded, jax.random.key(0), fit='fixed' if num_codebooks == 1 else 'lloyd',
        alive=result.alive, weights=layer.grad2 if distortion == 'loss' else None, iters=feedback_iters,
        group=feedback_group, damping=damping, codebook_dtype=codebook_dtype,
      )  # fmt: skip
    scale = None
    if layer.scale is not None:  # the norms (or least-squares fit) of the re-assigned reconstruction
      scale = pq.scale_of(layer.reference, pq.decode(rounded, new_codes), scale_rule, layer.moments, side_dtype,
                          hessian=layer.hessian)  # fmt: skip
      if scaled_codes:  # then the nearest survivors of W / s for that scale
        points = _points(layer, scale, u).reshape(x.shape)
        new_codes = compress.assign_survivors(points, stored, result.alive).reshape(layer.codes.shape)
    out.append(qweight.PQWeight(np.asarray(rounded), np.asarray(new_codes).astype(packing.code_dtype(rounded.shape[1])),
                                np.asarray(result.alive), None if scale is None else np.asarray(scale)))  # fmt: skip
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
    **({} if layer.moments is None else {'rel_out_err': metric.rel_error(reference, decoded, layer.moments)}),
    **({} if layer.hessian is None else {'rel_out_err_full': feedback.rel_error(reference, decoded, layer.hessian)}),
  }


def _bar(progress: bool, total: int, desc: str):
  if not progress:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, unit='step')


def _tick(bar) -> None:
  if bar is not None:
    bar.update(1)


def target_bytes(cfg: ml_collections.ConfigDict, fp32_bytes: int, quantized_weights: int) -> int:
  """Bytes of the budget scope: budget_bytes, else budget_bits per quantized weight, else fp32 / budget."""
  if cfg.budget_bytes:
    return int(cfg.budget_bytes)
  if cfg.budget_bits:
    return int(cfg.budget_bits * quantized_weights // 8)
  return int(fp32_bytes // cfg.budget)
