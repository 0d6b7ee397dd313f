r"""Quantize the whole DiT-XL/2 (the 140 block layers) as the `quantize` stage does: time and memory.

  .venv/bin/python benchmarks/quantize_xl.py                      # PQ K=256 d=8 (1-bit indices)
  .venv/bin/python benchmarks/quantize_xl.py --method pq --k 16 --d 4 --iters 25
  .venv/bin/python benchmarks/quantize_xl.py --method vq --k 256 --d 8
  .venv/bin/python benchmarks/quantize_xl.py --blocks 2          # a quick look at the first blocks

Weights are random with realistic heavy tails (student-t df=4 x 0.02, as benchmarks/pq_vs_faiss.py)
in every Dense kernel of DiT-XL/2 (675M parameters); the quantizer is `surgery.quantize_params`,
the function the stage calls, with the default layer rules (all five linear layers per block).
Prints wall time (compiles included: one per distinct layer shape), the process's peak
resident memory (ru_maxrss; it includes the 2.7 GB fp32 model itself), the CPU seconds of all
threads (on a busy machine wall time stretches; CPU time barely does), and the mean weight
relative MSE. Targets from the PQ engine issue: < 10 minutes and < 8 GiB on a 2-core CPU.
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dpq_jax.models import dit  # noqa: E402
from dpq_jax.quant import surgery  # noqa: E402


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def heavy_tailed_params(name: str, input_size: int, seed: int) -> dict:
  """Every leaf of the DiT's param tree; 2-D kernels student-t (df=4) x 0.02, the rest small normal."""
  model = dit.create_model(name, input_size=input_size)
  shapes = jax.eval_shape(lambda k: dit.init_params(model, k), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    if path[-1].key == 'kernel' and len(s.shape) == 2:
      return (rng.standard_t(4, s.shape) * 0.02).astype(np.float32)
    return (rng.standard_normal(s.shape) * 0.02).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='DiT-XL/2')
  parser.add_argument('--method', default='pq', choices=surgery.METHODS)
  parser.add_argument('--k', type=int, default=256)
  parser.add_argument('--d', type=int, default=8)
  parser.add_argument('--bits', type=int, default=1, help='rtn only')
  parser.add_argument('--iters', type=int, default=25)
  parser.add_argument('--blocks', type=int, default=0, help='quantize only the first N blocks (0 = all)')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  if args.blocks < 0:
    parser.error(f'--blocks={args.blocks}: expected >= 0')

  start = time.perf_counter()
  params = heavy_tailed_params(args.model, 32, args.seed)
  make_s = time.perf_counter() - start
  base_rss = peak_rss_gib()
  pattern = r'blocks_\d+/(attn/(qkv|proj)|mlp/(fc1|fc2)|adaLN_modulation)'
  if args.blocks:
    pattern = rf'blocks_({"|".join(map(str, range(args.blocks)))})/(attn/(qkv|proj)|mlp/(fc1|fc2)|adaLN_modulation)'
  rules = surgery.default_rules(args.method, args.k, args.d, (), pattern)
  start, cpu_start = time.perf_counter(), cpu_seconds()
  q = surgery.quantize_params(
    params, rules, jax.random.key(args.seed), method=args.method, iters=args.iters, rtn_bits=args.bits
  )
  jax.block_until_ready(q)
  seconds, cpu_s = time.perf_counter() - start, cpu_seconds() - cpu_start
  rows = q.rows
  num_weights = sum(r['shape'][0] * r['shape'][1] for r in rows)
  mean_mse = float(np.mean([r['rel_mse'] for r in rows]))
  setting = f'rtn {args.bits} bit' if args.method == 'rtn' else f'{args.method} K={args.k} d={args.d}'
  print(
    f'\njax {jax.__version__} ({jax.devices()[0].platform}), {os.cpu_count()} CPUs; model params made in {make_s:.1f} s'
  )
  print(
    '| model | setting | k-means iters | layers | weights | wall s | CPU s (all threads) | wall min | peak RSS GiB | RSS before GiB | mean rel MSE |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  print(f'| {args.model} | {setting} | {args.iters} | {len(rows)} | {num_weights / 1e6:.0f}M | {seconds:.1f} | {cpu_s:.0f} | '
        f'{seconds / 60:.2f} | {peak_rss_gib():.2f} | {base_rss:.2f} | {mean_mse:.4f} |')  # fmt: skip


if __name__ == '__main__':
  main()
