r"""Codebook removal paths by importance vs by merge cost (greedy Ward): their time on DiT-XL/2 codebooks.

  .venv/bin/python -m benchmarks.compress_order                       # 1024 and 4096 codebooks, chunk 1024
  .venv/bin/python -m benchmarks.compress_order --codebooks 1024 --chunks 256,1024 --repeats 3

Atoms: --codebooks PQ codebooks of K=--k codewords of d=--d values, in the mix of one DiT-XL/2 block (of its
1152 codebooks, 576 serve 1152 points (fc2), and 144 each 1152 (proj), 3456 (qkv), 4608 (fc1) and 6912 points
(adaLN_modulation)), shuffled. Each codebook's points are clustered (64 centres, student-t df=4 x 0.02 like trained
weights, plus normal noise x 0.004), its codewords K of its points at random, every point assigned to its
nearest codeword (one assignment as in benchmarks/compress_budget.py (b): a k-means would cost more than
what is timed), and the atoms (usage W, centroid M) are those of that assignment.
Timed: compress.paths_of_atoms on all of them, merge on, order='importance' (lowest usage first) and
order='cost' (greedy Ward agglomeration, dpq_jax/quant/ward.py), --chunks codebooks per call. Compile time
(the first call on one chunk less the second) apart from run time (best of --repeats, the orders interleaved),
and both extrapolated to DiT-XL/2's 32256 codebooks (28 blocks x 1152): compile once + run time per codebook
x 32256. Also each order's estimated distortion, the summed step costs down to --live codewords per codebook,
over importance's.
"""

import argparse
import os
import time

import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from dpq_jax.quant import compress, kmeans

XL_CODEBOOKS = _common.DIT_XL_BLOCKS * 1152  # PQ d=8: sum of C_in / 8 over a block's 5 layers, x 28 blocks
BLOCK_MIX = ((576, 1152), (144, 1152), (144, 3456), (144, 4608), (144, 6912))  # (codebooks, points) per block


def counts(text: str) -> list[int]:
  """argparse type: comma-separated integers >= 1."""
  try:
    out = [int(s) for s in text.split(',')]
  except ValueError:
    out = []
  if not out or min(out) < 1:
    raise argparse.ArgumentTypeError(f'expected comma-separated integers >= 1, got {text!r}')
  return out


def block_atoms(num: int, k: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(W [num, k], M [num, k, d]): atoms of `num` codebooks in DiT-XL/2's block mix (the module docstring)."""
  rng = np.random.default_rng(seed)
  sizes = np.repeat([p for _, p in BLOCK_MIX], [n for n, _ in BLOCK_MIX])  # [1152] points per codebook
  sizes = rng.permutation(np.resize(sizes, num))  # any first n of them: about the block's mix
  w_all, m_all = np.zeros((num, k), np.float32), np.zeros((num, k, d), np.float32)
  for points in np.unique(sizes):
    where = np.nonzero(sizes == points)[0]
    for part in np.array_split(where, -(-len(where) // 256)):
      centres = _common.heavy_tailed(rng, (len(part), 64, d))  # [b, 64, d]
      pick = rng.integers(0, 64, (len(part), points))
      x = centres[np.arange(len(part))[:, None], pick] + 0.004 * rng.standard_normal((len(part), points, d))
      x = jnp.asarray(x, jnp.float32)  # [b, points, d]
      codebooks = jnp.take_along_axis(x, jnp.asarray(rng.integers(0, points, (len(part), k)))[..., None], axis=1)
      w, m = compress.atoms(x, codebooks, kmeans.assign(x, codebooks))
      w_all[part], m_all[part] = np.asarray(w), np.asarray(m)
  return w_all, m_all


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--codebooks', type=counts, default=[1024, 4096], help='codebook counts timed')
  parser.add_argument('--chunks', type=counts, default=[1024], help='codebooks per call (paths_of_atoms chunk)')
  parser.add_argument('--k', type=_common.integer(2), default=256, help='codewords per codebook')
  parser.add_argument('--d', type=_common.integer(1), default=8, help='sub-vector length')
  parser.add_argument('--live', type=_common.integer(1), default=16, help="K' of the distortion column")
  parser.add_argument('--repeats', type=_common.integer(1), default=2)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  if args.live > args.k:
    parser.error(f'argument --live: expected <= --k = {args.k}, got {args.live}')
  w, m = block_atoms(max(args.codebooks), args.k, args.d, args.seed)
  load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  print(f'{_common.platform()}, load average {load}\n')
  print(f'Atoms: K={args.k}, d={args.d}, DiT-XL/2 block mix; {np.mean(w == 0):.1%} of the codewords unused, '
        f'mean usage {w.mean():.1f}\n')  # fmt: skip
  _common.print_header(['order', 'chunk', 'codebooks', 'compile s', 'run s', 'ms / codebook',
                        f'DiT-XL/2 ({XL_CODEBOOKS} codebooks) s, extrapolated', f"distortion to K'={args.live}"])  # fmt: skip
  orders = compress.ORDERS
  removals = args.k - args.live
  for chunk in args.chunks:
    compile_s = {}
    for order in orders:
      times = []
      for _ in range(2):
        start = time.perf_counter()
        compress.paths_of_atoms(w[:chunk], m[:chunk], order=order, chunk=chunk)
        times.append(time.perf_counter() - start)
      compile_s[order] = times[0] - times[1]
    for num in args.codebooks:
      wn, mn = w[:num], m[:num]
      distortion = {
        o: float(np.sum(compress.paths_of_atoms(wn, mn, order=o, chunk=chunk).cost[:, :removals], dtype=np.float64))
        for o in orders
      }
      calls = {o: lambda o=o: compress.paths_of_atoms(wn, mn, order=o, chunk=chunk) for o in orders}
      best = _common.interleaved_best(calls, args.repeats)
      for o in orders:
        per = best[o] / num
        print(f'| {o} | {chunk} | {num} | {compile_s[o]:.1f} | {best[o]:.2f} | {1e3 * per:.2f} | '
              f'{compile_s[o] + per * XL_CODEBOOKS:.0f} | {distortion[o] / distortion[orders[0]]:.3f} |')  # fmt: skip
  print(f'\nDistortion: the summed step costs of the first {removals} removals of every codebook, relative to '
        f"order='{orders[0]}' (lower is better).")  # fmt: skip


if __name__ == '__main__':
  main()
