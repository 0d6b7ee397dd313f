"""The output metric of a quantized layer: what its outputs lose, per sub-vector position.

A layer y = x @ W (W [in_features, out_features]) cut into sub-vectors of subvector_dim d (pq.py) has
num_subvectors = in_features / d positions. Output channel r at position j sees only the inputs
x_j = x[..., j*d:(j+1)*d], so replacing its sub-vector w_rj by a codeword c changes the output by
(w_rj - c) . x_j, and the squared output error summed over tokens is

  sum_r sum_j (w_rj - c_rj)^T H_j (w_rj - c_rj)   (+ cross terms between positions, left out),

with H_j = sum_tokens x_j x_j^T the d x d second moment of position j's inputs ("moments"
[num_subvectors, d, d], quant/statistics.py collects them). Every point of a PQ codebook (the out_features
sub-vectors of one position) shares one H_j, so its k-means in this metric is plain k-means after the
whitening z = U_j w, U_j^T U_j = H_j (U_j the transposed Cholesky factor of the damped moment): centroids
are still the cluster means, mapped back by U_j^-1. VQ's one codebook serves positions of different H_j:
its assignment whitens the codebook per position, and its centroid of a cluster is the weighted mean
(sum H_j)^-1 sum H_j w over the cluster's members (`vq_centroids`).

Damping: H_j + damping * mean(diag H_j) * I (as GPTQ's percdamp), so a position whose inputs never
vary in some direction still has a metric (and a layer whose inputs are all zero gets the identity).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dpq_jax.quant import kmeans as kmeans_lib

_HIGHEST = jax.lax.Precision.HIGHEST


def damped(moments: jax.Array, damping: float) -> jax.Array:
  """moments [num_subvectors, d, d] -> H_j + damping * mean(diag H_j) * I (identity where H_j is 0)."""
  moments = jnp.asarray(moments, jnp.float32)
  d = moments.shape[-1]
  mean_diag = jnp.trace(moments, axis1=-2, axis2=-1) / d  # [num_subvectors]
  eye = jnp.eye(d, dtype=jnp.float32)
  return jnp.where(mean_diag[:, None, None] > 0, moments + damping * mean_diag[:, None, None] * eye, eye)


@jax.jit
def factor(moments: jax.Array, damping: float) -> jax.Array:
  """U [num_subvectors, d, d] upper triangular with U_j^T U_j = damped(moments)_j: the whitening
  z = U_j w turns (w - c)^T H_j (w - c) into ||z_w - z_c||^2."""
  h = damped(moments, damping)
  return jnp.swapaxes(jnp.linalg.cholesky(h), -1, -2)


def whiten(sub: jax.Array, u: jax.Array) -> jax.Array:
  """sub [num_subvectors, n, d] (points of each position), u [num_subvectors, d, d] -> U_j sub_j [..., n, d]."""
  return jnp.einsum('mnd,med->mne', sub, u, precision=_HIGHEST)


def unwhiten(z: jax.Array, u: jax.Array) -> jax.Array:
  """Inverse of `whiten`: solves U_j w = z for every point (a triangular solve)."""
  w = jax.scipy.linalg.solve_triangular(u, jnp.swapaxes(z, -1, -2), lower=False)  # [M, d, n]
  return jnp.swapaxes(w, -1, -2)


def per_position(codebooks: jax.Array, num_subvectors: int) -> jax.Array:
  """codebooks [num_codebooks, K, d] (1 for VQ) -> [num_subvectors, K, d], one per position."""
  return jnp.broadcast_to(codebooks, (num_subvectors,) + codebooks.shape[1:]) if codebooks.shape[0] == 1 else codebooks


@functools.partial(jax.jit, static_argnames=('chunk_size',))
def assign(
  sub: jax.Array, codebooks: jax.Array, u: jax.Array, alive: jax.Array | None = None, chunk_size: int | None = None
) -> jax.Array:
  """Nearest codeword in the metric: codes [num_subvectors, n] = argmin_k (sub - c_k)^T H_j (sub - c_k).

  Args:
    sub: [num_subvectors, n, d] points of every position.
    codebooks: [num_codebooks, K, d]: one per position (PQ), or one shared (VQ: num_codebooks 1).
    u: [num_subvectors, d, d] whitening factors (`factor`).
    alive: optional [num_codebooks, K] live-codeword mask.
  """
  num_subvectors = sub.shape[0]
  books = per_position(jnp.asarray(codebooks, jnp.float32), num_subvectors)
  if alive is not None:
    alive = per_position(jnp.asarray(alive, bool), num_subvectors)
  return kmeans_lib.assign(whiten(sub, u), whiten(books, u), chunk_size=chunk_size, alive=alive)


def error(sub: jax.Array, approx: jax.Array, moments: jax.Array) -> jax.Array:
  """sum over points and positions of (sub - approx)^T H_j (sub - approx) (undamped H): [num_subvectors]."""
  e = jnp.asarray(sub, jnp.float32) - jnp.asarray(approx, jnp.float32)  # [M, n, d]
  return jnp.einsum('mnd,mde,mne->m', e, jnp.asarray(moments, jnp.float32), e, precision=_HIGHEST)


def moment_of(u: jax.Array) -> jax.Array:
  """The damped moments U_j^T U_j [num_subvectors, d, d] of whitening factors u."""
  return jnp.einsum('mdi,mde->mie', u, u, precision=_HIGHEST)


@jax.jit
def vq_centroids(sub: jax.Array, codes: jax.Array, u: jax.Array, codebook: jax.Array) -> jax.Array:
  """The metric's optimal shared codebook for fixed codes: c_k = (sum_(j,r) in k H_j)^-1 sum H_j w_rj.

  Args:
    sub: [num_subvectors, n, d].
    codes: [num_subvectors, n] int codes into the one codebook.
    u: [num_subvectors, d, d] whitening factors (H_j = U_j^T U_j, damped).
    codebook: [1, K, d] the current codebook: kept where a cluster is empty.

  Returns:
    [1, K, d] float32.
  """
  num_subvectors, n, d = sub.shape
  codebook_size = codebook.shape[1]
  h = moment_of(u)
  segments = (codes.astype(jnp.int32) + jnp.arange(num_subvectors, dtype=jnp.int32)[:, None] * codebook_size).reshape(
    -1
  )
  with_ones = jnp.concatenate([sub, jnp.ones((num_subvectors, n, 1), jnp.float32)], axis=-1).reshape(-1, d + 1)
  sums = jax.ops.segment_sum(with_ones, segments, num_subvectors * codebook_size).reshape(
    num_subvectors, codebook_size, d + 1
  )
  counts = sums[..., -1]  # [M, K] members of cluster k at position j
  lhs = jnp.einsum('mk,mde->kde', counts, h, precision=_HIGHEST)  # [K, d, d]
  rhs = jnp.einsum('mde,mke->kd', h, sums[..., :-1], precision=_HIGHEST)  # [K, d]
  used = jnp.sum(counts, axis=0) > 0  # [K]
  safe = jnp.where(used[:, None, None], lhs, jnp.eye(d, dtype=jnp.float32))
  solved = jnp.linalg.solve(safe, rhs[..., None])[..., 0]  # [K, d]
  return jnp.where(used[:, None], solved, codebook[0])[None]


def vq_lloyd(sub: jax.Array, codebook: jax.Array, u: jax.Array, iters: int) -> tuple[jax.Array, jax.Array]:
  """`iters` Lloyd iterations of one shared codebook [1, K, d] in the metric U_j^T U_j of every position; the
  objective sum_(j,r) (w - c)^T H_j (w - c) never increases. Returns (codebook, codes [num_subvectors, n])."""
  codebook = jnp.asarray(codebook, jnp.float32)
  for _ in range(iters):
    codebook = vq_centroids(sub, assign(sub, codebook, u), u, codebook)
  return codebook, assign(sub, codebook, u)


def rel_error(kernel: jax.Array, approx: jax.Array, moments: jax.Array) -> float:
  """Relative output error of a layer under the block-diagonal moments [num_subvectors, d, d]:
  sum_j (w - w_hat)_j^T H_j (w - w_hat)_j / sum_j w_j^T H_j w_j over all output channels."""
  d = moments.shape[-1]
  kernel = jnp.asarray(kernel, jnp.float32)
  sub = lambda k: k.reshape(k.shape[0] // d, d, k.shape[1]).transpose(0, 2, 1)  # [M, out, d]
  num = jnp.sum(error(sub(kernel), sub(jnp.asarray(approx, jnp.float32)), moments))
  den = jnp.sum(error(sub(kernel), jnp.zeros_like(sub(kernel)), moments))
  return float(jnp.where(den > 0, num / den, num))
