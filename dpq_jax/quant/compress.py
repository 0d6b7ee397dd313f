"""Codebook compression to a size budget: importance, redundancy removal, re-assignment, allocation.

Vocabulary (as kmeans.py): a layer has `num_codebooks` codebooks (PQ: one per sub-vector position;
VQ: one) of `codebook_size` (K) codewords of `subvector_dim` (d) values; codebook c serves
`num_points` sub-vectors (PQ: the out_features rows at that position; VQ: all of the layer's).
Compression leaves K' <= K live codewords per codebook ("survivors").

1. Importance of codeword k: the sum of the point weights of the sub-vectors assigned to it (weight
   1: the usage count; a sensitivity such as input-activation energy gives a data-aware variant).
2. A removal path per codebook, K -> 1 codewords, one codeword per step, computed on "atoms" (the
   current codewords with their importance W_k and the weighted centroid M_k of their sub-vectors).
   order='importance': the live codeword of lowest current importance goes first (its sub-vectors
   count towards the survivor that takes them), and goes where the distortion increases least:
   - prune (merge off): its sub-vectors move to the nearest survivor, survivors stay where they are;
   - merge (on): it merges with the survivor of least Ward increase W_a W_b / (W_a + W_b) ||M_a - M_b||^2
     and the survivor moves to the merged centroid (near-duplicates merge at almost no cost).
   order='cost' (merge only): greedy Ward agglomeration, every step merging the live pair of least Ward
   increase (ward.py: exact, with lazy lower bounds instead of re-ranking all pairs every step).
   The step costs are the (weighted) squared-error increase of each removal.
3. A global allocation of bytes over all codebooks of all layers: each codebook's (bytes, distortion)
   curve along its path, a Lagrange multiplier lambda bisected so that sum(bytes) meets the target
   (every codebook at argmin distortion + lambda * bytes: equal marginal distortion per byte saved),
   then the leftover bytes spent greedily on the best distortion saved per byte.
4. Realisation: survivors compacted to the first K' rows (the rest dead: masked in `alive`), every
   sub-vector re-assigned to its nearest survivor, optionally a few masked Lloyd steps, then codes
   re-packed at ceil(log2 K') bits per codebook (see `codebook_bytes`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpq_jax.quant import kmeans as kmeans_lib
from dpq_jax.quant import packing, ward


class Path(NamedTuple):
  """Removal path of every codebook of a layer (K - 1 steps, from K codewords down to 1)."""

  removed: jax.Array  # [num_codebooks, K - 1] int32: codeword removed at each step
  target: jax.Array  # [num_codebooks, K - 1] int32: survivor its sub-vectors went to
  cost: jax.Array  # [num_codebooks, K - 1] float32: distortion increase of the step
  importance: jax.Array  # [num_codebooks, K] float32: importance before any removal


class Compressed(NamedTuple):
  """One layer after compression; codebooks keep their padded shape."""

  codebooks: jax.Array  # [num_codebooks, K, d] float32; live codewords first, dead rows copy row 0
  codes: jax.Array  # [num_codebooks, num_points] int32 < K' of each codebook
  alive: jax.Array  # [num_codebooks, K] bool: k < K' of each codebook


def importance(codes: jax.Array, codebook_size: int, weights: jax.Array | None = None) -> jax.Array:
  """Importance [num_codebooks, K] of every codeword: sum of the weights of its sub-vectors.

  Args:
    codes: [num_codebooks, num_points] integer codes.
    codebook_size: K.
    weights: [num_codebooks, num_points] non-negative point weights; None: 1 (usage count).
  """
  num_codebooks, num_points = codes.shape
  if weights is None:
    weights = jnp.ones((num_codebooks, num_points), jnp.float32)
  segments = codes.astype(jnp.int32) + jnp.arange(num_codebooks, dtype=jnp.int32)[:, None] * codebook_size
  sums = jax.ops.segment_sum(
    weights.reshape(-1).astype(jnp.float32), segments.reshape(-1), num_codebooks * codebook_size
  )
  return sums.reshape(num_codebooks, codebook_size)


def _atoms(x: jax.Array, codebooks: jax.Array, codes: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(W [num_codebooks, K], M [num_codebooks, K, d]): importance and weighted centroid of every codeword's
  sub-vectors (the codeword itself where it has no weight)."""
  num_codebooks, codebook_size, d = codebooks.shape
  segments = (codes.astype(jnp.int32) + jnp.arange(num_codebooks, dtype=jnp.int32)[:, None] * codebook_size).reshape(-1)
  wx = jnp.concatenate([x * weights[..., None], weights[..., None]], axis=-1).reshape(-1, d + 1)
  sums = jax.ops.segment_sum(wx, segments, num_codebooks * codebook_size).reshape(num_codebooks, codebook_size, d + 1)
  w = sums[..., -1]
  m = jnp.where(w[..., None] > 0, sums[..., :-1] / jnp.maximum(w, 1e-30)[..., None], codebooks)
  return w, m


ORDERS = ('importance', 'cost')


def _path(w: jax.Array, m: jax.Array, merge: bool, order: str = 'importance') -> tuple[jax.Array, jax.Array, jax.Array]:
  """(removed, target, cost) [B, K - 1] of atoms w [B, K], m [B, K, d] in `order` (the module docstring).

  order='importance': the lowest-importance live codeword goes first (ties: lowest index); its cluster
  (importance W_k, centroid M_k) goes to the survivor s that increases the distortion least:
    prune: survivors stay at their codeword P_s; increase W_k (||M_k - P_s||^2 - ||M_k - P_k||^2);
    merge: Ward's W_k W_s / (W_k + W_s) ||M_k - M_s||^2, and s moves to the merged centroid.
  One step reads one row of distances, so a path is O(K^2 d) per codebook.
  order='cost': `ward.greedy_path` (merge only)."""
  if order not in ORDERS:
    raise ValueError(f'order={order!r}: expected one of {", ".join(ORDERS)}')
  if order == 'cost':
    if not merge:
      raise ValueError("order='cost' removes codewords by Ward merge cost: it needs merge=True")
    return ward.greedy_path(w, m)
  batch, codebook_size, _ = m.shape
  rows = jnp.arange(batch)
  index = jnp.arange(codebook_size)

  def step(carry, _):
    w, centroid, position, alive = carry  # [B, K], [B, K, d], [B, K, d], [B, K] bool
    k = jnp.argmin(jnp.where(alive, w, jnp.inf), axis=1)  # [B]
    ck, wk = centroid[rows, k], w[rows, k]  # [B, d], [B]
    if merge:
      d2 = jnp.sum(jnp.square(ck[:, None] - centroid), axis=-1)  # [B, K]
      increase = wk[:, None] * w / jnp.maximum(wk[:, None] + w, 1e-30) * d2
    else:
      d2 = jnp.sum(jnp.square(ck[:, None] - position), axis=-1)
      increase = wk[:, None] * (d2 - jnp.sum(jnp.square(ck - position[rows, k]), axis=-1)[:, None])
    increase = jnp.where(alive & (index[None] != k[:, None]), increase, jnp.inf)
    s = jnp.argmin(increase, axis=1)
    cost = increase[rows, s]
    ws = w[rows, s]
    total = wk + ws
    mean = (wk[:, None] * ck + ws[:, None] * centroid[rows, s]) / jnp.maximum(total, 1e-30)[:, None]
    merged = jnp.where(total[:, None] > 0, mean, centroid[rows, s])
    centroid = centroid.at[rows, s].set(merged)
    if merge:
      position = position.at[rows, s].set(merged)
    w = w.at[rows, s].set(total).at[rows, k].set(0.0)
    alive = alive.at[rows, k].set(False)
    return (w, centroid, position, alive), (k.astype(jnp.int32), s.astype(jnp.int32), cost)

  init = (w, m, m, jnp.ones((batch, codebook_size), bool))
  _, (removed, target, cost) = jax.lax.scan(step, init, None, length=codebook_size - 1)
  return removed.T, target.T, cost.T


@functools.partial(jax.jit, static_argnames=('merge', 'order'))
def removal_path(
  x: jax.Array,
  codebooks: jax.Array,
  codes: jax.Array,
  weights: jax.Array | None = None,
  *,
  merge: bool = True,
  order: str = 'importance',
) -> Path:
  """The removal path of every codebook of a layer (see the module docstring).

  Args:
    x: [num_codebooks, num_points, d] reference sub-vectors (the weights being approximated).
    codebooks: [num_codebooks, K, d].
    codes: [num_codebooks, num_points] current assignment.
    weights: [num_codebooks, num_points] point weights (sensitivity); None: 1 each (usage).
    merge: Ward merging by least distortion increase; False: prune by lowest importance.
    order: 'importance' (lowest importance first) or 'cost' (greedy Ward: least merge cost first; merge only).

  Raises:
    ValueError: an unknown order, or order='cost' without merge.
  """
  x = jnp.asarray(x, jnp.float32)
  if weights is None:
    weights = jnp.ones(codes.shape, jnp.float32)
  w, m = _atoms(x, jnp.asarray(codebooks, jnp.float32), codes, jnp.asarray(weights, jnp.float32))
  removed, target, cost = _path(w, m, merge, order)
  return Path(removed, target, cost, w)


@functools.partial(jax.jit, static_argnames=('merge', 'order'))
def _path_jit(
  w: jax.Array, m: jax.Array, merge: bool, order: str = 'importance'
) -> tuple[jax.Array, jax.Array, jax.Array]:
  return _path(w, m, merge, order)


@jax.jit
def atoms(
  x: jax.Array, codebooks: jax.Array, codes: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Importance W [num_codebooks, K] and weighted centroid M [num_codebooks, K, d] of every codeword's
  sub-vectors x [num_codebooks, num_points, d] under codes (the codeword itself where W is 0)."""
  x = jnp.asarray(x, jnp.float32)
  if weights is None:
    weights = jnp.ones(codes.shape, jnp.float32)
  return _atoms(x, jnp.asarray(codebooks, jnp.float32), codes, jnp.asarray(weights, jnp.float32))


def paths_of_atoms(
  w: np.ndarray, m: np.ndarray, *, merge: bool = True, order: str = 'importance', chunk: int = 1024
) -> Path:
  """`removal_path` of many codebooks given their atoms (e.g. all layers' at once), `chunk` codebooks per
  call (one compilation per K and d; the last chunk padded).

  Args:
    w: [num_codebooks, K] importance; m: [num_codebooks, K, d] centroids.
    merge, order: as `removal_path`.
  """
  num = w.shape[0]
  chunk = min(chunk, num)
  outs = []
  for start in range(0, num, chunk):
    wc, mc = w[start : start + chunk], m[start : start + chunk]
    pad = chunk - wc.shape[0]
    if pad:
      wc = np.concatenate([wc, np.zeros((pad,) + wc.shape[1:], wc.dtype)])
      mc = np.concatenate([mc, np.zeros((pad,) + mc.shape[1:], mc.dtype)])
    outs.append([np.asarray(a)[: chunk - pad] for a in _path_jit(jnp.asarray(wc), jnp.asarray(mc), merge, order)])
  removed, target, cost = (np.concatenate(parts) for parts in zip(*outs))
  return Path(removed, target, cost, np.asarray(w))


@jax.jit
def _labels(removed: jax.Array, target: jax.Array, num_removed: jax.Array) -> jax.Array:
  """Survivor [num_codebooks, K] that every codeword belongs to after num_removed [num_codebooks] steps."""
  batch, steps = removed.shape
  labels = jnp.broadcast_to(jnp.arange(steps + 1, dtype=jnp.int32), (batch, steps + 1))

  def step(labels, t):
    k, s = removed[:, t], target[:, t]
    moved = (labels == k[:, None]) & (t < num_removed)[:, None]
    return jnp.where(moved, s[:, None], labels), None

  return jax.lax.scan(step, labels, jnp.arange(steps))[0]


@functools.partial(jax.jit, static_argnames=('merge', 'lloyd_steps'))
def realize(
  x: jax.Array,
  codebooks: jax.Array,
  codes: jax.Array,
  path: Path,
  num_live: jax.Array,
  weights: jax.Array | None = None,
  *,
  merge: bool = True,
  lloyd_steps: int = 0,
) -> Compressed:
  """Applies the first K - num_live steps of each codebook's path.

  Survivors keep their codeword (merge: a survivor that absorbed others becomes the weighted centroid of
  its members' sub-vectors), are compacted to the first num_live rows in their original order, every
  sub-vector goes to its nearest survivor, then `lloyd_steps` weighted Lloyd steps over the survivors.

  Args:
    x: [num_codebooks, num_points, d] reference sub-vectors.
    codebooks: [num_codebooks, K, d].
    codes: [num_codebooks, num_points].
    path: from `removal_path` on the same inputs.
    num_live: [num_codebooks] int, K' in [1, K].
    weights: [num_codebooks, num_points] point weights; None: 1 each.
    merge: as the path was computed.
    lloyd_steps: Lloyd iterations after re-assignment (static); empty survivors keep their codeword.
  """
  x = jnp.asarray(x, jnp.float32)
  codebooks = jnp.asarray(codebooks, jnp.float32)
  num_codebooks, codebook_size, d = codebooks.shape
  if weights is None:
    weights = jnp.ones(codes.shape, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  labels = _labels(path.removed, path.target, codebook_size - num_live)  # [C, K]
  survivor = labels == jnp.arange(codebook_size)[None]  # [C, K]
  if merge:
    w, m = _atoms(x, codebooks, codes, weights)
    grouped = jax.vmap(lambda v, lab: jax.ops.segment_sum(v, lab, codebook_size))
    sw = grouped(w, labels)  # [C, K]
    sm = grouped(w[..., None] * m, labels)  # [C, K, d]
    absorbed = grouped(jnp.ones_like(w), labels) > 1
    centroid = sm / jnp.maximum(sw, 1e-30)[..., None]
    codebooks = jnp.where((absorbed & (sw > 0))[..., None], centroid, codebooks)
  # Compaction: survivors first, in their original order (a stable sort on "is dead").
  order = jnp.argsort(~survivor, axis=1, stable=True)  # [C, K]
  packed = jnp.take_along_axis(codebooks, order[..., None], axis=1)
  alive = jnp.arange(codebook_size)[None] < num_live[:, None]
  packed = jnp.where(alive[..., None], packed, packed[:, :1])
  # A loop, not lloyd_steps unrolled copies: each step holds an assignment kernel, compiled once this way.
  packed = jax.lax.fori_loop(0, lloyd_steps, lambda _, p: _masked_lloyd(x, p, alive, weights), packed)
  new_codes = kmeans_lib.assign(x, packed, alive=alive)
  return Compressed(packed, new_codes, alive)


def _masked_lloyd(x: jax.Array, codebooks: jax.Array, alive: jax.Array, weights: jax.Array) -> jax.Array:
  num_codebooks, codebook_size, d = codebooks.shape
  codes = kmeans_lib.assign(x, codebooks, alive=alive)
  w, m = _atoms(x, codebooks, codes, weights)
  return jnp.where((alive & (w > 0))[..., None], m, codebooks)


def assign_survivors(x: jax.Array, codebooks: jax.Array, alive: jax.Array) -> jax.Array:
  """Nearest live codeword [num_codebooks, num_points] of every sub-vector (re-assignment after rounding)."""
  return kmeans_lib.assign(x, codebooks, alive=alive)


# ---------------------------------------------------------------------------------------------------------
# Bytes and the global allocation (host numpy).


def codebook_bytes(
  num_live: np.ndarray,
  num_points: int,
  subvector_dim: int,
  value_bytes: int,
  size_bytes: int,
  overhead_bytes: int = 0,
) -> np.ndarray:
  """Exact on-disk bytes of codebooks with num_live live codewords, each serving num_points codes:
  live rows (value_bytes each value), the codes as one byte-aligned stream per codebook at
  ceil(log2 K') bits, the codebook's size entry (size_bytes) and its other per-codebook bytes
  (overhead_bytes: the float16 scale of an int8 codebook, codebook_values.overhead_bytes)."""
  num_live = np.asarray(num_live, np.int64)
  bits = np.array([packing.index_bits(int(k)) for k in range(1, int(num_live.max(initial=1)) + 1)], np.int64)
  code_bytes = (num_points * bits[num_live - 1] + 7) // 8
  return num_live * subvector_dim * value_bytes + code_bytes + size_bytes + overhead_bytes


class Allocation(NamedTuple):
  num_live: np.ndarray  # [total codebooks] int: K' of every codebook
  bytes: int  # bytes of all codebooks at num_live (excluding fixed bytes)
  distortion: float  # estimated distortion increase (sum of path costs)
  min_bytes: int  # smallest reachable bytes (every codebook at min_live)
  lam: float  # the Lagrange multiplier (distortion per byte) at the end of the bisection


class BudgetError(ValueError):
  """A budget below the minimum reachable size `min_bytes`."""

  def __init__(self, message: str, min_bytes: int):
    super().__init__(message)
    self.min_bytes = min_bytes


def allocate(costs: np.ndarray, nbytes: np.ndarray, target: int, min_live: int = 1, iters: int = 64) -> Allocation:
  """Chooses K' per codebook to meet `target` bytes at least distortion (Lagrangian + greedy fill).

  Args:
    costs: [num_codebooks, K - 1] path step costs (distortion increase of each removal).
    nbytes: [num_codebooks, K] bytes at K' = K, K - 1, ..., 1 (column r: after r removals).
    target: bytes available to these codebooks.
    min_live: no codebook goes below this many live codewords.

  Raises:
    BudgetError: the target is below the bytes with every codebook at min_live; the message names
      that minimum.
  """
  num_codebooks, codebook_size = nbytes.shape
  max_removed = codebook_size - max(1, min(min_live, codebook_size))
  distortion = np.concatenate([np.zeros((num_codebooks, 1)), np.cumsum(np.asarray(costs, np.float64), axis=1)], axis=1)
  distortion = distortion[:, : max_removed + 1]
  nbytes = np.asarray(nbytes, np.int64)[:, : max_removed + 1]
  rows = np.arange(num_codebooks)
  min_choice = np.argmin(nbytes, axis=1)
  min_bytes = int(nbytes[rows, min_choice].sum())
  if min_bytes > target:
    raise BudgetError(
      f'{target} bytes for the codebooks and codes: the minimum reachable is {min_bytes} bytes', min_bytes
    )

  def choose(lam: float) -> np.ndarray:
    return np.argmin(distortion + lam * nbytes, axis=1)

  choice = choose(0.0)
  if nbytes[rows, choice].sum() <= target:
    return Allocation(codebook_size - choice, int(nbytes[rows, choice].sum()), float(distortion[rows, choice].sum()),
                      min_bytes, 0.0)  # fmt: skip
  scale = max(float(np.abs(distortion).max()), 1e-30)
  lo, hi = 0.0, scale  # lambda = scale makes saving a byte worth more than any distortion
  while nbytes[rows, choose(hi)].sum() > target:
    hi *= 2.0
    if hi > scale * 2.0**60:  # ties on bytes only: take the cheapest choice directly
      break
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    if nbytes[rows, choose(mid)].sum() > target:
      lo = mid
    else:
      hi = mid
  feasible = choose(hi)
  if nbytes[rows, feasible].sum() > target:
    feasible = min_choice
  # Greedy fill: move codebooks to their lo-side choice, best distortion saved per byte first.
  richer = choose(lo)
  extra = nbytes[rows, richer] - nbytes[rows, feasible]
  gain = distortion[rows, feasible] - distortion[rows, richer]
  slack = target - int(nbytes[rows, feasible].sum())
  for i in np.argsort(-(gain / np.maximum(extra, 1)), kind='stable'):
    if gain[i] > 0 and 0 < extra[i] <= slack:
      feasible[i] = richer[i]
      slack -= int(extra[i])
  return Allocation(
    codebook_size - feasible,
    int(nbytes[rows, feasible].sum()),
    float(distortion[rows, feasible].sum()),
    min_bytes,
    hi,
  )


def code_entropy_bits(codes: np.ndarray, codebook_size: int) -> float:
  """Total empirical entropy (bits) of codes [num_codebooks, num_points], each codebook its own source:
  what an ideal entropy coder of the codes would reach."""
  codes = np.asarray(codes)
  total = 0.0
  for row in codes.reshape(codes.shape[0], -1):
    p = np.bincount(row, minlength=codebook_size).astype(np.float64) / max(row.size, 1)
    p = p[p > 0]
    total += -row.size * float(np.sum(p * np.log2(p)))
  return total


def size_dtype(codebook_size: int) -> np.dtype:
  """dtype of the stored K' of each codebook."""
  return np.dtype(np.uint16 if codebook_size < 2**16 else np.uint32)


def bits_of(num_live: np.ndarray) -> np.ndarray:
  return np.array([packing.index_bits(int(k)) for k in np.asarray(num_live).reshape(-1)], np.int64)
