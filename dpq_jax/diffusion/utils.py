"""Gaussian KL and discretized log-likelihood, as in the ADM/DiT diffusion utilities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all non-batch dimensions."""
  return x.mean(axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """The tanh approximation of the standard normal CDF that the original uses (kept for parity)."""
  return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(x: jax.Array, *, means: jax.Array, log_scales: jax.Array) -> jax.Array:
  """Log-likelihood (nats) of data in [-1, 1] quantized to 256 bins under a Gaussian.

  Args:
    x: targets, uint8 values rescaled to [-1, 1]; the edge bins extend to -inf / +inf.
    means: the Gaussian means, x's shape.
    log_scales: the Gaussian log standard deviations, x's shape.

  Returns:
    Elementwise log-probabilities, x's shape.
  """
  if not x.shape == means.shape == log_scales.shape:
    raise ValueError(f'shapes differ: x {x.shape}, means {means.shape}, log_scales {log_scales.shape}')
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
