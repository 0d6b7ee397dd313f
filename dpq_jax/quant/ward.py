"""Greedy Ward agglomeration of codebook atoms, exact and fast: compress.py's order='cost' removal path.

Atoms as in compress.py: codeword k of a codebook with importance W_k and the weighted centroid M_k of its
sub-vectors; merging atoms a and b increases the (weighted) squared error by Ward's
W_a W_b / (W_a + W_b) ||M_a - M_b||^2. Re-ranking all K^2 pairs every step is O(K^3 d) per codebook (50 s
for 1024 codebooks of K=256 on a 2-core CPU); `greedy_path` gives the same merges with lazy lower bounds.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _first_min(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(min, first index of the min) of x [..., n] along its last axis: jnp.argmin's result, from two plain
  reductions (argmin's variadic reduction is ~10x slower on XLA:CPU)."""
  low = jnp.min(x, axis=-1)  # [...]
  index = jnp.arange(x.shape[-1], dtype=jnp.int32)
  return low, jnp.min(jnp.where(x == low[..., None], index, x.shape[-1]), axis=-1)


def _ward(wq: jax.Array, cq: jax.Array, w: jax.Array, centroid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Ward increase, squared distance) [B, R, K] of merging atoms (wq [B, R], cq [B, d, R]) with every atom
  (w [B, K], centroid [B, d, K]); symmetric to the last bit (the same products and sums either way round)."""
  d2 = jnp.sum(jnp.square(cq[..., None] - centroid[:, :, None]), axis=1)  # [B, R, K]
  return wq[..., None] * w[:, None] / jnp.maximum(wq[..., None] + w[:, None], 1e-30) * d2, d2


def greedy_path(w: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Greedy Ward agglomeration of atoms w [B, K], m [B, K, d]: (removed, target, cost) [B, K - 1].

  Atoms of no importance (W <= 0; every merge with them costs 0) go first, in index order, each to the
  atom of positive importance with the nearest centroid (ties: lowest index); a codebook with none keeps
  atom 0 and sends the others there. Then every step merges the live pair (a, b) of least Ward increase
  W_a W_b / (W_a + W_b) ||M_a - M_b||^2, ties to the lowest (min(a, b), max(a, b)); the one of lower W
  dies (ties: the higher index), the survivor moves to the merged weighted centroid, and the step costs
  that increase. Exactly what re-ranking all pairs every step gives (to float32 rounding of ties), in
  O(K d) per iteration instead of O(K^2 d):

  Every live atom j keeps lb[j], a lower bound of its costs with the other live atoms, exact when it is its
  cost with partner[j] (the first of the least), and lb2[j], a bound of its costs with all but partner[j].
  A merge changes j's costs only with the survivor, to row[j] (computed anyway for the survivor's bounds):
  min(lb[j], row[j]) stays a bound, and an exact one stays exact unless j's partner merged; then
  min(row[j], lb2[j]) is a bound, exact where row[j] < lb2[j]. (Ward's linkage is reducible, so row[j] >=
  lb[j] up to rounding: bounds only rise.) An iteration takes the live atom k of least (lb, index): exact,
  (k, partner[k]) is the least pair of all and merges (one step), the survivor's row recomputed; stale, k's
  row is recomputed (now exact) and the next iteration looks again. About 3 iterations per step on
  codebooks of DiT-XL/2's shapes (benchmarks/compress_order.py).
  """
  batch, codebook_size, _ = m.shape
  steps = codebook_size - 1
  if steps == 0:
    return jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0), jnp.float32)
  rows = jnp.arange(batch)
  index = jnp.arange(codebook_size, dtype=jnp.int32)
  centroid = m.transpose(0, 2, 1)  # [B, d, K]: each coordinate a contiguous row of K
  empty = w <= 0  # [B, K]
  empty = empty.at[:, 0].set(empty[:, 0] & jnp.any(~empty, axis=1))  # no weight at all: atom 0 stays
  live = ~empty  # [B, K]

  # Exact bounds (one O(K^2 d) pass, `block` rows at a time) and the nearest positive atom of each.
  block = math.gcd(codebook_size, 16)

  def first_rows(start: jax.Array) -> tuple[jax.Array, ...]:
    q = start + jnp.arange(block, dtype=jnp.int32)  # [R]
    inc, d2 = _ward(w[:, q], centroid[:, :, q], w, centroid)  # [B, R, K]
    inc = jnp.where(live[:, None] & (index[None] != q[:, None])[None], inc, jnp.inf)
    low, first = _first_min(inc)  # [B, R]
    second = jnp.min(jnp.where(index == first[..., None], jnp.inf, inc), axis=-1)  # [B, R]
    nearest = _first_min(jnp.where(live[:, None], d2, jnp.inf))[1]  # [B, R]
    return low, first, second, nearest

  starts = jnp.arange(0, codebook_size, block, dtype=jnp.int32)
  lb, partner, lb2, nearest = (
    a.transpose(1, 0, 2).reshape(batch, codebook_size) for a in jax.lax.map(first_rows, starts)
  )
  exact = live  # [B, K]

  # The atoms of no importance first, in index order, to their nearest positive atom, at no cost.
  removed = jnp.argsort(live, axis=1, stable=True)[:, :steps].astype(jnp.int32)  # [B, K - 1]
  target = jnp.take_along_axis(nearest, removed, axis=1)  # [B, K - 1]
  cost = jnp.zeros((batch, steps), jnp.float32)  # [B, K - 1]
  done = jnp.sum(empty, axis=1, dtype=jnp.int32)  # [B] steps taken

  def body(carry):
    w, centroid, live, lb, lb2, partner, exact, done, removed, target, cost, it = carry
    k = _first_min(jnp.where(live, lb, jnp.inf))[1]  # [B]
    active = done < steps  # [B]
    merge = active & exact[rows, k]  # [B]: (k, partner[k]) is the least pair
    s, c = partner[rows, k], lb[rows, k]  # [B], [B]
    wk, ws = w[rows, k], w[rows, s]  # [B], [B]
    k_dies = (wk < ws) | ((wk == ws) & (k > s))  # [B]
    dead, survivor = jnp.where(k_dies, k, s), jnp.where(k_dies, s, k)  # [B], [B]
    w_dead, w_survivor = jnp.where(k_dies, wk, ws), jnp.where(k_dies, ws, wk)  # [B], [B]
    total = w_dead + w_survivor  # [B]
    c_dead, c_survivor = centroid[rows, :, dead], centroid[rows, :, survivor]  # [B, d], [B, d]
    merged = (w_dead[:, None] * c_dead + w_survivor[:, None] * c_survivor) / jnp.maximum(total, 1e-30)[:, None]
    centroid = centroid.at[rows, :, survivor].set(jnp.where(merge[:, None], merged, c_survivor))
    w = w.at[rows, survivor].set(jnp.where(merge, total, w_survivor))
    live = live.at[rows, dead].set(live[rows, dead] & ~merge)
    at = jnp.minimum(done, steps - 1)  # [B]
    removed = removed.at[rows, at].set(jnp.where(merge, dead, removed[rows, at]))
    target = target.at[rows, at].set(jnp.where(merge, survivor, target[rows, at]))
    cost = cost.at[rows, at].set(jnp.where(merge, c, cost[rows, at]))
    # The row of costs of q: the survivor after a merge, else k (its bound made exact).
    q = jnp.where(merge, survivor, k)  # [B]
    row = _ward(w[rows, q][:, None], centroid[rows, :, q][..., None], w, centroid)[0][:, 0]  # [B, K]
    row = jnp.where(live & (index != q[:, None]), row, jnp.inf)
    low, first = _first_min(row)  # [B], [B]
    second = jnp.min(jnp.where(index == first[:, None], jnp.inf, row), axis=1)  # [B]
    # After a merge, every other live atom's cost with the survivor is row (see the docstring).
    lost = exact & ((partner == k[:, None]) | (partner == s[:, None]))  # [B, K]: exact, its partner merged
    kept = exact & ~lost  # [B, K]
    closer = (row < lb) | ((row == lb) & (q[:, None] < partner))  # [B, K]
    taken = (kept & closer) | (lost & (row < lb2))  # [B, K]: the survivor is its new exact partner
    new_lb = jnp.where(kept & ~closer, lb, jnp.where(lost, jnp.minimum(row, lb2), jnp.minimum(row, lb)))  # [B, K]
    new_lb2 = jnp.where(kept, jnp.where(closer, lb, jnp.minimum(row, lb2)), jnp.where(lost, lb2, new_lb))  # [B, K]
    after = merge[:, None]  # [B, 1]
    lb = jnp.where(after, new_lb, lb)
    lb2 = jnp.where(after, new_lb2, lb2)
    partner = jnp.where(after & taken, q[:, None], partner)
    exact = jnp.where(after, kept | taken, exact)
    lb = lb.at[rows, q].set(jnp.where(active, low, lb[rows, q]))
    lb2 = lb2.at[rows, q].set(jnp.where(active, second, lb2[rows, q]))
    partner = partner.at[rows, q].set(jnp.where(active, first, partner[rows, q]))
    exact = exact.at[rows, q].set(active | exact[rows, q])
    return w, centroid, live, lb, lb2, partner, exact, done + merge, removed, target, cost, it + 1

  def cond(carry) -> jax.Array:
    # At most K - 1 merges, each after at most (live atoms) refreshes: the cap only stops a NaN input.
    return jnp.any(carry[7] < steps) & (carry[-1] < codebook_size * codebook_size)

  init = (w, centroid, live, lb, lb2, partner, exact, done, removed, target, cost, 0)
  removed, target, cost = jax.lax.while_loop(cond, body, init)[8:11]
  return removed, target, cost
