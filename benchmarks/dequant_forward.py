r"""Forward of a quantized DiT vs the full-precision forward, same batch: dequantize on the fly or once.

  .venv/bin/python -m benchmarks.dequant_forward                     # DiT-S/2, batch 8, PQ K=256 d=8
  .venv/bin/python -m benchmarks.dequant_forward --model DiT-B/4 --batch 16 --k 16 --d 4

Three jitted forwards of the same DiT module code on the same inputs (latents 32x32, t and y varied):
  fp          the full-precision model (nn.Dense),
  on the fly  PQDense: W_hat = codebooks[codes] gathered inside the jitted forward at every call,
  at load     the plain DiT on weights dequantized once (`config.quant.dequantize='load'`).
Times are the best of --repeats calls, interleaved so machine noise hits all three alike; the
ratio to fp is what matters (target for on the fly: <= 1.15x). Also the max relative difference
between the on-the-fly and at-load outputs (they compute the same function).
"""

import jax
import numpy as np

from benchmarks import _common
from dpq_jax.models import dit
from dpq_jax.quant import layers, surgery


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--model', type=_common.dit_name, default='DiT-S/2')
  parser.add_argument('--input-size', type=_common.integer(1), default=32)
  parser.add_argument('--batch', type=_common.integer(1), default=8)
  parser.add_argument('--k', type=_common.integer(1), default=256)
  parser.add_argument('--d', type=_common.integer(1), default=8)
  parser.add_argument('--method', default='pq', choices=('pq', 'vq'))
  parser.add_argument(
    '--iters', type=_common.integer(0), default=5, help='k-means iterations (speed does not depend on them)'
  )
  parser.add_argument('--repeats', type=_common.integer(1), default=10)
  args = parser.parse_args(argv)

  fp_model = dit.create_model(args.model, input_size=args.input_size)
  params = _common.random_dit_params(fp_model)
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
  calls = {name: lambda fn=fn, v=v: fn(v, x, t, y).block_until_ready() for name, (fn, v) in cases.items()}
  best = _common.interleaved_best(calls, args.repeats)
  diff = np.abs(outs['on the fly'] - outs['at load']).max() / np.abs(outs['at load']).max()

  print(f'\n{_common.platform()}, {args.model}, latent {args.input_size}, batch {args.batch}, '
        f'{args.method} K={args.k} d={args.d}, best of {args.repeats}')  # fmt: skip
  _common.print_header(['forward', 'seconds', 'ratio to fp'])
  for name in cases:
    print(f'| {name} | {best[name]:.4f} | {best[name] / best["fp"]:.3f} |')
  print(f'\nmax relative difference on the fly vs at load: {diff:.2e}')


if __name__ == '__main__':
  main()
