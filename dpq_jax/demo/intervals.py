"""Bootstrap 95% intervals for the demo's per-sample metrics, and the rule the reading uses to call a difference.

Percentile bootstrap (Efron): the statistic recomputed on `num_resamples` resamples of the n samples drawn with
replacement; the interval is the (2.5%, 97.5%) quantiles of those values. Deterministic in `seed`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

LEVEL = 0.95


def bootstrap_interval(
  statistic: Callable[[np.ndarray], float],
  n: int,
  num_resamples: int = 1000,
  seed: int = 0,
  level: float = LEVEL,
  debias: bool = False,
) -> tuple[float, float]:
  """(low, high) percentile interval of statistic(idx) over resamples idx [n] of range(n) with replacement.

  statistic takes an index array and returns the metric of those samples (e.g. lambda i: x[i].mean()), so one
  function serves means, ratios of sums and the Frechet distance alike. debias: shift the interval by the
  bootstrap's bias estimate (mean of the resampled values - statistic(all)): for the Frechet distance, whose
  resamples repeat samples and so read higher than the full set (about +1 at 500 samples in 64-d features,
  the whole percentile interval above the estimate), this centres the interval's spread on the estimate.
  """
  if n < 2 or num_resamples < 2 or not 0 < level < 1:
    raise ValueError(f'bootstrap: n={n}, num_resamples={num_resamples}, level={level}: expected n, resamples >= 2')
  rng = np.random.default_rng(seed)
  values = np.array([statistic(rng.integers(0, n, n)) for _ in range(num_resamples)], np.float64)
  lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
  if debias:
    bias = values.mean() - statistic(np.arange(n))
    lo, hi = lo - bias, hi - bias
  return float(lo), float(hi)


def excludes_zero(interval: tuple[float, float]) -> bool:
  """Whether the interval of a paired difference leaves 0 out: the rule for the `*_vs_fp` metrics."""
  return interval[0] > 0 or interval[1] < 0


def separated(a: tuple[float, float], b: tuple[float, float]) -> bool:
  """Whether two intervals do not overlap: the only case in which the reading calls a difference."""
  return a[1] < b[0] or b[1] < a[0]


class FixedReferenceFD:
  """Frechet distance of feature sets to one fixed reference set (the held-out digits), fast enough to bootstrap.

  Tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of R S1 R) with R = S2^(1/2) symmetric: one eigh per call instead
  of a general sqrtm; equal to metrics.frechet_distance up to rounding (tested).
  """

  def __init__(self, reference: np.ndarray):
    ref = np.asarray(reference, np.float64)
    self.mu = ref.mean(0)
    self.sigma = np.cov(ref, rowvar=False)
    w, v = np.linalg.eigh(self.sigma)
    self.root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S2^(1/2)
    self.trace = float(np.trace(self.sigma))

  def __call__(self, features: np.ndarray) -> float:
    f = np.asarray(features, np.float64)
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    eig = np.linalg.eigvalsh(self.root @ sigma @ self.root)
    diff = mu - self.mu
    return float(diff @ diff + np.trace(sigma) + self.trace - 2 * np.sqrt(np.clip(eig, 0, None)).sum())
