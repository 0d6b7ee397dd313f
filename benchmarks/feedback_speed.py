r"""What error feedback across positions (quant/feedback.py) costs against the per-position fit it replaces.

  .venv/bin/python -m benchmarks.feedback_speed                  # the digits demo's layer shapes
  .venv/bin/python -m benchmarks.feedback_speed --model DiT-XL/2 --layers mlp/fc2

For each layer shape of one block (random heavy-tailed kernel; inputs correlated across positions, as a modulated
LayerNorm's or adaLN's are, giving H [in, in]), in one process and interleaved so machine noise hits all alike:
  per-position  pq.fit with the metric of H's diagonal blocks (every position's k-means batched in one call)
  feedback g=G  feedback.quantize, positions in groups of G (their codebooks fitted together), lazy batches of
                feedback.BLOCK_ROWS rows
  vq fixed      feedback.quantize assigning a given shared codebook with feedback (what the VQ rows run)
  U             feedback.inverse_factor alone (one Cholesky + one triangular inverse), part of every feedback call
cold s: the first call (compiles included); warm s: the best of --repeats later calls. Ratios: warm, to per-position.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from benchmarks import _common

DEMO_BLOCK_LAYERS = {  # DiT-2x640x10/4: (C_out, C_in)
  'attn/qkv': (1920, 640),
  'attn/proj': (640, 640),
  'mlp/fc1': (2560, 640),
  'mlp/fc2': (640, 2560),
  'adaLN_modulation': (3840, 640),
}


def _hessian(rng: np.random.Generator, in_features: int, tokens: int = 4096) -> np.ndarray:
  common = rng.standard_normal((tokens, 8)) @ rng.standard_normal((8, in_features))
  x = 0.8 * common + rng.standard_normal((tokens, in_features)) * np.geomspace(0.1, 2.0, in_features)
  return (x.T @ x).astype(np.float32)


def main() -> None:
  p = _common.parser(__doc__)
  p.add_argument('--model', default='digits', choices=('digits', 'DiT-XL/2'))
  p.add_argument('--layers', type=_common.subset(tuple(DEMO_BLOCK_LAYERS)), default=list(DEMO_BLOCK_LAYERS))
  p.add_argument('--k', type=_common.integer(2), default=256)
  p.add_argument('--d', type=_common.integer(1), default=8)
  p.add_argument('--iters', type=_common.integer(1), default=25)
  p.add_argument('--repeats', type=_common.integer(1), default=2)
  args = p.parse_args()

  from dpq_jax.quant import feedback, metric, pq

  shapes = DEMO_BLOCK_LAYERS if args.model == 'digits' else _common.DIT_XL_BLOCK_LAYERS
  rng = np.random.default_rng(0)
  key = jax.random.key(0)
  print(f'{_common.platform()}; {args.model}, PQ K={args.k} d={args.d}, {args.iters} iterations')
  columns = ['layer [in, out]', 'what', 'cold s', 'warm s', 'x per-position']
  _common.print_header(columns)
  for name in args.layers:
    c_out, c_in = shapes[name]
    kernel = _common.heavy_tailed(rng, (c_in, c_out))
    h = _hessian(rng, c_in)
    zeros = np.zeros((c_in // args.d, args.k, args.d), np.float32)
    shared = rng.standard_normal((1, args.k, args.d)).astype(np.float32) * 0.02
    u = metric.factor(feedback.blocks(h, args.d), 0.01)
    spec = pq.CodebookSpec(args.k, args.d)
    calls = {
      'per-position': lambda: pq.fit(kernel, spec, key, iters=args.iters, u=u)[1],
      'feedback g=1': lambda: feedback.quantize(kernel, h, zeros, key, iters=args.iters, group=1)[1],
      'feedback g=8': lambda: feedback.quantize(kernel, h, zeros, key, iters=args.iters, group=8)[1],
      'vq fixed': lambda: feedback.quantize(kernel, h, shared, key, fit='fixed', group=1)[1],
      'U': lambda: feedback.inverse_factor(h, 0.01),
    }
    calls = {n: (lambda f=f: jax.block_until_ready(f())) for n, f in calls.items()}
    cold = {}
    for what, fn in calls.items():
      start = time.perf_counter()
      fn()
      cold[what] = time.perf_counter() - start
    warm = _common.interleaved_best(calls, args.repeats)
    for what in calls:
      ratio = warm[what] / warm['per-position']
      print(f'| {name} [{c_in}, {c_out}] | {what} | {cold[what]:.2f} | {warm[what]:.2f} | {ratio:.2f} |', flush=True)


if __name__ == '__main__':
  main()
