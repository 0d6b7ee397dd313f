r"""Forward of a quantized DiT vs the full-precision forward, same batch: dequantize on the fly or once.

  .venv/bin/python benchmarks/dequant_forward.py                     # DiT-S/2, batch 8, PQ K=256 d=8
  .venv/bin/python benchmarks/dequant_forward.py --model DiT-B/4 --batch 16 --k 16 --d 4

Three jitted forwards of the same DiT module code on the same inputs (latents 32x32, t and y varied):
  fp          the full-precision model (nn.Dense),
  on the fly  PQDense: W_hat = codebooks[codes] gathered inside the jitted forward at every call,
  at load     the plain DiT on weights dequantized once (`config.quant.dequantize='load'`).
Times are the best of --repeats calls, interleaved so machine noise hits all three alike; the
ratio to fp is what matters (target for on the fly: <= 1.15x). Also the max relative difference
between the on-the-fly and at-load outputs (they compute the same function).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dpq_jax.models import dit  # noqa: E402
from dpq_jax.models import load as load_lib  # noqa: E402
from dpq_jax.quant import layers, surgery  # noqa: E402


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='DiT-S/2')
  parser.add_argument('--input-size', type=int, default=32)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--k', type=int, default=256)
  parser.add_argument('--d', type=int, default=8)
  parser.add_argument('--method', default='pq', choices=('pq', 'vq'))
  parser.add_argument('--iters', type=int, default=5, help='k-means iterations (speed does not depend on them)')
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args(argv)
  if args.batch < 1 or args.repeats < 1:
    parser.error(f'--batch={args.batch} --repeats={args.repeats}: expected >= 1')

  fp_model = dit.create_model(args.model, input_size=args.input_size)
  params = jax.jit(lambda k: dit.init_params(fp_model, k))(jax.random.key(0))
  params = load_lib.randomize_zero_init(params, jax.random.key(1))
  rules = surgery.default_rules(args.method, args.k, args.d)
  q = surgery.quantize_params(params, rules, jax.random.key(2), method=args.method, iters=args.iters)
  q_model = dit.create_model(args.model, input_size=args.input_size, dense=layers.dense_factory(rules))
  loaded = q.dense_params()

  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.batch, args.input_size, args.input_size, 4)).astype(np.float32)
  t = rng.integers(0, 1000, args.batch)
  y = rng.integers(0, 1001, args.batch)
  fwd_fp = jax.jit(lambda v, x, t, y: fp_model.apply(v, x, t, y))
  fwd_q = jax.jit(lambda v, x, t, y: q_model.apply(v, x, t, y))
  cases = {
    'fp': (fwd_fp, {'params': params}),
    'on the fly': (fwd_q, q.variables()),
    'at load': (fwd_fp, {'params': loaded}),
  }
  outs = {name: np.asarray(fn(v, x, t, y)) for name, (fn, v) in cases.items()}  # compile + warm up
  best = dict.fromkeys(cases, float('inf'))
  for _ in range(args.repeats):
    for name, (fn, v) in cases.items():
      start = time.perf_counter()
      fn(v, x, t, y).block_until_ready()
      best[name] = min(best[name], time.perf_counter() - start)
  diff = np.abs(outs['on the fly'] - outs['at load']).max() / np.abs(outs['at load']).max()

  print(f'\njax {jax.__version__} ({jax.devices()[0].platform}), {os.cpu_count()} CPUs, {args.model}, '
        f'latent {args.input_size}, batch {args.batch}, {args.method} K={args.k} d={args.d}, best of {args.repeats}')  # fmt: skip
  print('| forward | seconds | ratio to fp |')
  print('|---|---|---|')
  for name in cases:
    print(f'| {name} | {best[name]:.4f} | {best[name] / best["fp"]:.3f} |')
  print(f'\nmax relative difference on the fly vs at load: {diff:.2e}')


if __name__ == '__main__':
  main()
