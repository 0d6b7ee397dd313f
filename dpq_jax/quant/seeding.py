"""k-means++ seeding of many k-means problems at once (kmeans.py's initialisation), pure and jittable.

Inputs are x [num_problems, num_points, subvector_dim], as in kmeans.py. Greedy k-means++ (scikit-learn's default):
each new codeword is the best of a few points drawn with probability proportional to their squared distance to the
codewords so far. All random numbers come from one Philox draw before the loop.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def _check(x: jax.Array, codebook_size: int, iters: int = 0) -> None:
  if x.ndim != 3 or 0 in x.shape:
    raise ValueError(f'x must be a non-empty [num_problems, num_points, subvector_dim] array, got shape {x.shape}')
  if codebook_size < 1:
    raise ValueError(f'codebook_size={codebook_size}: expected >= 1')
  if iters < 0:
    raise ValueError(f'iters={iters}: expected >= 0')


def _first_above(cdf: jax.Array, target: jax.Array, positive: jax.Array) -> jax.Array:
  """Inverse-CDF lookup: the first index along the last axis with cdf > target.

  Args:
    cdf: [num_problems, n] cumulative mass.
    target: [num_problems, num_trials] values in [0, total mass).
    positive: [num_problems, n] where the mass is positive.

  Returns:
    [num_problems, num_trials] int32 indices, clipped to the last positive entry (which only acts when
    float rounding puts a target at or past the total mass).
  """
  n = cdf.shape[-1]
  count = jnp.sum(cdf[:, None, :] <= target[..., None], axis=-1)
  last = n - 1 - jnp.argmax(positive[:, ::-1], axis=-1)  # [num_problems]
  return jnp.minimum(count, last[:, None]).astype(jnp.int32)


def _uniform(key: jax.Array, shape: tuple[int, ...], stream: int = 0) -> jax.Array:
  """Uniform float32 values in [0, 1) of `shape`, deterministic given (key, stream).

  XLA's RngBitGenerator (Philox) seeded by the key's data: one HLO operation, where a jax.random draw (threefry,
  unrolled into the program) added ~2 s of compile time to every k-means program on CPU (measured, jax 0.10).
  `stream` selects an independent sequence for the same key.
  """
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  data = jnp.ravel(data).astype(jnp.uint32)
  k0, k1 = data[0], data[-1]
  mix = jnp.uint32((0x9E3779B9 * (stream + 1)) % 2**32)  # a different stream differs in every state word
  state = jnp.stack([k0 ^ mix, k1, k0, k1 ^ mix])
  _, bits = jax.lax.rng_bit_generator(state, shape, jnp.uint32, algorithm=jax.lax.RandomAlgorithm.RNG_PHILOX)
  return jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0  # [1, 2) - 1


def kmeans_plusplus_init(x: jax.Array, codebook_size: int, key: jax.Array, num_trials: int | None = None) -> jax.Array:
  """Greedy k-means++ seeding of every problem, deterministic given `key`.

  Each new codeword is the best of `num_trials` points drawn with probability proportional to their
  squared distance to the nearest codeword so far (best: lowest resulting total squared distance),
  as scikit-learn's default; `num_trials=1` is plain k-means++. Once every point is a codeword the
  draws are uniform, so duplicates follow.

  Args:
    x: [num_problems, num_points, subvector_dim].
    codebook_size: codewords per problem (static).
    key: PRNG key.
    num_trials: candidates per codeword (static); None: 2 + floor(ln codebook_size).

  Returns:
    codebooks [num_problems, codebook_size, subvector_dim] float32, each codeword a point of x.
  """
  _check(x, codebook_size)
  if num_trials is not None and num_trials < 1:
    raise ValueError(f'num_trials={num_trials}: expected >= 1 or None')
  return _kmeans_pp(jnp.asarray(x, jnp.float32), codebook_size, key, num_trials or 2 + int(math.log(codebook_size)))


def _keeps_apart() -> bool:
  """Whether `_apart` separates its kernels: on CPU only (GPU/TPU fuse otherwise, and a conditional costs more)."""
  return jax.default_backend() == 'cpu'


def _apart(i: jax.Array, fn, *args):
  """fn(*args) as kernels of their own whose result is a buffer, inside the seeding loop (trip i >= 1).

  XLA's CPU fusion put the draw's index search inside the gather of the candidates, where it ran once per
  gathered coordinate (8x), and wrote the potential's four point slices out in full for the reduction to read.
  A conditional's branches are compiled apart and its result is a buffer (`optimization_barrier` is removed
  before fusion on CPU). The seeds are the same bits; the seeding of the DiT-S/2 stacks ran 28-33% faster (fc2
  [2304, 384]: 5.7 -> 3.8 s, adaLN [576, 2304]: 5.4 -> 3.9 s, best of 4). The predicate holds on every trip:
  the zeros branch never runs.
  """
  if not _keeps_apart():
    return fn(*args)

  def zeros(*args):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))

  return jax.lax.cond(i > 0, fn, zeros, *args)


@functools.partial(jax.jit, static_argnames=('codebook_size', 'num_trials'))
def _kmeans_pp(x: jax.Array, codebook_size: int, key: jax.Array, num_trials: int) -> jax.Array:
  num_problems, num_points, subvector_dim = x.shape
  # Two-level inverse-CDF sampling (block, then point in block): one uniform per draw, and cumsums
  # over ~sqrt(num_points) entries instead of a full-length cumsum or per-point Gumbel noise.
  block = 1 << math.isqrt(num_points - 1).bit_length()  # the power of two >= sqrt(num_points)
  num_blocks = -(-num_points // block)
  padded = num_blocks * block
  num_parts = min(4, block)
  # xt [num_problems, subvector_dim, padded]: points minor, zero-padded to whole blocks.
  xt = jnp.pad(x.transpose(0, 2, 1), ((0, 0), (0, 0), (0, padded - num_points)))
  valid = (jnp.arange(padded) < num_points).astype(jnp.float32)  # [padded]
  problems = jnp.arange(num_problems)

  def sq_dist(c: jax.Array) -> jax.Array:
    """c [num_problems, num_trials, subvector_dim] -> squared distances [num_problems, num_trials, padded]."""
    d2 = jnp.zeros((num_problems, c.shape[1], padded), jnp.float32)
    for j in range(subvector_dim):
      d2 = d2 + jnp.square(xt[:, None, j, :] - c[:, :, j, None])
    return d2 * valid

  def draw(d2: jax.Array, uniform: jax.Array) -> jax.Array:
    """num_trials point indices [num_problems, num_trials], drawn with probability ~ d2 (uniform if all 0) from
    uniform [num_problems, num_trials] values in [0, 1)."""
    weights = jnp.where(jnp.sum(d2, axis=1, keepdims=True) > 0, d2, valid).reshape(num_problems, num_blocks, block)
    block_mass = jnp.sum(weights, axis=2)  # [num_problems, num_blocks]
    block_cdf = jnp.cumsum(block_mass, axis=1)  # [num_problems, num_blocks]
    target = uniform * block_cdf[:, -1:]  # [num_problems, num_trials]
    b = _first_above(block_cdf, target, block_mass > 0)  # [num_problems, num_trials]
    rest = target - jnp.take_along_axis(block_cdf - block_mass, b, axis=1)
    inside = weights[problems[:, None], b]  # [num_problems, num_trials, block]
    offset = jax.vmap(_first_above)(jnp.cumsum(inside, axis=2), rest[..., None], inside > 0)[..., 0]
    return b * block + offset

  # Every random number of the seeding in one draw, before the loop (generators in the loop body and for the first
  # codeword made up 60% of this program's compile time, which every layer shape pays).
  uniforms = _uniform(key, (codebook_size, num_problems, num_trials))  # [K, P, T] in [0, 1)
  first_index = jnp.minimum((uniforms[0, :, 0] * num_points).astype(jnp.int32), num_points - 1)  # [num_problems]
  first = xt[problems, :, first_index]  # [num_problems, subvector_dim]
  codebooks = jnp.zeros((num_problems, codebook_size, subvector_dim), jnp.float32).at[:, 0].set(first)

  def folded_reach(d2: jax.Array, candidates: jax.Array) -> jax.Array:
    """Squared distance to the nearest codeword after adding each candidate, its num_parts slices of the points
    added together: [num_problems, num_trials, padded // num_parts]."""
    reach = jnp.minimum(d2[:, None, :], sq_dist(candidates))  # [num_problems, num_trials, padded]
    # Adding a few slices first and reducing a 4x shorter row is ~3x faster than one long row reduction on CPU.
    parts = reach.reshape(num_problems, num_trials, num_parts, padded // num_parts)
    return sum(parts[:, :, r] for r in range(1, num_parts)) + parts[:, :, 0]

  def body(i, carry):
    codebooks, d2 = carry  # [num_problems, codebook_size, subvector_dim], [num_problems, padded]
    index = _apart(i, draw, d2, uniforms[i])  # [num_problems, num_trials]
    candidates = xt[problems[:, None], :, index]  # [num_problems, num_trials, d]
    potential = jnp.sum(_apart(i, folded_reach, d2, candidates), axis=-1)  # total after each candidate
    best = candidates[problems, jnp.argmin(potential, axis=1)]  # [num_problems, subvector_dim]
    return codebooks.at[:, i].set(best), jnp.minimum(d2, sq_dist(best[:, None])[:, 0])

  return jax.lax.fori_loop(1, codebook_size, body, (codebooks, sq_dist(first[:, None])[:, 0]))[0]
