"""Error feedback across sub-vector positions (GPTQ's order, for codebooks; `quant.error_feedback`).

The output error of a layer y = x @ W quantized to W_hat is tr((W - W_hat)^T H (W - W_hat)), H = sum x x^T over
its inputs [in_features, in_features]. metric.py keeps only H's diagonal d x d blocks H_j, so every position is
fitted as if the others were exact; where a layer's inputs are correlated across positions (adaLN_modulation's
silu(t + y embedding), every modulated LayerNorm output with its per-sample shift) the cross terms are most of
the error: on the digits demo's adaLN layers 5-10x the block-diagonal estimate (README, issue 15).

Here positions are quantized in order and each one's error is pushed onto the positions not yet quantized, as
GPTQ does for scalar columns: with H^-1 = U^T U (U upper triangular, [in, in]) and block a the d rows of position
j, fixing w_a to codeword q_a and moving the later rows b optimally, w_b -= U_ab^T U_aa^-T (w_a - q_a), costs
(w_a - q_a)^T (U_aa^T U_aa)^-1 (w_a - q_a): the metric of position j, conditional on the later positions
following, is (U_aa^T U_aa)^-1, whitened by z = U_aa^-T w. Every output channel of the layer shares it, so a PQ
codebook is again plain k-means in a whitened space (GPTVQ, van Baalen et al. 2024): positions go in groups of
`group` (their codebooks fitted together on the group's targets as the earlier groups left them), one by one
within the group (assignment, then feedback), the later groups updated once per group (GPTQ's lazy batches).
A shared VQ codebook is not refitted: its codes are assigned one position at a time with the same feedback.

Damping: H + damping * mean(diag H) * I, as metric.damped per block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dpq_jax.quant import codebook_values
from dpq_jax.quant import kmeans as kmeans_lib

_HIGHEST = jax.lax.Precision.HIGHEST
FITS = ('kmeans', 'lloyd', 'fixed')  # a group's codebooks: fresh k-means, Lloyd steps from the given ones, as given


def blocks(hessian: np.ndarray, subvector_dim: int) -> np.ndarray:
  """hessian [in_features, in_features] -> its diagonal blocks [num_subvectors, d, d] (metric.py's moments)."""
  hessian = np.asarray(hessian)
  m = hessian.shape[0] // subvector_dim
  h = hessian.reshape(m, subvector_dim, m, subvector_dim)
  return np.ascontiguousarray(h[np.arange(m), :, np.arange(m), :])


@jax.jit
def inverse_factor(hessian: jax.Array, damping: float) -> jax.Array:
  """U [in_features, in_features] upper triangular with U^T U = (H + damping * mean(diag H) * I)^-1 (the
  identity's where H is 0)."""
  h = jnp.asarray(hessian, jnp.float32)
  n = h.shape[0]
  mean_diag = jnp.trace(h) / n
  eye = jnp.eye(n, dtype=jnp.float32)
  h = jnp.where(mean_diag > 0, h + damping * mean_diag * eye, eye)
  lower = jnp.linalg.cholesky(h)
  h_inv = jax.scipy.linalg.cho_solve((lower, True), eye)
  return jnp.swapaxes(jnp.linalg.cholesky((h_inv + h_inv.T) / 2), 0, 1)


def _conditional_whitening(u_rows: jax.Array, start: jax.Array, group: int, d: int) -> jax.Array:
  """T [group, d, d]: T_i = U_aa^-T of the group's positions (a = rows start + i*d ... + d), from the group's
  rows of U [group * d, in_features]."""
  diag = jax.lax.dynamic_slice_in_dim(u_rows, start, group * d, axis=1).reshape(group, d, group, d)
  u_aa = diag[jnp.arange(group), :, jnp.arange(group), :]  # [group, d, d] upper triangular
  eye = jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), u_aa.shape)
  inv = jax.scipy.linalg.solve_triangular(u_aa, eye, lower=False)  # U_aa^-1
  return jnp.swapaxes(inv, -1, -2)


def _lloyd(z: jax.Array, books: jax.Array, alive: jax.Array, weights: jax.Array, steps: int) -> jax.Array:
  """`steps` weighted Lloyd steps of books [P, K, d] over points z [P, n, d] (live codewords only; an empty one
  keeps its place)."""

  def step(_, books):
    codes = kmeans_lib.assign(z, books, alive=alive)  # [P, n]
    k = books.shape[1]
    seg = (codes + jnp.arange(z.shape[0])[:, None] * k).reshape(-1)
    w = weights.reshape(-1)
    sums = jax.ops.segment_sum(w[:, None] * z.reshape(-1, z.shape[-1]), seg, z.shape[0] * k).reshape(books.shape)
    mass = jax.ops.segment_sum(w, seg, z.shape[0] * k).reshape(books.shape[:2])
    mean = sums / jnp.maximum(mass, 1e-30)[..., None]
    return jnp.where((alive & (mass > 0))[..., None], mean, books)

  return jax.lax.fori_loop(0, steps, step, books)


@functools.partial(jax.jit, static_argnames=('group', 'd', 'fit', 'iters', 'codebook_dtype'), donate_argnums=(0,))
def _group_step(
  w: jax.Array, u_rows: jax.Array, start: jax.Array, books: jax.Array, alive: jax.Array, weights: jax.Array,
  key: jax.Array, *, group: int, d: int, fit: str, iters: int, codebook_dtype: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
  """One group of positions: fit its codebooks, assign them one position at a time with feedback, and update the
  later rows of the targets.

  Args:
    w: [in_features, out_features] the current targets (the kernel, updated by the earlier groups).
    u_rows: [group * d, in_features] U's rows of the group (inverse_factor).
    start: first row of the group (traced: one program serves every group of this size).
    books: [group, K, d] the codebooks (weight space) to start from ('lloyd') or use ('fixed'); 'kmeans' ignores
      their values.
    alive: [group, K] live codewords.
    weights: [out_features] point weight of each output channel (Lloyd and k-means are unweighted at 1).
    key: k-means seeding ('kmeans').

  Returns:
    (targets with the later rows updated, codebooks [group, K, d] as stored, codes [group, out_features], each
    position's target as it was assigned [group * d, out_features], its conditional whitening [group, d, d]).
  """
  out_features = w.shape[1]
  t = _conditional_whitening(u_rows, start, group, d)  # [G, d, d]
  w_group = jax.lax.dynamic_slice_in_dim(w, start, group * d, axis=0)  # [G*d, out]
  u_group = jax.lax.dynamic_slice_in_dim(u_rows, start, group * d, axis=1)  # [G*d, G*d]
  whiten = lambda x: jnp.einsum('ged,gnd->gne', t, x, precision=_HIGHEST)  # noqa: E731  [G, n, d] -> T x
  if fit != 'fixed':
    z = whiten(w_group.reshape(group, d, out_features).transpose(0, 2, 1))  # [G, out, d]
    if fit == 'kmeans':
      zb = kmeans_lib.kmeans(z, books.shape[1], key, iters=iters).codebooks
    else:
      zb = _lloyd(z, whiten(books), alive, jnp.broadcast_to(weights, z.shape[:2]), iters)
    books = jnp.swapaxes(jax.scipy.linalg.solve_triangular(jnp.swapaxes(t, -1, -2), jnp.swapaxes(zb, -1, -2),
                                                           lower=False, trans='T'), -1, -2)  # fmt: skip
    books = codebook_values.round_codebooks(books, codebook_dtype, alive)
  zbooks = whiten(books)  # [G, K, d]

  def position(i, carry):
    w_group, codes, errs, assigned = carry
    rows = jax.lax.dynamic_slice_in_dim(w_group, i * d, d, axis=0)  # [d, out]
    assigned = jax.lax.dynamic_update_slice_in_dim(assigned, rows, i * d, axis=0)
    z = jnp.einsum('ed,dn->ne', t[i], rows, precision=_HIGHEST)  # [out, d]
    code = kmeans_lib.assign(z[None], zbooks[i][None], alive=alive[i][None])[0]  # [out]
    e = z - zbooks[i][code]  # [out, d]: U_aa^-T (w_a - q_a)
    u_a = jax.lax.dynamic_slice_in_dim(u_group, i * d, d, axis=0)  # [d, G*d]
    # rows of this and earlier positions change too (U_a has zeros before a; its own rows are quantized already)
    w_group = w_group - jnp.einsum('dr,nd->rn', u_a, e, precision=_HIGHEST)
    errs = jax.lax.dynamic_update_slice_in_dim(errs, e.T, i * d, axis=0)
    return w_group, codes.at[i].set(code), errs, assigned

  codes = jnp.zeros((group, out_features), jnp.int32)
  errs = jnp.zeros((group * d, out_features), jnp.float32)
  _, codes, errs, assigned = jax.lax.fori_loop(0, group, position, (w_group, codes, errs, jnp.zeros_like(errs)))
  later = jnp.arange(w.shape[0]) >= start + group * d
  w = w - jnp.where(later[:, None], jnp.einsum('ri,rn->in', u_rows, errs, precision=_HIGHEST), 0.0)
  return w, books, codes, assigned, t


def quantize(
  kernel: jax.Array, hessian: jax.Array, codebooks: jax.Array, key: jax.Array, *, fit: str = 'kmeans',
  alive: jax.Array | None = None, weights: jax.Array | None = None, iters: int = 25, group: int = 8,
  damping: float = 0.01, codebook_dtype: str = 'float32',
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
  """Codebooks and codes of one layer by error feedback across its positions (module docstring).

  Args:
    kernel: [in_features, out_features].
    hessian: [in_features, in_features] its inputs' second moment H (any positive multiple: damping is relative).
    codebooks: [num_codebooks, K, d]: num_subvectors per-position codebooks (PQ) or 1 shared (VQ, always 'fixed');
      the start of 'lloyd', what 'fixed' assigns to; 'kmeans' reads only the shape.
    key: k-means seeding ('kmeans'; folded with each group's first position).
    fit: FITS: each group's codebooks by k-means++ and `iters` Lloyd steps, by `iters` Lloyd steps from `codebooks`
      (compression's survivors), or `codebooks` unchanged.
    alive: [num_codebooks, K] live codewords (None: all).
    weights: [out_features] point weight of each output channel in the fit (None: 1).
    group: positions fitted together.
    codebook_dtype: the stored codebook values (codebook_values.DTYPES); the codes are for the rounded codebooks.

  Returns:
    (codebooks [num_codebooks, K, d] float32 as stored, codes [num_subvectors, out_features] int32).
  """
  books, codes, _, _ = _run(kernel, hessian, codebooks, key, fit=fit, alive=alive, weights=weights, iters=iters,
                            group=group, damping=damping, codebook_dtype=codebook_dtype)  # fmt: skip
  return books, codes


def assignment_targets(
  kernel: jax.Array, hessian: jax.Array, codebooks: jax.Array, alive: jax.Array | None = None, *, group: int = 1,
  damping: float = 0.01,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
  """What a later nearest-codeword assignment needs to keep the codes error feedback chose for `codebooks` (as
  given, fit 'fixed'): (codes [num_subvectors, out_features], targets [in_features, out_features]: each position's
  fed-back rows as they were assigned, factors [num_subvectors, d, d]: its conditional whitening U_aa^-T). The
  nearest live codeword of targets_j under factors_j (metric.assign) is codes_j; calibration's dynamic assignment
  re-picks codes that way as the codebooks train (config.calibrate.assign_target='feedback'), the targets held as
  they were at its start."""
  _, codes, targets, factors = _run(kernel, hessian, codebooks, jax.random.key(0), fit='fixed', alive=alive,
                                    group=group, damping=damping)  # fmt: skip
  return codes, targets, factors


def _run(
  kernel: jax.Array, hessian: jax.Array, codebooks: jax.Array, key: jax.Array, *, fit: str = 'kmeans',
  alive: jax.Array | None = None, weights: jax.Array | None = None, iters: int = 25, group: int = 8,
  damping: float = 0.01, codebook_dtype: str = 'float32',
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:  # fmt: skip
  """`quantize`, plus each position's fed-back target as it was assigned [in_features, out_features] and its
  conditional whitening [num_subvectors, d, d] (`assignment_targets`).
  """
  if fit not in FITS:
    raise ValueError(f'fit={fit!r}: expected one of {FITS}')
  in_features, out_features = kernel.shape
  num_codebooks, codebook_size, d = codebooks.shape
  num_subvectors = in_features // d
  shared = num_codebooks == 1 and num_subvectors > 1
  if shared:
    fit = 'fixed'
  if group < 1:
    raise ValueError(f'group={group}: expected >= 1 positions')
  if np.shape(hessian) != (in_features, in_features):
    raise ValueError(f'hessian: expected [{in_features}, {in_features}], got {np.shape(hessian)}')
  u = inverse_factor(hessian, damping)
  w = jnp.array(kernel, jnp.float32)  # a copy: the steps donate it
  books_all = jnp.asarray(codebooks, jnp.float32)
  alive_all = jnp.ones((num_codebooks, codebook_size), bool) if alive is None else jnp.asarray(alive, bool)
  weights = jnp.ones((out_features,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  out_books, out_codes, out_targets, out_factors = [], [], [], []
  for first in range(0, num_subvectors, group):
    size = min(group, num_subvectors - first)
    rows = slice(first * d, (first + size) * d)
    pick = slice(0, 1) if shared else slice(first, first + size)
    books = jnp.broadcast_to(books_all[pick], (size, codebook_size, d))
    live = jnp.broadcast_to(alive_all[pick], (size, codebook_size))
    w, books, codes, targets, factors = _group_step(
      w, u[rows], jnp.int32(first * d), books, live, weights, jax.random.fold_in(key, first),
      group=size, d=d, fit=fit, iters=iters, codebook_dtype=codebook_values.dtype_name(codebook_dtype),
    )  # fmt: skip
    out_books.append(books)
    out_codes.append(codes)
    out_targets.append(targets)
    out_factors.append(factors)
  books = books_all if shared else jnp.concatenate(out_books)
  return books, jnp.concatenate(out_codes), jnp.concatenate(out_targets), jnp.concatenate(out_factors)


def rel_error(kernel: jax.Array, approx: jax.Array, hessian: jax.Array) -> float:
  """Relative output error of a layer with every cross term: tr(E^T H E) / tr(W^T H W), E = W - W_hat."""
  h = jnp.asarray(hessian, jnp.float32)
  kernel = jnp.asarray(kernel, jnp.float32)
  e = kernel - jnp.asarray(approx, jnp.float32)
  num = jnp.einsum('io,ij,jo->', e, h, e, precision=_HIGHEST)
  den = jnp.einsum('io,ij,jo->', kernel, h, kernel, precision=_HIGHEST)
  return float(jnp.where(den > 0, num / den, num))
