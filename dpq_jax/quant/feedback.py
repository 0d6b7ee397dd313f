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
within the group (assignment, then feedback). GPTQ's lazy batches: the groups of a block of BLOCK_ROWS rows run as
one program and move only the block's later rows; the rows after the block move once, by the block's errors.
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
# Rows per lazy batch (GPTQ's block of 128 columns): the groups of a block are one program, feedback within it
# moves only the block's rows, the rows after it move once per block.
BLOCK_ROWS = 128


def blocks(hessian: np.ndarray, subvector_dim: int) -> np.ndarray:
  """hessian [in_features, in_features] -> its diagonal blocks [num_subvectors, d, d] (metric.py's moments)."""
  hessian = np.asarray(hessian)
  m = hessian.shape[0] // subvector_dim
  h = hessian.reshape(m, subvector_dim, m, subvector_dim)
  return np.ascontiguousarray(h[np.arange(m), :, np.arange(m), :])


@jax.jit
def inverse_factor(hessian: jax.Array, damping: float) -> jax.Array:
  """U [in_features, in_features] upper triangular with U^T U = (H + damping * mean(diag H) * I)^-1 (the
  identity's where H is 0).

  One Cholesky factorisation and one triangular inverse, with no explicit H^-1 (GPTQ factors the inverse it forms):
  with P the reversal permutation and P H P = L L^T, H^-1 = (P L^-1 P)^T (P L^-1 P), and P L^-1 P is upper
  triangular with a positive diagonal, so it is the Cholesky factor U (unique). About a quarter of the flops of
  factor, invert, factor again, and it never rounds H^-1.
  """
  h = jnp.asarray(hessian, jnp.float32)
  n = h.shape[0]
  mean_diag = jnp.trace(h) / n
  eye = jnp.eye(n, dtype=jnp.float32)
  h = jnp.where(mean_diag > 0, h + damping * mean_diag * eye, eye)
  lower = jnp.linalg.cholesky(h[::-1, ::-1])
  return jax.scipy.linalg.solve_triangular(lower, eye, lower=True)[::-1, ::-1]


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


def _group(
  w: jax.Array, u_rows: jax.Array, start: jax.Array, books: jax.Array, alive: jax.Array, weights: jax.Array,
  key: jax.Array, *, group: int, d: int, fit: str, iters: int, codebook_dtype: str,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:  # fmt: skip
  """One group of positions: fit its codebooks, assign them one position at a time with feedback, and update the
  later rows of the targets.

  Args:
    w: [rows, out_features] the current targets of the rows U's columns cover (the block's: `_block_step`).
    u_rows: [group * d, rows] U's rows of the group (inverse_factor), on those columns.
    start: first row of the group within `w` (traced: one program serves every group of this size).
    books: [group, K, d] the codebooks (weight space) to start from ('lloyd') or use ('fixed'); 'kmeans' ignores
      their values.
    alive: [group, K] live codewords.
    weights: [out_features] point weight of each output channel (Lloyd and k-means are unweighted at 1).
    key: k-means seeding ('kmeans').

  Returns:
    (targets with the later rows updated, codebooks [group, K, d] as stored, codes [group, out_features], the
    group's whitened errors U_aa^-T (w_a - q_a) [group * d, out_features] (what moves rows after `w`'s), each
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
  return w, books, codes, errs, assigned, t


@functools.partial(
  jax.jit, static_argnames=('groups', 'group', 'd', 'fit', 'iters', 'codebook_dtype'), donate_argnums=(0,)
)
def _block_step(
  w: jax.Array, u_rows: jax.Array, start: jax.Array, books: jax.Array, alive: jax.Array, weights: jax.Array,
  key: jax.Array, *, groups: int, group: int, d: int, fit: str, iters: int, codebook_dtype: str,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:  # fmt: skip
  """`groups` consecutive groups of `group` positions (a block of B = groups * group * d rows from row `start`),
  GPTQ's lazy batch: within the block each group's feedback moves the block's later rows only, the rows after the
  block move once, by the block's errors together (the same update, summed once instead of per group).

  Args:
    w: [in_features, out_features] the current targets (donated).
    u_rows: [B, in_features] U's rows of the block.
    start: the block's first row (traced).
    books, alive: [groups * group, K, d], [groups * group, K] as `_group` takes them, per position.
    weights: [out_features].
    key: k-means seeding; group g uses fold_in(key, its first position).

  Returns:
    (targets with the block's and the later rows updated, codebooks [groups * group, K, d], codes
    [groups * group, out_features], assigned targets [B, out_features], conditional whitening [groups * group, d, d]).
  """
  size = group * d
  rows = groups * size
  first = start // d  # the block's first position
  w_block = jax.lax.dynamic_slice_in_dim(w, start, rows, axis=0)  # [B, out]
  u_block = jax.lax.dynamic_slice_in_dim(u_rows, start, rows, axis=1)  # [B, B]

  def body(g, carry):
    w_block, books_out, codes_out, errs, assigned, factors = carry
    pos = g * group
    w_block, gbooks, gcodes, gerrs, gassigned, t = _group(
      w_block, jax.lax.dynamic_slice_in_dim(u_block, g * size, size, axis=0), g * size,
      jax.lax.dynamic_slice_in_dim(books, pos, group, axis=0), jax.lax.dynamic_slice_in_dim(alive, pos, group, axis=0),
      weights, jax.random.fold_in(key, first + pos), group=group, d=d, fit=fit, iters=iters,
      codebook_dtype=codebook_dtype,
    )  # fmt: skip
    put = jax.lax.dynamic_update_slice_in_dim
    return (w_block, put(books_out, gbooks, pos, 0), put(codes_out, gcodes, pos, 0), put(errs, gerrs, g * size, 0),
            put(assigned, gassigned, g * size, 0), put(factors, t, pos, 0))  # fmt: skip

  out_features = w.shape[1]
  carry = (
    w_block, jnp.zeros(books.shape, jnp.float32), jnp.zeros((groups * group, out_features), jnp.int32),
    jnp.zeros((rows, out_features), jnp.float32), jnp.zeros((rows, out_features), jnp.float32),
    jnp.zeros((groups * group, d, d), jnp.float32),
  )  # fmt: skip
  w_block, books, codes, errs, assigned, factors = jax.lax.fori_loop(0, groups, body, carry)
  w = jax.lax.dynamic_update_slice_in_dim(w, w_block, start, axis=0)
  later = jnp.arange(w.shape[0]) >= start + rows
  w = w - jnp.where(later[:, None], jnp.einsum('ri,rn->in', u_rows, errs, precision=_HIGHEST), 0.0)
  return w, books, codes, assigned, factors


def quantize(
  kernel: jax.Array, hessian: jax.Array, codebooks: jax.Array, key: jax.Array, *, fit: str = 'kmeans',
  alive: jax.Array | None = None, weights: jax.Array | None = None, iters: int = 25, group: int = 8,
  damping: float = 0.01, codebook_dtype: str = 'float32', block: int = BLOCK_ROWS,
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
    block: rows per lazy batch (whole groups, at least one); the codes do not depend on it beyond float rounding.
    codebook_dtype: the stored codebook values (codebook_values.DTYPES); the codes are for the rounded codebooks.

  Returns:
    (codebooks [num_codebooks, K, d] float32 as stored, codes [num_subvectors, out_features] int32).
  """
  books, codes, _, _ = _run(kernel, hessian, codebooks, key, fit=fit, alive=alive, weights=weights, iters=iters,
                            group=group, damping=damping, codebook_dtype=codebook_dtype, block=block)  # fmt: skip
  return books, codes


def assignment_targets(
  kernel: jax.Array, hessian: jax.Array, codebooks: jax.Array, alive: jax.Array | None = None, *, group: int = 1,
  damping: float = 0.01, block: int = BLOCK_ROWS,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
  """What a later nearest-codeword assignment needs to keep the codes error feedback chose for `codebooks` (as
  given, fit 'fixed'): (codes [num_subvectors, out_features], targets [in_features, out_features]: each position's
  fed-back rows as they were assigned, factors [num_subvectors, d, d]: its conditional whitening U_aa^-T). The
  nearest live codeword of targets_j under factors_j (metric.assign) is codes_j; calibration's dynamic assignment
  re-picks codes that way as the codebooks train (config.calibrate.assign_target='feedback'), the targets held as
  they were at its start."""
  _, codes, targets, factors = _run(kernel, hessian, codebooks, jax.random.key(0), fit='fixed', alive=alive,
                                    group=group, damping=damping, block=block)  # fmt: skip
  return codes, targets, factors


def _run(
  kernel: jax.Array, hessian: jax.Array, codebooks: jax.Array, key: jax.Array, *, fit: str = 'kmeans',
  alive: jax.Array | None = None, weights: jax.Array | None = None, iters: int = 25, group: int = 8,
  damping: float = 0.01, codebook_dtype: str = 'float32', block: int = BLOCK_ROWS,
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
  if block < 1:
    raise ValueError(f'block={block}: expected >= 1 rows')
  if np.shape(hessian) != (in_features, in_features):
    raise ValueError(f'hessian: expected [{in_features}, {in_features}], got {np.shape(hessian)}')
  u = inverse_factor(hessian, damping)
  w = jnp.array(kernel, jnp.float32)  # a copy: the steps donate it
  books_all = jnp.asarray(codebooks, jnp.float32)
  alive_all = jnp.ones((num_codebooks, codebook_size), bool) if alive is None else jnp.asarray(alive, bool)
  weights = jnp.ones((out_features,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  dtype = codebook_values.dtype_name(codebook_dtype)
  out_books, out_codes, out_targets, out_factors = [], [], [], []
  per_block = max(1, block // (group * d))  # groups per lazy batch
  first = 0
  while first < num_subvectors:
    size = min(group, num_subvectors - first)  # the last group may be short: a block of its own
    groups = min(per_block, (num_subvectors - first) // size)
    count = groups * size
    pick = slice(0, 1) if shared else slice(first, first + count)
    w, books, codes, targets, factors = _block_step(
      w, u[first * d : (first + count) * d], jnp.int32(first * d),
      jnp.broadcast_to(books_all[pick], (count, codebook_size, d)),
      jnp.broadcast_to(alive_all[pick], (count, codebook_size)), weights, key,
      groups=groups, group=size, d=d, fit=fit, iters=iters, codebook_dtype=dtype,
    )  # fmt: skip
    out_books.append(books)
    out_codes.append(codes)
    out_targets.append(targets)
    out_factors.append(factors)
    first += count
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
