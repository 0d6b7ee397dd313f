"""Sample-quality metrics with the ADM evaluator's definitions (guided-diffusion evaluations/evaluator.py).

Pure functions of feature arrays, no network here:
  - FID / sFID: Frechet distance between Gaussians fitted to Inception pool_3 features (2048-d), or to the
    spatial features (mixed_6/conv, first 7 channels, flattened: 17*17*7 = 2023-d). The trace of the matrix
    square root from two symmetric eigendecompositions (ADM's scipy sqrtm value to ~1e-11 on full-rank
    covariances, and faster); ADM's own sqrtm and fallbacks with sqrt='adm'.
  - Inception Score over softmax(logits) in splits of 5000 samples, mean over splits, as ADM.
  - Improved precision / recall (Kynkaanniemi et al.) with k=3 nearest-neighbour manifolds: ADM's
    ManifoldEstimator, squared Euclidean distances computed in row x column blocks, rounded through float16
    as ADM's DistanceBlock does (float32 again if a float16 distance overflows).
Statistics are float64 numpy; distance blocks run in JAX.
"""

from __future__ import annotations

import functools
import warnings
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score(split_size=5000)
NHOOD_SIZE = 3  # ADM's ManifoldEstimator(nhood_sizes=(3,))
FID_SQRT = ('eigh', 'adm')  # frechet_distance(sqrt=...): the default first


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of [N, D] features: mean and unbiased covariance (np.cov, rowvar=False), float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'features of shape {features.shape}: expected [N, D] with N >= 2')
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues rounded below 0 -> 0)."""
  w, v = np.linalg.eigh(a)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """Tr((sigma1 sigma2)^(1/2)) of two covariances, as Tr((S1^1/2 S2 S1^1/2)^1/2): the same eigenvalues, from two
  real symmetric eigendecompositions (scipy.linalg.sqrtm of the product runs a complex Schur decomposition and
  a triangular square root), real and finite also when the covariances are singular."""
  root = _sqrt_psd(sigma1)
  inner = root @ sigma2 @ root
  w = np.linalg.eigvalsh((inner + inner.T) / 2)
  return float(np.sum(np.sqrt(np.clip(w, 0, None))))


def _adm_trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  """ADM's Tr(sqrtm(sigma1 sigma2)): scipy's sqrtm, eps on the diagonals where the product is singular, an
  imaginary part allowed up to 1e-3."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():  # the product might be almost singular
    warnings.warn(f'FID: singular covariance product; adding {eps} to the diagonals')
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):  # numerical error can leave a small imaginary part
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'FID: imaginary component {np.max(np.abs(covmean.imag))} in the covariance square root')
    covmean = covmean.real
  return float(np.trace(covmean))


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6, sqrt: str = 'eigh'
) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

  sqrt: 'eigh' (trace_sqrt_product: ADM's value to ~1e-11 relative on full-rank covariances, tested, and
  faster: benchmarks/fid_sqrt.py) or 'adm' (scipy's sqrtm with ADM's fallbacks, `eps`, exactly as its evaluator).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f'mean vectors of different lengths: {mu1.shape} vs {mu2.shape}')
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f'covariances {sigma1.shape}, {sigma2.shape} do not match means of length {mu1.shape[0]}')
  if sqrt not in FID_SQRT:
    raise ValueError(f"sqrt={sqrt!r}: expected 'eigh' or 'adm'")
  diff = mu1 - mu2
  tr_covmean = trace_sqrt_product(sigma1, sigma2) if sqrt == 'eigh' else _adm_trace_sqrt_product(sigma1, sigma2, eps)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  """exp(E_x KL(p(y|x) || p(y))) per split of `split_size` consecutive samples, averaged over splits.

  Args:
    logits: [N, num_classes] classifier logits (softmax is taken here).
    split_size: samples per split; ADM uses 5000 (so 10 splits for 50k samples).
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[0] < 1:
    raise ValueError(f'logits of shape {logits.shape}: expected [N, num_classes]')
  log_p = logits - logits.max(axis=1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  scores = []
  for start in range(0, len(p), split_size):
    part, log_part = p[start : start + split_size], log_p[start : start + split_size]
    with np.errstate(divide='ignore'):
      log_marginal = np.log(part.mean(axis=0, keepdims=True))
    # 0 * log 0 = 0: ADM's formula, kept finite where a probability underflows to zero.
    kl = np.where(part > 0, part * (log_part - log_marginal), 0.0)
    scores.append(np.exp(kl.sum(axis=1).mean()))
  return float(np.mean(scores))


@functools.partial(jax.jit, static_argnames='half')
def _sq_distances(u: jax.Array, v: jax.Array, half: bool) -> jax.Array:
  """max(|u|^2 - 2 u.v + |v|^2, 0) for [R, D] x [C, D] -> [R, C]; half: inputs and result through float16."""
  f16 = lambda x: x.astype(jnp.float16).astype(jnp.float32) if half else x
  u, v = f16(u), f16(v)
  norm_u = jnp.sum(u * u, axis=1)[:, None]
  norm_v = jnp.sum(v * v, axis=1)[None, :]
  return f16(jnp.maximum(norm_u - 2 * jnp.dot(u, v.T, precision='highest') + norm_v, 0.0))


def pairwise_sq_distances(u: np.ndarray, v: np.ndarray, dtype: str = 'float16') -> jax.Array:
  """Squared Euclidean distances [R, C]; 'float16' rounds inputs and outputs through float16 like ADM's
  DistanceBlock and falls back to float32 when a float16 distance overflows; 'float32' computes directly."""
  if dtype not in ('float16', 'float32'):
    raise ValueError(f'distance dtype {dtype!r}: expected float16 or float32')
  u, v = jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)
  if dtype == 'float16':
    d = _sq_distances(u, v, half=True)
    if bool(jnp.isfinite(d).all()):
      return d
  return _sq_distances(u, v, half=False)


def _blocks(n: int, size: int) -> Iterator[slice]:
  for start in range(0, n, size):
    yield slice(start, min(start + size, n))


def manifold_radii(
  features: np.ndarray, k: int = NHOOD_SIZE, block_size: int = 4096, dtype: str = 'float16', bar=None
) -> np.ndarray:
  """[N] squared distance of each feature to its k-th nearest neighbour in the set (itself excluded).

  As ADM: the (k+1)-th smallest entry of each row of the distance matrix, the row's own zero counting as
  the first. Rows and columns are processed in blocks; each block keeps its k+1 smallest per row.
  """
  features = np.asarray(features, np.float32)
  n = len(features)
  if n <= k:
    raise ValueError(f'{n} feature vectors: the k={k} nearest-neighbour manifold needs more than {k}')
  radii = np.empty(n, np.float32)
  for rows in _blocks(n, block_size):
    smallest = []
    for cols in _blocks(n, block_size):
      d = pairwise_sq_distances(features[rows], features[cols], dtype)
      smallest.append(-jax.lax.top_k(-d, min(k + 1, d.shape[1]))[0])
      if bar is not None:
        bar.update()
    merged = -jax.lax.top_k(-jnp.concatenate(smallest, axis=1), k + 1)[0]  # [rows, k+1] ascending
    radii[rows] = np.asarray(merged[:, k])
  return radii


@jax.jit
def _in_manifolds(d: jax.Array, radii_rows: jax.Array, radii_cols: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For a [R, C] block: is row i inside some column's ball, is column j inside some row's ball."""
  rows_in = jnp.any(d <= radii_cols[None, :], axis=1)
  cols_in = jnp.any(d <= radii_rows[:, None], axis=0)
  return rows_in, cols_in


def precision_recall(
  ref_features: np.ndarray,
  sample_features: np.ndarray,
  k: int = NHOOD_SIZE,
  block_size: int = 4096,
  dtype: str = 'float16',
  progress: bool = False,
) -> tuple[float, float]:
  """ADM's (precision, recall) of samples against a reference set.

  Precision: fraction of samples within the k-NN ball of some reference feature. Recall: fraction of
  reference features within the k-NN ball of some sample.
  """
  ref = np.asarray(ref_features, np.float32)
  sample = np.asarray(sample_features, np.float32)
  if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
    raise ValueError(f'features {ref.shape} and {sample.shape}: expected [N, D] and [M, D]')
  from tqdm import tqdm

  nr, ns = -(-len(ref) // block_size), -(-len(sample) // block_size)
  bar = tqdm(total=nr * nr + ns * ns + nr * ns, desc='precision/recall', unit='block', disable=not progress)
  radii_ref = manifold_radii(ref, k, block_size, dtype, bar)
  radii_sample = manifold_radii(sample, k, block_size, dtype, bar)
  ref_in = np.zeros(len(ref), bool)  # reference point inside the sample manifold (recall)
  sample_in = np.zeros(len(sample), bool)  # sample inside the reference manifold (precision)
  for rows in _blocks(len(ref), block_size):
    for cols in _blocks(len(sample), block_size):
      d = pairwise_sq_distances(ref[rows], sample[cols], dtype)
      r_in, s_in = _in_manifolds(d, jnp.asarray(radii_ref[rows]), jnp.asarray(radii_sample[cols]))
      ref_in[rows] |= np.asarray(r_in)
      sample_in[cols] |= np.asarray(s_in)
      bar.update()
  bar.close()
  return float(sample_in.mean()), float(ref_in.mean())
