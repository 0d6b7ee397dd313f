"""A small digit classifier, trained locally, whose penultimate features serve the demo's metrics.

Its role is the Inception network's in FID: a fixed feature space in which generated and held-out
real digits are compared (Frechet distance), and a judge of whether class conditioning survives
quantization (class accuracy of generated samples).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

FEATURES = 64


class DigitClassifier(nn.Module):
  """MLP on the 64 pixels: 256 -> 64 (the feature layer) -> 10 logits."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = images.reshape(images.shape[0], -1)
    x = nn.gelu(nn.Dense(256, name='fc1')(x))
    features = nn.gelu(nn.Dense(FEATURES, name='fc2')(x))  # [B, FEATURES]
    return features, nn.Dense(self.num_classes, name='head')(features)


def train(images: np.ndarray, labels: np.ndarray, steps: int, seed: int, batch_size: int = 128) -> dict:
  """Adam on cross-entropy with light pixel noise (the generated digits are never exactly clean)."""
  model = DigitClassifier()
  params = model.init(jax.random.key(seed), jnp.zeros((1,) + images.shape[1:]))['params']
  opt = optax.adamw(1e-3, weight_decay=1e-4)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, x, y, key):
    x = x + 0.1 * jax.random.normal(key, x.shape)

    def loss_fn(p):
      _, logits = model.apply({'params': p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for i in range(steps):
    idx = rng.integers(0, len(images), batch_size)
    params, opt_state, _ = step(params, opt_state, images[idx], labels[idx], jax.random.key(seed * 100003 + i))
  return params


def apply(params: dict, images: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, FEATURES], logits [N, 10]) of images in [-1, 1]."""
  fn = jax.jit(lambda p, x: DigitClassifier().apply({'params': p}, x))
  feats, logits = [], []
  for i in range(0, len(images), batch_size):
    f, lg = fn(params, jnp.asarray(images[i : i + batch_size], jnp.float32))
    feats.append(np.asarray(f))
    logits.append(np.asarray(lg))
  return np.concatenate(feats).astype(np.float64), np.concatenate(logits)
