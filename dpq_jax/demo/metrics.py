"""The digits demo's metrics: Frechet distance in the classifier's feature space, class accuracy of
generated samples, and the denoiser's output error against the full-precision model.

  fd              Frechet distance between generated digits and the held-out real digits, in the
                  64-d penultimate features of the locally trained classifier (FID's recipe, another net).
  class_accuracy  fraction of generated digits the classifier labels as the class they were asked for.
  eps_rel_error   ||eps_q - eps_fp|| / ||eps_fp|| of the predicted noise on fixed noisy held-out digits
                  (t spread over 0..999, the labels given): how far the quantized denoiser strays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpq_jax import diffusion
from dpq_jax.demo import classifier
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


def evaluate(
  model,
  variables,
  sample_cfg: ml_collections.ConfigDict,
  clf_params: dict,
  heldout_images: np.ndarray,
  reference_eps: np.ndarray,
  inputs: tuple[jax.Array, ...],
) -> tuple[dict, np.ndarray]:
  """({'fd', 'class_accuracy', 'eps_rel_error'}, generated images [N, 8, 8, 1] in [-1, 1])."""
  images, labels = sample_lib.generate(model, variables, sample_cfg, progress=False)
  images = np.clip(images, -1.0, 1.0)
  feats, logits = classifier.apply(clf_params, images)
  real_feats, _ = classifier.apply(clf_params, heldout_images)
  fd = metrics_lib.frechet_distance(
    *metrics_lib.gaussian_statistics(feats), *metrics_lib.gaussian_statistics(real_feats)
  )
  eps = eps_prediction(model, variables, inputs)
  return {
    'fd': fd,
    'class_accuracy': float(np.mean(np.argmax(logits, -1) == labels)),
    'eps_rel_error': float(np.linalg.norm(eps - reference_eps) / np.linalg.norm(reference_eps)),
  }, images
