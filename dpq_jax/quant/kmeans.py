"""k-means for product quantization: many independent problems at once, pure and jittable.

Vocabulary: `num_problems` independent k-means problems (PQ: one per sub-vector position of a
layer; VQ: one for the whole layer), each over `num_points` vectors of `subvector_dim` values,
with `codebook_size` codewords. Inputs are x [num_problems, num_points, subvector_dim].

The assignment kernel is the fused form of the matmul distance ||x||^2 - 2 x.c + ||c||^2: a
loop over codewords keeps a running (best distance, code) per point, so the
[num_problems, num_points, codebook_size] distance tensor is never materialised (its peak is one
[num_problems, chunk_size] slice: each block of CODEWORD_BLOCK codewords is reduced as it is computed) and x is
read once per block. With the tiny
contraction (subvector_dim 4-8) a BLAS matmul is memory-bound: it writes and re-reads
codebook_size floats per point, which measured 10-20x slower on CPU. ||x||^2 is constant per point
and left out of the argmin; squared errors are recomputed exactly from the chosen codewords, and
data are centred per problem first so the expansion loses no float32 precision to an offset.
The centroid update of all problems is one `segment_sum` over codes offset by
problem * codebook_size. Empty clusters are re-seeded to the worst-explained points (as AQLM's
kmeans does), so no codeword stays dead while points are unexplained.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpq_jax.quant import seeding
from dpq_jax.quant.seeding import kmeans_plusplus_init  # public here too, where it always was

# `kmeans` seeds from at most this many points per codeword: a random subset drawn from the key (as
# scikit-learn's MiniBatchKMeans `init_size`; the cap is faiss's default training sample). Seeding is
# codebook_size sequential passes over the points: on a 1.3M-point VQ problem it took 1.7 s on all
# points vs 0.05 s on 64K, with the final error equal within run-to-run variation.
SEED_POINTS_PER_CODEWORD = 256

# On CPU, bytes of points [num_problems, subvector_dim, chunk_size] float32 in one chunk of the assignment by
# default. Every block of CODEWORD_BLOCK codewords reads the chunk again, so a chunk that stays in cache (a few MiB)
# is what the loop can run from: on the DiT-S/2 and DiT-XL/2 stacks (2 cores, 32 MiB L3) 4 MiB chunks made the Lloyd
# iterations 15-25% faster than whole problems (7-85 MiB). At least MIN_CHUNK points (the minor axis that the
# kernels vectorise).
CHUNK_BYTES = 4 * 2**20
MIN_CHUNK = 64

# Elsewhere (GPU, TPU: one wide kernel beats a sequence of small ones), bytes of the running-distance buffer
# [num_problems, chunk_size] float32 that the default chunk keeps within; every DiT-XL/2 layer fits in one chunk.
DISTANCE_BUDGET_BYTES = 64 * 2**20


class KMeansResult(NamedTuple):
  """Output of `kmeans`."""

  codebooks: jax.Array  # [num_problems, codebook_size, subvector_dim] float32
  codes: jax.Array  # [num_problems, num_points] int32
  objective: jax.Array  # [iters + 1] float32: total squared error (all problems) before each update and at the end
  steps: jax.Array  # int32: the Lloyd steps run; fewer than iters when every codebook reached a fixed point


def _chunk(num_problems: int, num_points: int, subvector_dim: int, chunk_size: int | None) -> int:
  """Points per chunk: `chunk_size`, or equal chunks of at most CHUNK_BYTES of points (MIN_CHUNK points or more)
  on CPU, DISTANCE_BUDGET_BYTES of running distances elsewhere."""
  if chunk_size is not None:
    if chunk_size < 1:
      raise ValueError(f'chunk_size={chunk_size}: expected >= 1 or None')
    return min(chunk_size, num_points)
  if jax.default_backend() == 'cpu':
    most = max(MIN_CHUNK, CHUNK_BYTES // (4 * num_problems * subvector_dim))
  else:
    most = max(1, DISTANCE_BUDGET_BYTES // (4 * num_problems))
  return -(-num_points // -(-num_points // most))  # as many chunks as needed, of equal size (the last one padded)


# Codewords compared per trip of the assignment loop: one [num_problems, CODEWORD_BLOCK, points] distance block,
# reduced to its (minimum, first argmin) by one variadic reduce. Measured on CPU (jax 0.10, subvector_dim 4-8,
# 16-256 codewords): 8 per block runs as fast as the former 32-codeword unrolled loop and compiles 3-4x faster
# (0.8 vs 3.3 s for one kernel; the k-means program holds two, the encoding a third); 4 runs 1.5-2x slower
# and 16 spills (~9x slower).
CODEWORD_BLOCK = 8


def _first_min(dist: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """(minimum, first index of the minimum) along `axis`, by one variadic reduce (argmin's tie rule)."""
  index = jax.lax.broadcasted_iota(jnp.int32, dist.shape, axis)

  def pick(a, b):
    take_a = (a[0] < b[0]) | ((a[0] == b[0]) & (a[1] < b[1]))
    return jnp.where(take_a, a[0], b[0]), jnp.where(take_a, a[1], b[1])

  return jax.lax.reduce((dist, index), (jnp.float32(jnp.inf), jnp.int32(0)), pick, (axis,))


def _nearest(xt: jax.Array, codebooks: jax.Array, alive: jax.Array | None = None) -> jax.Array:
  """First nearest codeword of every point.

  Args:
    xt: [num_problems, subvector_dim, num_points] float32 (points minor, so the loop vectorises).
    codebooks: [num_problems, codebook_size, subvector_dim] float32.
    alive: optional [num_problems, codebook_size] bool; dead codewords are at distance +inf.

  Returns:
    codes [num_problems, num_points] int32.
  """
  num_problems, subvector_dim, num_points = xt.shape
  codebook_size = codebooks.shape[1]
  num_blocks = -(-codebook_size // CODEWORD_BLOCK)
  pad = num_blocks * CODEWORD_BLOCK - codebook_size  # padding codewords sit at +inf, never chosen
  c_sq = jnp.sum(codebooks * codebooks, axis=-1)  # [num_problems, codebook_size]
  if alive is not None:
    c_sq = jnp.where(alive, c_sq, jnp.inf)
  c_sq = jnp.pad(c_sq, ((0, 0), (0, pad)), constant_values=jnp.inf)
  c_sq = c_sq.reshape(num_problems, num_blocks, CODEWORD_BLOCK)
  minus_2c = jnp.pad(-2.0 * codebooks, ((0, 0), (0, pad), (0, 0)))
  minus_2c = minus_2c.reshape(num_problems, num_blocks, CODEWORD_BLOCK, subvector_dim)

  def body(b, carry):
    best, codes = carry  # [num_problems, num_points] float32, int32
    dist = c_sq[:, b, :, None]  # ||c||^2 - 2 x.c, i.e. the squared distance minus ||x||^2: [P, block, points]
    for j in range(subvector_dim):
      dist = dist + minus_2c[:, b, :, j, None] * xt[:, None, j, :]
    block_best, block_code = _first_min(dist, 1)  # [num_problems, num_points]
    closer = block_best < best  # strict: ties keep the lowest index, as argmin
    return jnp.where(closer, block_best, best), jnp.where(closer, block_code + b * CODEWORD_BLOCK, codes)

  carry = (jnp.full((num_problems, num_points), jnp.inf, jnp.float32), jnp.zeros((num_problems, num_points), jnp.int32))
  return jax.lax.fori_loop(0, num_blocks, body, carry)[1]


def _point_chunks(xt: jax.Array, chunk: int) -> jax.Array:
  """[num_problems, subvector_dim, num_points] -> [num_chunks, num_problems, subvector_dim, chunk], zero-padded."""
  num_problems, subvector_dim, num_points = xt.shape
  num_chunks = -(-num_points // chunk)
  xt = jnp.pad(xt, ((0, 0), (0, 0), (0, num_chunks * chunk - num_points)))
  return xt.reshape(num_problems, subvector_dim, num_chunks, chunk).transpose(2, 0, 1, 3)


def _nearest_in_chunks(chunks: jax.Array, codebooks: jax.Array, num_points: int, alive: jax.Array | None = None):
  """`_nearest` of the points laid out by `_point_chunks`, one chunk at a time under `lax.map`: [num_problems,
  num_points] int32, the same codes for any chunk size."""
  if chunks.shape[0] == 1:
    return _nearest(chunks[0], codebooks, alive)[:, :num_points]
  codes = jax.lax.map(lambda block: _nearest(block, codebooks, alive), chunks)  # [num_chunks, num_problems, chunk]
  return codes.transpose(1, 0, 2).reshape(codes.shape[1], -1)[:, :num_points]


def _nearest_chunked(xt: jax.Array, codebooks: jax.Array, chunk: int, alive: jax.Array | None = None) -> jax.Array:
  """`_nearest` over chunks of `chunk` points; identical codes for any chunk."""
  return _nearest_in_chunks(_point_chunks(xt, chunk), codebooks, xt.shape[2], alive)


def _sq_error(xt: jax.Array, codebooks: jax.Array, codes: jax.Array) -> jax.Array:
  """Exact squared error ||x - c[code]||^2 of every point.

  Args:
    xt: [num_problems, subvector_dim, num_points].
    codebooks: [num_problems, codebook_size, subvector_dim].
    codes: [num_problems, num_points] int32.

  Returns:
    [num_problems, num_points] float32.
  """
  chosen = jnp.take_along_axis(codebooks, codes[..., None], axis=1)  # [num_problems, num_points, subvector_dim]
  err = jnp.zeros(codes.shape, jnp.float32)
  for j in range(xt.shape[1]):  # one gather for all j (a gather per j was a kernel each to compile)
    err = err + jnp.square(xt[:, j, :] - chosen[:, :, j])
  return err


def _assign(x: jax.Array, codebooks: jax.Array, chunk: int, alive: jax.Array | None = None) -> jax.Array:
  """`assign` without the jit or casts; chunk is the resolved points per chunk."""
  if alive is None:
    shift = jnp.mean(codebooks, axis=1, keepdims=True)  # [num_problems, 1, subvector_dim]: keeps the expansion precise
  else:  # the mean of the live codewords only (dead rows may hold anything)
    live = alive[..., None].astype(codebooks.dtype)
    shift = jnp.sum(codebooks * live, axis=1, keepdims=True) / jnp.maximum(jnp.sum(live, axis=1, keepdims=True), 1.0)
  xt = (x - shift).transpose(0, 2, 1)  # [num_problems, subvector_dim, num_points]
  return _nearest_chunked(xt, codebooks - shift, chunk, alive)


@functools.partial(jax.jit, static_argnames=('chunk_size',))
def assign(
  x: jax.Array, codebooks: jax.Array, chunk_size: int | None = None, alive: jax.Array | None = None
) -> jax.Array:
  """Nearest codeword of every point (the fused, chunked kernel of the Lloyd iterations).

  Args:
    x: [num_problems, num_points, subvector_dim].
    codebooks: [num_problems, codebook_size, subvector_dim].
    chunk_size: points per chunk (static; None: `_chunk`'s default, cache-sized chunks on CPU).
      The codes do not depend on it.
    alive: optional [num_problems, codebook_size] bool mask of live codewords (codebook compression);
      dead codewords are never chosen. Every problem needs at least one live codeword.

  Returns:
    codes [num_problems, num_points] int32; ties go to the lowest index.
  """
  chunk = _chunk(*x.shape, chunk_size)
  if alive is not None:
    alive = jnp.asarray(alive, bool)
  return _assign(jnp.asarray(x, jnp.float32), jnp.asarray(codebooks, jnp.float32), chunk, alive)


def _reseed(codebooks: jax.Array, empty: jax.Array, x_ones: jax.Array, err: jax.Array) -> jax.Array:
  """The i-th empty cluster of a problem takes the point with the i-th largest error (x_ones as in `_update`)."""
  top = min(codebooks.shape[1], x_ones.shape[1])
  _, worst = jax.lax.top_k(err, top)  # [num_problems, top] point indices, largest error first
  rank = jnp.cumsum(empty, axis=1) - 1  # [num_problems, codebook_size] rank among the empty clusters
  pick = jnp.take_along_axis(worst, jnp.clip(rank, 0, top - 1), axis=1)  # [num_problems, codebook_size]
  seeds = jnp.take_along_axis(x_ones, pick[..., None], axis=1)[..., :-1]  # [num_problems, codebook_size, subvector_dim]
  return jnp.where((empty & (rank < top))[..., None], seeds, codebooks)


def _update(x_ones: jax.Array, codes: jax.Array, err: jax.Array, codebooks: jax.Array) -> jax.Array:
  """Means of the assigned points by one segment_sum over all problems; empty clusters re-seeded.

  Args:
    x_ones: [num_problems, num_points, subvector_dim + 1]: the points with a trailing 1 (the count).
    codes: [num_problems, num_points] int32.
    err: [num_problems, num_points] squared error of each point under `codebooks`.
    codebooks: [num_problems, codebook_size, subvector_dim], kept where a cluster is empty.

  Returns:
    codebooks [num_problems, codebook_size, subvector_dim].
  """
  num_problems, codebook_size, subvector_dim = codebooks.shape
  segments = (codes + jnp.arange(num_problems, dtype=jnp.int32)[:, None] * codebook_size).reshape(-1)
  sums = jax.ops.segment_sum(x_ones.reshape(-1, subvector_dim + 1), segments, num_segments=num_problems * codebook_size)
  sums = sums.reshape(num_problems, codebook_size, subvector_dim + 1)
  counts = sums[..., -1]  # [num_problems, codebook_size]
  means = jnp.where(counts[..., None] > 0, sums[..., :-1] / jnp.maximum(counts, 1.0)[..., None], codebooks)
  empty = counts == 0
  return jax.lax.cond(jnp.any(empty), _reseed, lambda c, *_: c, means, empty, x_ones, err)


def _with_ones(x: jax.Array) -> jax.Array:
  """[num_problems, num_points, subvector_dim] -> [..., subvector_dim + 1] with a trailing 1 (the count)."""
  return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def lloyd_step(x: jax.Array, codebooks: jax.Array, chunk_size: int | None = None) -> jax.Array:
  """One Lloyd iteration (assignment, then update with re-seeding of empty clusters).

  Args:
    x: [num_problems, num_points, subvector_dim].
    codebooks: [num_problems, codebook_size, subvector_dim].
    chunk_size: points per chunk of the assignment.

  Returns:
    codebooks [num_problems, codebook_size, subvector_dim] float32.
  """
  seeding._check(x, codebooks.shape[1])
  return _lloyd_step(jnp.asarray(x, jnp.float32), jnp.asarray(codebooks, jnp.float32), chunk_size)


@functools.partial(jax.jit, static_argnames=('chunk_size',))
def _lloyd_step(x: jax.Array, codebooks: jax.Array, chunk_size: int | None) -> jax.Array:
  codes = _assign(x, codebooks, _chunk(*x.shape, chunk_size))
  return _update(_with_ones(x), codes, _sq_error(x.transpose(0, 2, 1), codebooks, codes), codebooks)


@functools.partial(jax.jit, static_argnames=('iters', 'chunk'))
def _lloyd(x: jax.Array, init: jax.Array, iters: int, chunk: int) -> KMeansResult:
  mean = jnp.mean(x, axis=1, keepdims=True)  # [num_problems, 1, subvector_dim]
  centred = x - mean  # the distance expansion then loses no float32 precision to an offset
  xt = centred.transpose(0, 2, 1)  # [num_problems, subvector_dim, num_points]
  x_ones = _with_ones(centred)  # [num_problems, num_points, subvector_dim + 1]
  chunks = _point_chunks(xt, chunk)  # laid out once for every step

  def step(carry):
    i, codebooks, objective, _ = carry
    codes = _nearest_in_chunks(chunks, codebooks, xt.shape[2])
    err = _sq_error(xt, codebooks, codes)
    updated = _update(x_ones, codes, err, codebooks)
    # A Lloyd step is a fixed function of the codebooks: once it returns them bit for bit, every later step would
    # too, and the later objective entries would repeat this one. So they are filled now and the loop stops.
    objective = jnp.where(jnp.arange(iters) >= i, jnp.sum(err), objective)
    fixed = jnp.all(
      jax.lax.bitcast_convert_type(updated, jnp.int32) == jax.lax.bitcast_convert_type(codebooks, jnp.int32)
    )
    return i + 1, updated, objective, fixed

  def running(carry):
    i, _, _, fixed = carry
    return (i < iters) & jnp.logical_not(fixed)

  start = (jnp.int32(0), init - mean, jnp.zeros((iters,), jnp.float32), jnp.bool_(False))
  steps, codebooks, objective, _ = jax.lax.while_loop(running, step, start)
  codebooks = codebooks + mean
  codes = _assign(x, codebooks, chunk)  # exactly what `assign` gives for the returned codebooks
  final = jnp.sum(_sq_error(x.transpose(0, 2, 1), codebooks, codes))
  return KMeansResult(codebooks, codes, jnp.append(objective, final), steps)


@functools.partial(jax.jit, static_argnames=('codebook_size', 'iters', 'chunk_size'))
def kmeans(
  x: jax.Array,
  codebook_size: int,
  key: jax.Array,
  *,
  iters: int = 25,
  chunk_size: int | None = None,
  init: jax.Array | None = None,
) -> KMeansResult:
  """k-means++ seeding then `iters` Lloyd iterations on every problem at once.

  The iterations stop early, with the same result, once a step returns every problem's codebooks bit for bit: a
  Lloyd step is a fixed function of the codebooks, so all later steps would return them too (`steps` says how many
  ran; on DiT-S/2-shaped weights, K=256 d=8, benchmarks/quantize_vs_faiss.py: 5-7 of 25 for the 384-point problems,
  18-22 for 1152-1536, all 25 for 2304). The seeding runs on all points, or on a random subset of
  SEED_POINTS_PER_CODEWORD * codebook_size points when there are more; the Lloyd iterations always use every point.

  With codebook_size >= num_points (and no `init`) the codewords are the points themselves, padded
  with copies of the first point, and reconstruction is exact. Data with fewer distinct points than
  codewords (all points equal included) give duplicate codewords and objective 0, never NaN.

  Args:
    x: [num_problems, num_points, subvector_dim], cast to float32.
    codebook_size: codewords per problem (static).
    key: PRNG key of the seeding; results are deterministic given it.
    iters: Lloyd iterations (static): the most that run.
    chunk_size: points per chunk of the assignment (static); results do not depend on it.
    init: optional initial codebooks [num_problems, codebook_size, subvector_dim] instead of k-means++.

  Returns:
    KMeansResult; `objective` never increases (up to float32 rounding).

  Raises:
    ValueError: codebook_size < 1, iters < 0, or x not a non-empty 3-D array.
  """
  seeding._check(x, codebook_size, iters)
  x = jnp.asarray(x, jnp.float32)
  num_problems, num_points, subvector_dim = x.shape
  if init is None and codebook_size >= num_points:
    pad = jnp.broadcast_to(x[:, :1], (num_problems, codebook_size - num_points, subvector_dim))
    codes = jnp.broadcast_to(jnp.arange(num_points, dtype=jnp.int32), (num_problems, num_points))
    return KMeansResult(jnp.concatenate([x, pad], axis=1), codes, jnp.zeros((iters + 1,), jnp.float32), jnp.int32(0))
  if init is None:
    seed_points = SEED_POINTS_PER_CODEWORD * codebook_size
    if num_points > seed_points:
      subset = seeding._uniform(key, (num_problems, seed_points), stream=1) * num_points  # with replacement
      subset = jnp.minimum(subset.astype(jnp.int32), num_points - 1)  # [num_problems, seed_points]
      init = kmeans_plusplus_init(jnp.take_along_axis(x, subset[..., None], axis=1), codebook_size, key)
    else:
      init = kmeans_plusplus_init(x, codebook_size, key)
  elif init.shape != (num_problems, codebook_size, subvector_dim):
    raise ValueError(f'init has shape {init.shape}: expected {(num_problems, codebook_size, subvector_dim)}')
  return _lloyd(x, jnp.asarray(init, jnp.float32), iters, _chunk(*x.shape, chunk_size))
