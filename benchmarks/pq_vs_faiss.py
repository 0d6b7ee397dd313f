r"""Our k-means (dpq_jax.quant.kmeans) vs faiss-cpu on DiT-XL/2 layer shapes: relative MSE and wall time.

  .venv/bin/python -m benchmarks.pq_vs_faiss                                  # full table
  .venv/bin/python -m benchmarks.pq_vs_faiss --layers qkv,proj --settings pq256x8 --iters 10

Weights are random with realistic heavy tails (student-t df=4 x 0.02), PyTorch layout
C_out x C_in; sub-vectors are cut along C_in. Settings (equal K, d and iterations on both sides):
  pq16x4   PQ, K=16,  d=4: one codebook per sub-vector position (C_in/4 problems of C_out points)
  pq256x8  PQ, K=256, d=8: C_in/8 problems of C_out points
  vq256x4  VQ, K=256, d=4: one codebook for the layer over all C_out*C_in/4 sub-vectors
faiss: ProductQuantizer(C_in, M, nbits) train + compute_codes + decode for PQ; Kmeans + search for
VQ; seeds are random points. Both sides run Lloyd on every point (faiss's max_points_per_centroid
raised so it does not subsample). Ours: compile time (lower + compile, paid once per shape) apart
from run time (greedy k-means++ seeding, on a 64K-point subset for VQ, Lloyd, final assignment and
decode). Both run in this process on all CPU cores; times are the best
of --repeats runs (the pipeline compiles a shape once and runs it for all 28 blocks).
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from dpq_jax.quant import kmeans as kmeans_lib

# Short names for --layers: 'qkv', 'proj', 'fc1', 'fc2', 'adaLN' -> (C_out, C_in).
LAYERS = {path.split('/')[-1].removesuffix('_modulation'): shape for path, shape in _common.DIT_XL_BLOCK_LAYERS.items()}
SETTINGS = {  # name -> (label, codebook_size, subvector_dim, shared codebook)
  'pq16x4': ('PQ K=16 d=4', 16, 4, False),
  'pq256x8': ('PQ K=256 d=8', 256, 8, False),
  'vq256x4': ('VQ K=256 d=4', 256, 4, True),
}


def rel_mse(w: np.ndarray, approx: np.ndarray) -> float:
  return float(np.sum((approx.astype(np.float64) - w) ** 2) / np.sum(w.astype(np.float64) ** 2))


def ours(w: np.ndarray, codebook_size: int, subvector_dim: int, shared: bool, iters: int, seed: int, repeats: int):
  """Returns (W_hat, compile seconds, best run seconds)."""
  c_out, c_in = w.shape
  sub = w.reshape(c_out, c_in // subvector_dim, subvector_dim)  # [C_out, num_subvectors, subvector_dim]
  x = sub.reshape(1, -1, subvector_dim) if shared else sub.transpose(1, 0, 2)  # [num_problems, num_points, d]
  x = jax.device_put(x)
  key = jax.random.key(seed)

  def fit_and_decode(x, key):
    result = kmeans_lib.kmeans(x, codebook_size, key, iters=iters)
    return jnp.take_along_axis(result.codebooks, result.codes[..., None], axis=1)  # [num_problems, num_points, d]

  start = time.perf_counter()
  compiled = jax.jit(fit_and_decode).lower(x, key).compile()
  compile_s = time.perf_counter() - start
  decoded, run_s = _common.best_of(lambda: np.asarray(compiled(x, key)), repeats)
  decoded = decoded.reshape(c_out, c_in) if shared else decoded.transpose(1, 0, 2).reshape(c_out, c_in)
  return decoded, compile_s, run_s


def theirs(w: np.ndarray, codebook_size: int, subvector_dim: int, shared: bool, iters: int, seed: int, repeats: int):
  """Returns (W_hat, best seconds) with faiss-cpu."""
  return _common.best_of(lambda: _faiss_fit_decode(w, codebook_size, subvector_dim, shared, iters, seed), repeats)


def _faiss_fit_decode(w: np.ndarray, codebook_size: int, subvector_dim: int, shared: bool, iters: int, seed: int):
  import faiss

  c_out, c_in = w.shape
  nbits = codebook_size.bit_length() - 1
  if shared:
    x = np.ascontiguousarray(w.reshape(-1, subvector_dim))
    km = faiss.Kmeans(subvector_dim, codebook_size, niter=iters, seed=seed, max_points_per_centroid=x.shape[0])
    km.train(x)
    _, codes = km.index.search(x, 1)
    decoded = km.centroids[codes[:, 0]].reshape(c_out, c_in)
  else:
    pq = faiss.ProductQuantizer(c_in, c_in // subvector_dim, nbits)
    pq.cp.niter = iters
    pq.cp.seed = seed
    pq.cp.max_points_per_centroid = c_out  # train on every row, no subsampling
    pq.cp.min_points_per_centroid = 1  # only silences the "please provide more points" warning
    pq.train(w)
    decoded = pq.decode(pq.compute_codes(w))
  return decoded


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument(
    '--layers', type=_common.subset(LAYERS), default=','.join(LAYERS), help=f'comma-separated subset of {list(LAYERS)}'
  )
  parser.add_argument(
    '--settings',
    type=_common.subset(SETTINGS),
    default=','.join(SETTINGS),
    help=f'comma-separated subset of {list(SETTINGS)}',
  )
  parser.add_argument('--iters', type=_common.integer(0), default=25, help='Lloyd iterations for both')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--repeats', type=_common.integer(1), default=3, help='runs per side; the best time is reported')
  args = parser.parse_args(argv)
  layers, settings = args.layers, args.settings
  try:
    import faiss
  except ImportError:
    sys.exit('faiss-cpu is not installed: .venv/bin/pip install -e ".[dev]"')

  print(f'jax {jax.__version__} ({jax.devices()[0].platform}), faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), '
        f'{os.cpu_count()} CPUs, {args.iters} iterations, all points used on both sides, best of {args.repeats} runs\n')  # fmt: skip
  _common.print_header(['layer', 'C_out x C_in', 'setting', 'problems x points', 'rel MSE ours', 'rel MSE faiss',
                        'MSE ratio', 'ours compile s', 'ours run s', 'faiss s', 'time ratio'])  # fmt: skip
  totals = {}
  for setting in settings:
    label, codebook_size, subvector_dim, shared = SETTINGS[setting]
    for layer in layers:
      c_out, c_in = LAYERS[layer]
      w = _common.heavy_tailed(np.random.default_rng(args.seed + list(LAYERS).index(layer)), (c_out, c_in))
      mine, compile_s, run_s = ours(w, codebook_size, subvector_dim, shared, args.iters, args.seed, args.repeats)
      ref, faiss_s = theirs(w, codebook_size, subvector_dim, shared, args.iters, args.seed, args.repeats)
      err, err_ref = rel_mse(w, mine), rel_mse(w, ref)
      problems = f'1 x {c_out * c_in // subvector_dim}' if shared else f'{c_in // subvector_dim} x {c_out}'
      print(f'| {layer} | {c_out}x{c_in} | {label} | {problems} | {err:.4f} | {err_ref:.4f} | {err / err_ref:.3f} | '
            f'{compile_s:.2f} | {run_s:.2f} | {faiss_s:.2f} | {run_s / faiss_s:.2f} |', flush=True)  # fmt: skip
      t = totals.setdefault(label, [0.0, 0.0, 0.0])
      t[0] += compile_s
      t[1] += run_s
      t[2] += faiss_s
  for label, (compile_s, run_s, faiss_s) in totals.items():
    print(f'| **total** | | {label} | | | | | {compile_s:.2f} | {run_s:.2f} | {faiss_s:.2f} | {run_s / faiss_s:.2f} |')


if __name__ == '__main__':
  main()
