"""The digits demo's metrics: the classifier's log-probability of the asked class (the headline), Frechet
distance in the classifier's feature space, class accuracy of generated samples, and the denoiser's output error
against the full-precision model; each with a bootstrap 95% interval (intervals.py).

  class_logprob   mean over generated digits of log p(asked class | digit) under the classifier (log-softmax of
                  its logits): unlike accuracy it keeps moving when every digit is already classified right.
  fd              Frechet distance between generated digits and the held-out real digits, in the
                  64-d penultimate features of the locally trained classifier (FID's recipe, another net).
  class_accuracy  fraction of generated digits the classifier labels as the class they were asked for.
  eps_rel_error   ||eps_q - eps_fp|| / ||eps_fp|| of the predicted noise on fixed noisy held-out digits
                  (t spread over 0..999, the labels given): how far the quantized denoiser strays.
  class_logprob_vs_fp, fd_vs_fp
                  the row's log p and fd minus the full-precision model's on its digits from the same noise and
                  labels (given the fp model's classifier outputs as `reference`): paired differences.

Intervals: percentile bootstrap over the generated digits (class_logprob, class_accuracy, and fd with the
held-out reference statistics kept fixed, shifted by the bootstrap's bias estimate: resamples repeat digits,
which raises their fd) or over the fixed noisy inputs (eps_rel_error, a ratio of sums
resampled as a whole), `num_resamples` resamples. The paired differences resample a row's digits and the fp
model's together (digit i of both from the same starting noise and label), so what the two share (the noise's
draw, the labels' mix) cancels: their interval is far narrower than either metric's own, and a difference is
called where it excludes 0 (intervals.excludes_zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpq_jax import diffusion
from dpq_jax.demo import classifier, intervals
from dpq_jax.evaluate import metrics as metrics_lib
from dpq_jax.evaluate import sample_batch as sample_lib


def fixed_noisy_inputs(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[jax.Array, ...]:
  """(x_t, t, y) for every held-out digit at t evenly spread over the 1000 steps; same for every row."""
  process = diffusion.create_diffusion('')
  n = len(images)
  t = jnp.asarray(np.linspace(0, process.num_timesteps - 1, n).round().astype(np.int32))
  noise = jax.random.normal(jax.random.key(seed), images.shape)
  return process.q_sample(jnp.asarray(images), t, noise), t, jnp.asarray(labels)


def eps_prediction(model, variables, inputs: tuple[jax.Array, ...]) -> np.ndarray:
  x_t, t, y = inputs
  out = jax.jit(lambda v: model.apply(v, x_t, t, y))(variables)
  return np.asarray(out[..., : x_t.shape[-1]], np.float64)


def class_logprob(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """log p(label | image) per sample [N] from the classifier's logits [N, C] (a stable log-softmax)."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return logp[np.arange(len(labels)), np.asarray(labels)]


def scores(
  feats: np.ndarray,
  logits: np.ndarray,
  labels: np.ndarray,
  real_feats: np.ndarray,
  eps: np.ndarray,
  reference_eps: np.ndarray,
  num_resamples: int = 1000,
  seed: int = 0,
  reference: dict | None = None,
) -> tuple[dict, dict]:
  """(metrics, their 95% intervals {key: [low, high]}) of one row from its samples' classifier outputs and its
  denoiser's predictions on the fixed inputs; pure numpy. reference: the fp model's {'feats', 'logits'} on its
  digits from the same noise and labels (sample i of both from the same draw), for the paired `*_vs_fp` metrics."""
  logp = class_logprob(logits, labels)  # [N]
  correct = (np.argmax(logits, -1) == labels).astype(np.float64)  # [N]
  fd = intervals.FixedReferenceFD(real_feats)
  num = ((eps - reference_eps) ** 2).reshape(len(eps), -1).sum(-1)  # [M] squared error per noisy input
  den = (reference_eps**2).reshape(len(eps), -1).sum(-1)  # [M]
  metrics = {
    'class_logprob': float(logp.mean()),
    'fd': metrics_lib.frechet_distance(
      *metrics_lib.gaussian_statistics(feats), *metrics_lib.gaussian_statistics(real_feats)
    ),
    'class_accuracy': float(correct.mean()),
    'eps_rel_error': float(np.sqrt(num.sum() / den.sum())),
  }
  n, m = len(logp), len(num)
  ci = {
    'class_logprob': intervals.bootstrap_interval(lambda i: logp[i].mean(), n, num_resamples, seed),
    'fd': intervals.bootstrap_interval(lambda i: fd(feats[i]), n, num_resamples, seed, debias=True),
    'class_accuracy': intervals.bootstrap_interval(lambda i: correct[i].mean(), n, num_resamples, seed),
    'eps_rel_error': intervals.bootstrap_interval(
      lambda i: np.sqrt(num[i].sum() / den[i].sum()), m, num_resamples, seed
    ),
  }
  if reference is not None:
    ref_feats, ref_logp = np.asarray(reference['feats']), class_logprob(reference['logits'], labels)
    if ref_feats.shape != feats.shape:
      raise ValueError(f"reference feats {ref_feats.shape}: expected the row's shape {feats.shape} (paired samples)")
    if 'labels' in reference and not np.array_equal(reference['labels'], labels):
      raise ValueError("reference labels differ from the row's: expected digits of the same labels (paired samples)")
    diff = logp - ref_logp  # [N] per-digit difference
    metrics['class_logprob_vs_fp'] = float(diff.mean())
    metrics['fd_vs_fp'] = fd(feats) - fd(ref_feats)
    ci['class_logprob_vs_fp'] = intervals.bootstrap_interval(lambda i: diff[i].mean(), n, num_resamples, seed)
    ci['fd_vs_fp'] = intervals.bootstrap_interval(
      lambda i: fd(feats[i]) - fd(ref_feats[i]), n, num_resamples, seed, debias=True
    )
  return metrics, {k: [round(lo, 6), round(hi, 6)] for k, (lo, hi) in ci.items()}


def sample_outputs(model, variables, sample_cfg: ml_collections.ConfigDict, clf_params: dict) -> dict:
  """Generated digits {'images' [N, 8, 8, 1] in [-1, 1], 'labels' [N], and the classifier's 'feats', 'logits'}."""
  images, labels = sample_lib.generate(model, variables, sample_cfg, progress=False)
  images = np.clip(images, -1.0, 1.0)
  feats, logits = classifier.apply(clf_params, images)
  return {'images': images, 'labels': np.asarray(labels), 'feats': np.asarray(feats), 'logits': np.asarray(logits)}


def evaluate(
  model,
  variables,
  sample_cfg: ml_collections.ConfigDict,
  clf_params: dict,
  heldout_images: np.ndarray,
  reference_eps: np.ndarray,
  inputs: tuple[jax.Array, ...],
  num_resamples: int = 1000,
  reference: dict | None = None,
  outputs: dict | None = None,
) -> tuple[dict, dict, np.ndarray]:
  """(metrics {'class_logprob', 'fd', 'class_accuracy', 'eps_rel_error'} and, with the fp model's `reference`
  (sample_outputs), the paired '*_vs_fp'; their 95% intervals; generated images [N, 8, 8, 1] in [-1, 1]).
  outputs: this model's sample_outputs where already generated (the fp row is the reference itself)."""
  outputs = outputs or sample_outputs(model, variables, sample_cfg, clf_params)
  real_feats, _ = classifier.apply(clf_params, heldout_images)
  eps = eps_prediction(model, variables, inputs)
  metrics, ci = scores(
    outputs['feats'], outputs['logits'], outputs['labels'], real_feats, eps, reference_eps, num_resamples,
    reference=reference,
  )  # fmt: skip
  return metrics, ci, outputs['images']
