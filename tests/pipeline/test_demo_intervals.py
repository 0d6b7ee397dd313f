"""The demo's metrics and their bootstrap intervals against numpy/scipy references and closed forms."""

import numpy as np
import pytest
import scipy.special

from dpq_jax.demo import intervals
from dpq_jax.demo import metrics as demo_metrics
from dpq_jax.demo import rows as rows_lib
from dpq_jax.evaluate import metrics as metrics_lib


def test_bootstrap_interval_of_a_normal_mean_covers_at_the_stated_rate():
  # Mean of n normal samples: the interval covers the true mean about 95% of the time, and its width is about the
  # closed form 2 * 1.96 * sigma / sqrt(n).
  rng = np.random.default_rng(0)
  n, sigma, trials, covered, widths = 100, 2.0, 200, 0, []
  for trial in range(trials):
    x = rng.normal(3.0, sigma, n)
    lo, hi = intervals.bootstrap_interval(lambda i: x[i].mean(), n, num_resamples=400, seed=trial)
    covered += lo <= 3.0 <= hi
    widths.append(hi - lo)
  # 95% coverage: binomial sd over 200 trials is 0.015; the percentile bootstrap runs a little narrow at n=100.
  assert 0.89 <= covered / trials <= 0.99, covered / trials
  np.testing.assert_allclose(np.mean(widths), 2 * 1.96 * sigma / np.sqrt(n), rtol=0.06)


def test_bootstrap_interval_is_deterministic_and_refuses_bad_sizes():
  x = np.arange(10.0)
  a = intervals.bootstrap_interval(lambda i: x[i].mean(), 10, 50, seed=1)
  assert a == intervals.bootstrap_interval(lambda i: x[i].mean(), 10, 50, seed=1)
  with pytest.raises(ValueError, match='n=1'):
    intervals.bootstrap_interval(lambda i: 0.0, 1)


def test_separated_only_when_intervals_do_not_overlap():
  assert intervals.separated((0, 1), (1.5, 2)) and intervals.separated((1.5, 2), (0, 1))
  assert not intervals.separated((0, 1), (0.9, 2)) and not intervals.separated((0, 3), (1, 2))


def test_fixed_reference_fd_equals_the_frechet_distance():
  rng = np.random.default_rng(1)
  real = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
  gen = rng.normal(0.3, 1.2, size=(200, 16)) @ rng.normal(size=(16, 16))
  want = metrics_lib.frechet_distance(*metrics_lib.gaussian_statistics(gen), *metrics_lib.gaussian_statistics(real))
  np.testing.assert_allclose(intervals.FixedReferenceFD(real)(gen), want, rtol=1e-8)


def test_scores_against_numpy():
  rng = np.random.default_rng(2)
  n, m = 120, 50
  logits = rng.normal(size=(n, 10)) * 3
  labels = rng.integers(0, 10, n)
  feats, real = rng.normal(size=(n, 8)), rng.normal(0.2, 1.0, size=(90, 8))
  ref_eps = rng.normal(size=(m, 8, 8, 1))
  eps = ref_eps + 0.3 * rng.normal(size=ref_eps.shape)
  metrics, ci = demo_metrics.scores(feats, logits, labels, real, eps, ref_eps, num_resamples=200)
  logp = scipy.special.log_softmax(logits, axis=-1)[np.arange(n), labels]
  np.testing.assert_allclose(demo_metrics.class_logprob(logits, labels), logp, rtol=1e-12)
  np.testing.assert_allclose(metrics['class_logprob'], logp.mean(), rtol=1e-12)
  assert metrics['class_accuracy'] == np.mean(logits.argmax(-1) == labels)
  np.testing.assert_allclose(metrics['eps_rel_error'], np.linalg.norm(eps - ref_eps) / np.linalg.norm(ref_eps))
  fd = metrics_lib.frechet_distance(*metrics_lib.gaussian_statistics(feats), *metrics_lib.gaussian_statistics(real))
  assert metrics['fd'] == fd
  for key, (lo, hi) in ci.items():
    assert lo < metrics[key] < hi, (key, lo, metrics[key], hi)
  # the log-probability's interval is about the normal-theory one of a mean
  half = 1.96 * logp.std(ddof=1) / np.sqrt(n)
  np.testing.assert_allclose(ci['class_logprob'][1] - ci['class_logprob'][0], 2 * half, rtol=0.2)


def test_verdict_calls_a_difference_only_when_intervals_separate():
  def row(lp, ci):
    return {'metrics': {'class_logprob': lp, 'fd': -lp}, 'ci95': {'class_logprob': ci, 'fd': [-ci[1], -ci[0]]}}

  a, b, c = row(-0.1, [-0.15, -0.05]), row(-0.5, [-0.6, -0.4]), row(-0.2, [-0.3, -0.1])
  assert rows_lib.verdict(a, b, 'class_logprob') == 'better' and rows_lib.verdict(b, a, 'class_logprob') == 'worse'
  assert rows_lib.verdict(a, b, 'fd') == 'better'  # lower fd is better
  assert rows_lib.verdict(a, c, 'class_logprob') == 'not resolved'


def test_debiased_fd_interval_is_centred_on_the_estimate():
  # Resampling repeats samples, which raises the Frechet distance: the plain percentile interval lies above the
  # estimate; shifted by the bootstrap bias estimate it has the same width and holds the estimate.
  rng = np.random.default_rng(3)
  a = rng.normal(size=(32, 32)) / 6
  real, gen = rng.normal(size=(300, 32)) @ a, rng.normal(0.2, 1.0, size=(400, 32)) @ a
  fd = intervals.FixedReferenceFD(real)
  plain = intervals.bootstrap_interval(lambda i: fd(gen[i]), 400, 300, seed=0)
  shifted = intervals.bootstrap_interval(lambda i: fd(gen[i]), 400, 300, seed=0, debias=True)
  estimate = fd(gen)
  assert plain[0] > estimate and shifted[0] < estimate < shifted[1]
  np.testing.assert_allclose(shifted[1] - shifted[0], plain[1] - plain[0])


def test_paired_difference_interval_covers_and_resolves_what_overlapping_intervals_cannot():
  # Two rows scored on the same draws: y = x + delta + small noise. The paired interval of mean(y - x) covers delta
  # at about the stated rate and has the closed-form width 2 * 1.96 * sd(y - x) / sqrt(n); at delta = 0.05 it
  # leaves 0 out in every trial, where the rows' own intervals (width ~0.18) overlap.
  rng = np.random.default_rng(4)
  n, delta, noise, trials = 500, 0.05, 0.1, 100
  covered = apart = overlapped = 0
  for trial in range(trials):
    x = rng.normal(0.0, 1.0, n)
    y = x + delta + rng.normal(0.0, noise, n)
    paired = intervals.bootstrap_interval(lambda i: (y[i] - x[i]).mean(), n, num_resamples=300, seed=trial)
    covered += paired[0] <= delta <= paired[1]
    apart += intervals.excludes_zero(paired)
    own = [intervals.bootstrap_interval(lambda i, v=v: v[i].mean(), n, 300, seed=trial) for v in (x, y)]
    overlapped += not intervals.separated(*own)
  assert 0.88 <= covered / trials <= 1.0, covered
  assert apart == trials and overlapped == trials, (apart, overlapped)
  np.testing.assert_allclose(paired[1] - paired[0], 2 * 1.96 * noise / np.sqrt(n), rtol=0.25)


def test_excludes_zero():
  assert intervals.excludes_zero((0.1, 0.2)) and intervals.excludes_zero((-0.2, -0.1))
  assert not intervals.excludes_zero((-0.1, 0.2)) and not intervals.excludes_zero((0.0, 0.2))


def test_paired_scores_against_numpy():
  rng = np.random.default_rng(5)
  n, m = 150, 20
  labels = rng.integers(0, 10, n)
  ref = {'logits': rng.normal(size=(n, 10)) * 3, 'feats': rng.normal(size=(n, 8))}
  logits, feats = ref['logits'] + 0.5 * rng.normal(size=(n, 10)), ref['feats'] + 0.2 * rng.normal(size=(n, 8))
  real, ref_eps = rng.normal(0.2, 1.0, size=(90, 8)), rng.normal(size=(m, 4))
  metrics, ci = demo_metrics.scores(feats, logits, labels, real, ref_eps, ref_eps, 200, reference=ref)
  logp = scipy.special.log_softmax(logits, -1)[np.arange(n), labels]
  ref_logp = scipy.special.log_softmax(ref['logits'], -1)[np.arange(n), labels]
  np.testing.assert_allclose(metrics['class_logprob_vs_fp'], np.mean(logp - ref_logp), rtol=1e-12)

  def fd(f):
    return metrics_lib.frechet_distance(*metrics_lib.gaussian_statistics(f), *metrics_lib.gaussian_statistics(real))

  np.testing.assert_allclose(metrics['fd_vs_fp'], fd(feats) - fd(ref['feats']), rtol=1e-6)
  for key in ('class_logprob_vs_fp', 'fd_vs_fp'):
    assert ci[key][0] < metrics[key] < ci[key][1], (key, ci[key], metrics[key])
  # the paired interval of log p is about the normal-theory one of the mean per-digit difference
  half = 1.96 * (logp - ref_logp).std(ddof=1) / np.sqrt(n)
  lo, hi = ci['class_logprob_vs_fp']
  np.testing.assert_allclose(hi - lo, 2 * half, rtol=0.2)
  # the reference against itself: exactly 0, a zero-width interval
  same, same_ci = demo_metrics.scores(ref['feats'], ref['logits'], labels, real, ref_eps, ref_eps, 50, reference=ref)
  assert same['class_logprob_vs_fp'] == 0 and same['fd_vs_fp'] == 0
  assert same_ci['class_logprob_vs_fp'] == [0, 0] and same_ci['fd_vs_fp'] == [0, 0]
  with pytest.raises(ValueError, match='paired samples'):
    demo_metrics.scores(feats[:-1], logits[:-1], labels[:-1], real, ref_eps, ref_eps, 50, reference=ref)
  with pytest.raises(ValueError, match='same labels'):
    demo_metrics.scores(feats, logits, labels, real, ref_eps, ref_eps, 50, reference={**ref, 'labels': labels[::-1]})


def test_paired_reading_splits_rows_by_their_difference_intervals():
  def row(name, lp, lp_ci, fd, fd_ci):
    return {'name': name, 'metrics': {'class_logprob_vs_fp': lp, 'fd_vs_fp': fd},
            'ci95': {'class_logprob_vs_fp': lp_ci, 'fd_vs_fp': fd_ci}}  # fmt: skip

  rows = [
    {'name': 'fp', 'metrics': {'class_logprob_vs_fp': 0.0, 'fd_vs_fp': 0.0}, 'ci95': {}},
    row('a', -0.01, [-0.02, -0.005], 0.1, [-0.3, 0.5]),  # log p apart
    row('b', -0.001, [-0.004, 0.002], 0.8, [0.2, 1.4]),  # fd apart
    row('c', -0.001, [-0.004, 0.002], 0.1, [-0.3, 0.5]),  # neither
  ]
  text = rows_lib.paired_reading(rows)
  told, not_told = text.split('not told apart: ')
  assert 'a (log p -0.0100 [-0.0200, -0.0050], fd +0.10 [-0.30, +0.50])' in told and 'b (' in told
  assert 'c (' in not_told and 'a (' not in not_told and 'fp (log p' not in text  # fp is in neither list
  assert rows_lib.paired_reading([{'name': 'x', 'metrics': {}, 'ci95': {}}]) is None
