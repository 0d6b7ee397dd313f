r"""Quantize the whole DiT-XL/2 (the 140 block layers) as the `quantize` stage does: time and memory.

  .venv/bin/python -m benchmarks.quantize_xl                      # PQ K=256 d=8 (1-bit indices)
  .venv/bin/python -m benchmarks.quantize_xl --method pq --k 16 --d 4 --iters 25
  .venv/bin/python -m benchmarks.quantize_xl --method vq --k 256 --d 8
  .venv/bin/python -m benchmarks.quantize_xl --blocks 2          # a quick look at the first blocks

Weights are random with realistic heavy tails (student-t df=4 x 0.02, benchmarks/_common.py)
in every Dense kernel of DiT-XL/2 (675M parameters); the quantizer is `surgery.quantize_params`,
the function the stage calls, with the default layer rules (all five linear layers per block).
Prints wall time (compiles included: one per distinct layer shape), the process's peak
resident memory (ru_maxrss; it includes the 2.7 GB fp32 model itself), the CPU seconds of all
threads (on a busy machine wall time stretches; CPU time barely does), and the mean weight
relative MSE. Targets from the PQ engine issue: < 10 minutes and < 8 GiB on a 2-core CPU.
"""

import resource
import time

import jax
import numpy as np

from benchmarks import _common
from dpq_jax.quant import surgery


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--model', type=_common.dit_name, default='DiT-XL/2')
  parser.add_argument('--method', default='pq', choices=surgery.METHODS)
  parser.add_argument('--k', type=_common.integer(1), default=256)
  parser.add_argument('--d', type=_common.integer(1), default=8)
  parser.add_argument('--bits', type=_common.integer(1, 16), default=1, help='rtn only')
  parser.add_argument('--iters', type=_common.integer(0), default=25)
  parser.add_argument('--blocks', type=_common.integer(0), default=0, help='quantize only the first N blocks (0 = all)')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)

  start = time.perf_counter()
  params = _common.heavy_tailed_params(args.model, 32, args.seed)
  make_s = time.perf_counter() - start
  base_rss = _common.peak_rss_bytes() / 2**30
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
  print(f'\n{_common.platform()}; model params made in {make_s:.1f} s')
  _common.print_header(['model', 'setting', 'k-means iters', 'layers', 'weights', 'wall s', 'CPU s (all threads)',
                        'wall min', 'peak RSS GiB', 'RSS before GiB', 'mean rel MSE'])  # fmt: skip
  print(f'| {args.model} | {setting} | {args.iters} | {len(rows)} | {num_weights / 1e6:.0f}M | {seconds:.1f} | {cpu_s:.0f} | '
        f'{seconds / 60:.2f} | {_common.peak_rss_bytes() / 2**30:.2f} | {base_rss:.2f} | {mean_mse:.4f} |')  # fmt: skip


if __name__ == '__main__':
  main()
