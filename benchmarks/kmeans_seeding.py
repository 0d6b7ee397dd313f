r"""Where the k-means time of the quantize stage goes, and what a cheaper seeding would cost in error.

  .venv/bin/python -m benchmarks.kmeans_seeding                 # DiT-S/2's adaLN and fc2 stacks, PQ K=256 d=8
  .venv/bin/python -m benchmarks.kmeans_seeding --layers all

One stack per layer shape as the stage batches it (pq.quantize_stack: the 12 blocks' layers of one shape, one
problem per sub-vector position: [12 * C_in / 8 problems, C_out points, 8]), heavy-tailed weights
(benchmarks/_common.py). Each seeding is followed by the same 25 Lloyd iterations on every point:
  k-means++ T   greedy k-means++ with T candidates per codeword (ours: T = 2 + ln K = 7, scikit-learn's rule)
  random        K distinct points of each problem (faiss's seeding)
Seconds are the best of --repeats runs after the compile (both cores), seeding and Lloyd apart; the error is
the final k-means objective (total squared error) over ours (T = 7).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from dpq_jax.quant import kmeans as kmeans_lib

# DiT-S/2 (hidden 384, mlp 1536) block layers: name -> (C_in, C_out); 12 blocks.
LAYERS = {'qkv': (384, 1152), 'proj': (384, 384), 'fc1': (384, 1536), 'fc2': (1536, 384), 'adaLN': (384, 2304)}
BLOCKS = 12


def _best(fn, repeats: int) -> tuple[float, object]:
  out = jax.block_until_ready(fn())  # compile
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best, out


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--layers', default='adaLN,fc2', help=f'comma-separated of {",".join(LAYERS)}, or all')
  parser.add_argument('--k', type=_common.integer(2, 4096), default=256)
  parser.add_argument('--d', type=_common.integer(1), default=8)
  parser.add_argument('--iters', type=_common.integer(1), default=25)
  parser.add_argument('--repeats', type=_common.integer(1), default=2)
  args = parser.parse_args(argv)
  names = list(LAYERS) if args.layers == 'all' else args.layers.split(',')
  for name in names:
    if name not in LAYERS:
      parser.error(f'--layers {name!r}: expected one of {", ".join(LAYERS)} or all')
  default_trials = 2 + int(math.log(args.k))
  seedings = [(f'k-means++ {t}', t) for t in sorted({default_trials, 3, 1}, reverse=True)] + [('random', 0)]
  rng = np.random.default_rng(0)
  key = jax.random.key(0)
  rows = []
  for name in names:
    c_in, c_out = LAYERS[name]
    w = _common.heavy_tailed(rng, (BLOCKS, c_in // args.d, args.d, c_out)).transpose(0, 1, 3, 2)
    x = jnp.asarray(w.reshape(-1, c_out, args.d), jnp.float32)  # [problems, points, d]
    lloyd = functools.partial(kmeans_lib.kmeans, codebook_size=args.k, key=key, iters=args.iters)  # Lloyd from init
    ours = None
    for label, trials in seedings:
      if trials:
        seed = jax.jit(lambda x, t=trials: kmeans_lib.kmeans_plusplus_init(x, args.k, key, t))
      else:
        pick = jax.random.permutation(key, c_out)[: args.k]
        seed = jax.jit(lambda x, pick=pick: x[:, pick])
      seed_s, init = _best(lambda seed=seed: seed(x), args.repeats)
      lloyd_s, result = _best(lambda init=init: lloyd(x, init=init), args.repeats)
      objective = float(result.objective[-1])
      ours = ours or objective
      rows.append((f'{name} [{x.shape[0]}, {c_out}, {args.d}]', label, seed_s, lloyd_s, objective / ours))
  print(f'\n{_common.platform()}; K={args.k}, d={args.d}, {args.iters} Lloyd iterations, best of {args.repeats}')
  _common.print_header(['stack', 'seeding', 'seeding s', 'Lloyd s', 'seeding share', 'final error / ours'])
  for stack, label, seed_s, lloyd_s, ratio in rows:
    print(f'| {stack} | {label} | {seed_s:.2f} | {lloyd_s:.2f} | {seed_s / (seed_s + lloyd_s):.0%} | {ratio:.3f} |')


if __name__ == '__main__':
  main()
