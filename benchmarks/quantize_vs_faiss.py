r"""The `quantize` stage end to end (compiles included) against faiss-cpu on the same weights: wall, compile, CPU.

  .venv/bin/python -m benchmarks.quantize_vs_faiss                          # DiT-S/2, PQ K=256 d=8, 25 iterations
  .venv/bin/python -m benchmarks.quantize_vs_faiss --model DiT-XL/2 --blocks 4
  .venv/bin/python -m benchmarks.quantize_vs_faiss --no-cache               # no persistent compilation cache

Weights are random and heavy-tailed (benchmarks/_common.py) in every Dense kernel of the model; the block layers
of the default pattern are quantized (--blocks N: only the first N blocks). Each row runs in a fresh process:
  faiss   ProductQuantizer train + compute_codes + decode per layer (Lloyd on every row, as pq_vs_faiss.py)
  cold    surgery.quantize_params as the stage calls it (fp16 codebooks, channel scales), an empty persistent
          compilation cache (a fresh directory): every program is compiled
  rerun   the same in another fresh process over the cache the cold row filled: what a rerun or a later stage
          pays (--no-cache: no cache, so a second cold run)
compile s is XLA's tracing, lowering and compilation (or cache retrieval) summed over every program the row ran
(jax.monitoring's duration events); run s = wall - compile. Ratios are to faiss's wall time, measured in the same
invocation (the machine is shared: compare ratios, not seconds, across runs).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from benchmarks import _common

COMPILE_EVENTS = (
  '/jax/core/compile/jaxpr_trace_duration',
  '/jax/core/compile/jaxpr_to_mlir_module_duration',
  '/jax/core/compile/backend_compile_duration',
)


def targets(args) -> list[tuple[str, np.ndarray]]:
  """(module path, kernel [C_in, C_out]) of every layer the stage would quantize, in its order."""
  from dpq_jax.quant import surgery

  params = _common.heavy_tailed_params(args.model, 32, args.seed)
  rules = rules_of(args)
  return [('/'.join(p), k) for p, k in surgery.module_kernels(params) if rules.spec_for('/'.join(p)) is not None]


def rules_of(args):
  from dpq_jax.quant import layers, surgery

  pattern = layers.DEFAULT_PATTERN
  if args.blocks:
    pattern = pattern.replace(r'\d+', '(' + '|'.join(map(str, range(args.blocks))) + ')')
  return surgery.default_rules(args.method, args.k, args.d, (), pattern)


def ours(args, cache_dir: str | None) -> dict:
  """One quantize_params run in this (fresh) process; cache_dir None: no persistent cache."""
  import jax
  from jax import monitoring

  from dpq_jax import compile_cache
  from dpq_jax.quant import surgery

  compile_cache.configure(cache_dir)
  compile_s = [0.0]

  def listen(event: str, seconds: float, **_) -> None:
    if event in COMPILE_EVENTS:
      compile_s[0] += seconds

  monitoring.register_event_duration_secs_listener(listen)
  params = _common.heavy_tailed_params(args.model, 32, args.seed)
  cpu, start = time.process_time(), time.perf_counter()
  q = surgery.quantize_params(
    params, rules_of(args), jax.random.key(args.seed), method=args.method, iters=args.iters, channel_scale=True,
    progress=False,
  )  # fmt: skip
  jax.block_until_ready(q)
  wall = time.perf_counter() - start
  entries = len(os.listdir(cache_dir)) if cache_dir else 0
  rel = float(np.mean([r['rel_mse'] for r in q.rows]))
  return {'wall': wall, 'compile': compile_s[0], 'cpu': time.process_time() - cpu, 'rel_mse': rel, 'entries': entries}


def faiss_side(args) -> dict:
  """faiss-cpu on the same kernels: train, encode, decode each layer."""
  import faiss

  layers = targets(args)
  cpu, start = time.process_time(), time.perf_counter()
  errs = []
  for _, kernel in layers:
    w = np.ascontiguousarray(kernel.T)  # [C_out, C_in]: sub-vectors cut along C_in, one codebook per position
    c_out, c_in = w.shape
    if args.method == 'vq':
      x = np.ascontiguousarray(w.reshape(-1, args.d))
      km = faiss.Kmeans(args.d, args.k, niter=args.iters, seed=args.seed, max_points_per_centroid=x.shape[0])
      km.train(x)
      decoded = km.centroids[km.index.search(x, 1)[1][:, 0]].reshape(c_out, c_in)
    else:
      pq = faiss.ProductQuantizer(c_in, c_in // args.d, args.k.bit_length() - 1)
      pq.cp.niter, pq.cp.seed = args.iters, args.seed
      pq.cp.max_points_per_centroid, pq.cp.min_points_per_centroid = c_out, 1  # every row, no warning
      pq.train(w)
      decoded = pq.decode(pq.compute_codes(w))
    errs.append(float(np.sum((decoded.astype(np.float64) - w) ** 2) / np.sum(w.astype(np.float64) ** 2)))
  wall = time.perf_counter() - start
  return {'wall': wall, 'compile': 0.0, 'cpu': time.process_time() - cpu, 'rel_mse': float(np.mean(errs))}


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--model', type=_common.dit_name, default='DiT-S/2')
  parser.add_argument('--method', default='pq', choices=('pq', 'vq'))
  parser.add_argument('--k', type=_common.integer(2, 2**16), default=256)
  parser.add_argument('--d', type=_common.integer(1), default=8)
  parser.add_argument('--iters', type=_common.integer(0), default=25)
  parser.add_argument('--blocks', type=_common.integer(0), default=0, help='only the first N blocks (0 = all)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--no-cache', action='store_true', help='no persistent compilation cache in either run')
  args = parser.parse_args(argv)
  if args.k & (args.k - 1):
    parser.error(f'--k {args.k}: expected a power of two (faiss codes have whole bits)')

  with tempfile.TemporaryDirectory(prefix='dpq_jax_bench_cache_') as cache:
    cache_dir = None if args.no_cache else cache
    names = ('ours, cold cache', 'ours, rerun (cache filled)') if cache_dir else ('ours, no cache', 'ours, again')
    rows = {'faiss': _common.in_child(faiss_side, args)}
    for name in names:
      rows[name] = _common.in_child(ours, args, cache_dir)
  layers = len(targets(args))
  print(f'\n{_common.platform()}; {args.model}, {layers} layers, {args.method} K={args.k} d={args.d}, '
        f'{args.iters} iterations; load average {os.getloadavg()[0]:.1f}')  # fmt: skip
  _common.print_header(['run', 'wall s', 'compile s', 'run s', 'CPU s', 'wall / faiss', 'mean rel MSE',
                        'rel MSE / faiss', 'cache entries'])  # fmt: skip
  ref = rows['faiss']
  for name, r in rows.items():
    print(f'| {name} | {r["wall"]:.1f} | {r["compile"]:.1f} | {r["wall"] - r["compile"]:.1f} | {r["cpu"]:.1f} | '
          f'{r["wall"] / ref["wall"]:.2f} | {r["rel_mse"]:.4f} | {r["rel_mse"] / ref["rel_mse"]:.3f} | '
          f'{r.get("entries", "-")} |')  # fmt: skip


if __name__ == '__main__':
  main()
