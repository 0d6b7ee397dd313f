r"""The FID's matrix square root: two symmetric eigendecompositions (metrics.frechet_distance's default) vs
ADM's scipy.linalg.sqrtm of the covariance product (sqrt='adm'), at the evaluation's sizes.

  .venv/bin/python -m benchmarks.fid_sqrt                        # pool_3 (2048-d) and spatial (2023-d)
  .venv/bin/python -m benchmarks.fid_sqrt --dims 2048 --samples 5000 --repeats 1

Features are heavy-tailed (Student t, 5 degrees of freedom) with log-normal scales, as Inception's are far from
white; the two sets differ in mean and scale. Both sides get the same float64 covariances in this process;
times are the best of --repeats (numpy/scipy on all cores), the FID values and their relative difference.
"""

import os
import time
import warnings

import numpy as np

from benchmarks import _common
from dpq_jax.evaluate import metrics


def features(dim: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  scale = np.exp(rng.normal(size=dim))
  f1 = rng.standard_t(5, size=(samples, dim)) * scale
  f2 = (rng.standard_t(5, size=(samples, dim)) + 0.3) * scale * rng.uniform(0.8, 1.2, dim)
  return f1, f2


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--dims', default='2048,2023', help='feature dimensions (comma list)')
  parser.add_argument('--samples', type=_common.integer(2), default=10_000)
  parser.add_argument('--repeats', type=_common.integer(1), default=2)
  args = parser.parse_args(argv)
  try:
    dims = [int(d) for d in args.dims.split(',') if d]
  except ValueError:
    parser.error(f'argument --dims: expected a comma list of integers, got {args.dims!r}')
  print(f'{_common.platform()}, load average {os.getloadavg()[0]:.1f}; {args.samples} samples per set\n')
  _common.print_header(['dim', 'eigh s', 'adm sqrtm s', 'speed-up', 'FID eigh', 'FID adm', 'rel. difference'])
  for dim in dims:
    stats = [*metrics.gaussian_statistics(features(dim, args.samples, dim)[0]),
             *metrics.gaussian_statistics(features(dim, args.samples, dim)[1])]  # fmt: skip
    best = {}
    for sqrt in ('eigh', 'adm'):
      best[sqrt] = float('inf')
      for _ in range(args.repeats):
        start = time.perf_counter()
        with warnings.catch_warnings():
          warnings.simplefilter('ignore')
          value = metrics.frechet_distance(*stats, sqrt=sqrt)
        best[sqrt] = min(best[sqrt], time.perf_counter() - start)
      best[sqrt + ' fid'] = value
    rel = abs(best['eigh fid'] - best['adm fid']) / abs(best['adm fid'])
    print(
      f'| {dim} | {best["eigh"]:.2f} | {best["adm"]:.2f} | {best["adm"] / best["eigh"]:.0f}x | '
      f'{best["eigh fid"]:.6f} | {best["adm fid"]:.6f} | {rel:.1e} |'
    )


if __name__ == '__main__':
  main()
