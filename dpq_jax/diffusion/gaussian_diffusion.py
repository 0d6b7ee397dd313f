"""Gaussian diffusion of DiT/ADM in JAX: schedules, q(x_t|x_0), p(x_{t-1}|x_t), training loss.

A port of the original DiT repository's diffusion/gaussian_diffusion.py for NHWC arrays.
Tables are computed in float64 numpy and gathered as float32, as the original's
`_extract_into_tensor` does. A respaced process keeps a subset of the base steps
(`timestep_map`); the model is always called with the base process's timesteps, like the
original's `_WrappedModel`.

Models are `apply_fn(variables, x_t, t, **model_kwargs)`, e.g. a Flax `model.apply`; with a
learned variance they return (B, H, W, 2C): eps (or x_0) first, variance values last.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpq_jax.diffusion import sampling, utils

ApplyFn = Callable[..., jax.Array]
Array = jax.Array


class ModelMeanType(enum.Enum):
  START_X = enum.auto()  # the model predicts x_0
  EPSILON = enum.auto()  # the model predicts epsilon


class ModelVarType(enum.Enum):
  FIXED_SMALL = enum.auto()  # the posterior variance
  FIXED_LARGE = enum.auto()  # beta_t
  LEARNED_RANGE = enum.auto()  # model outputs v in [-1, 1] between the two fixed log-variances


class LossType(enum.Enum):
  MSE = enum.auto()  # mse, plus vb when the variance is learned
  RESCALED_MSE = enum.auto()  # vb scaled by num_timesteps / 1000
  KL = enum.auto()  # the variational bound only
  RESCALED_KL = enum.auto()  # the bound times num_timesteps (an estimate of the full VLB)


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
  """Betas (float64) of 'linear' (Ho et al., scaled to any step count) or 'squaredcos_cap_v2'."""
  if name == 'linear':
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
  if name == 'squaredcos_cap_v2':
    alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    n = num_diffusion_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
  raise ValueError(f"noise_schedule={name!r}: expected 'linear' or 'squaredcos_cap_v2'")


def _extract(arr: np.ndarray, t: Array, ndim: int) -> Array:
  """arr[t] as float32, shaped (B, 1, ..., 1) to broadcast against an ndim-array."""
  return jnp.asarray(arr, jnp.float32)[t].reshape((-1,) + (1,) * (ndim - 1))


def _nonzero_mask(t: Array, x: Array) -> Array:
  # No noise is added on the last step (t == 0).
  return (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


class GaussianDiffusion:
  """A (possibly respaced) Gaussian diffusion process.

  Hashable by identity, so it can be a static argument of jit. All tables are float64 numpy.
  """

  def __init__(
    self,
    *,
    betas: np.ndarray,
    model_mean_type: ModelMeanType,
    model_var_type: ModelVarType,
    loss_type: LossType,
    timestep_map: np.ndarray | None = None,
  ):
    self.model_mean_type = model_mean_type
    self.model_var_type = model_var_type
    self.loss_type = loss_type
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
      raise ValueError('betas must be a 1-D array with values in (0, 1]')
    self.betas = betas
    self.num_timesteps = int(betas.shape[0])
    self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)
    if self.timestep_map.shape != betas.shape:
      raise ValueError(f'timestep_map has shape {self.timestep_map.shape}; expected {betas.shape}')

    alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(alphas)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
    self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
    self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    # The posterior variance is 0 at t=0: its log is clipped to the value at t=1.
    self.posterior_log_variance_clipped = (
      np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
      if self.num_timesteps > 1
      else np.array([])
    )
    self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

  # -- the forward process ------------------------------------------------------------------

  def q_mean_variance(self, x_start: Array, t: Array) -> tuple[Array, Array, Array]:
    """Mean, variance and log-variance of q(x_t | x_0), each of x_start's shape."""
    ones = jnp.ones_like(x_start)
    mean = _extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
    variance = _extract(1.0 - self.alphas_cumprod, t, x_start.ndim) * ones
    log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start.ndim) * ones
    return mean, variance, log_variance

  def q_sample(self, x_start: Array, t: Array, noise: Array) -> Array:
    """Samples q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with the given noise."""
    n = x_start.ndim
    return (
      _extract(self.sqrt_alphas_cumprod, t, n) * x_start + _extract(self.sqrt_one_minus_alphas_cumprod, t, n) * noise
    )

  def q_posterior_mean_variance(self, x_start: Array, x_t: Array, t: Array) -> tuple[Array, Array, Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    n, ones = x_t.ndim, jnp.ones_like(x_t)
    mean = _extract(self.posterior_mean_coef1, t, n) * x_start + _extract(self.posterior_mean_coef2, t, n) * x_t
    variance = _extract(self.posterior_variance, t, n) * ones
    log_variance = _extract(self.posterior_log_variance_clipped, t, n) * ones
    return mean, variance, log_variance

  # -- the reverse process ------------------------------------------------------------------

  def model_output(self, apply_fn: ApplyFn, variables: Any, x: Array, t: Array, model_kwargs: dict | None = None):
    """Calls the model with the base process's timesteps (respacing is invisible to it)."""
    return apply_fn(variables, x, jnp.asarray(self.timestep_map)[t], **(model_kwargs or {}))

  def p_mean_variance_from_output(self, output: Array, x: Array, t: Array, clip_denoised: bool = True):
    """p(x_{t-1} | x_t) and the x_0 prediction from a raw model output (B, H, W, C or 2C)."""
    n, c = x.ndim, x.shape[-1]
    if self.model_var_type == ModelVarType.LEARNED_RANGE:
      if output.shape != x.shape[:-1] + (2 * c,):
        raise ValueError(
          f'learned variance needs a model output of shape {x.shape[:-1] + (2 * c,)}, got {output.shape}'
        )
      output, var_values = output[..., :c], output[..., c:]
      min_log = _extract(self.posterior_log_variance_clipped, t, n)
      max_log = _extract(np.log(self.betas), t, n)
      frac = (var_values + 1) / 2  # [-1, 1] -> [min_var, max_var]
      log_variance = frac * max_log + (1 - frac) * min_log
      variance = jnp.exp(log_variance)
    else:
      if output.shape != x.shape:
        raise ValueError(f'fixed variance needs a model output of shape {x.shape}, got {output.shape}')
      if self.model_var_type == ModelVarType.FIXED_LARGE:
        # beta_t, but the posterior variance at t=0 for a better decoder likelihood.
        var = np.append(self.posterior_variance[1], self.betas[1:])
        log_var = np.log(var)
      else:
        var, log_var = self.posterior_variance, self.posterior_log_variance_clipped
      variance = _extract(var, t, n) * jnp.ones_like(x)
      log_variance = _extract(log_var, t, n) * jnp.ones_like(x)
    if self.model_mean_type == ModelMeanType.START_X:
      pred_xstart = output
    else:
      pred_xstart = self._predict_xstart_from_eps(x, t, output)
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1, 1)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
    return {'mean': mean, 'variance': variance, 'log_variance': log_variance, 'pred_xstart': pred_xstart}

  def p_mean_variance(
    self,
    apply_fn: ApplyFn,
    variables: Any,
    x: Array,
    t: Array,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
  ) -> dict[str, Array]:
    """Applies the model to get p(x_{t-1} | x_t) and a prediction of x_0.

    Args:
      apply_fn: `apply_fn(variables, x, t, **model_kwargs)`.
      variables: the model's variables, e.g. {'params': params}.
      x: (B, H, W, C) at step t.
      t: (B,) int step indices into this (possibly respaced) process.
      clip_denoised: clip the x_0 prediction to [-1, 1].
      model_kwargs: extra model arguments (labels, cfg_scale).

    Returns:
      A dict of 'mean', 'variance', 'log_variance', 'pred_xstart', each of x's shape.
    """
    output = self.model_output(apply_fn, variables, x, t, model_kwargs)
    return self.p_mean_variance_from_output(output, x, t, clip_denoised)

  def _predict_xstart_from_eps(self, x_t: Array, t: Array, eps: Array) -> Array:
    n = x_t.ndim
    return _extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t - _extract(self.sqrt_recipm1_alphas_cumprod, t, n) * eps

  def _predict_eps_from_xstart(self, x_t: Array, t: Array, pred_xstart: Array) -> Array:
    n = x_t.ndim
    numerator = _extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t - pred_xstart
    return numerator / _extract(self.sqrt_recipm1_alphas_cumprod, t, n)

  def p_sample(self, apply_fn, variables, x, t, key, clip_denoised=False, model_kwargs=None) -> dict[str, Array]:
    """One ancestral (DDPM) step x_t -> x_{t-1}; no noise is added at t == 0.

    Returns {'sample', 'pred_xstart'}; the step noise is drawn from `key`.
    """
    out = self.p_mean_variance(apply_fn, variables, x, t, clip_denoised, model_kwargs)
    sample = self.ddpm_update(out, x, t, jax.random.normal(key, x.shape, x.dtype))
    return {'sample': sample, 'pred_xstart': out['pred_xstart']}

  def ddpm_update(self, out: dict[str, Array], x: Array, t: Array, noise: Array) -> Array:
    """x_{t-1} of an ancestral step from p_mean_variance's `out` and the step's noise (unused at t == 0)."""
    return out['mean'] + _nonzero_mask(t, x) * jnp.exp(0.5 * out['log_variance']) * noise

  def ddim_sample(self, apply_fn, variables, x, t, key, clip_denoised=False, model_kwargs=None, eta=0.0):
    """One DDIM step x_t -> x_{t-1} (eq. 12 of Song et al.); eta=0 is deterministic.

    Returns {'sample', 'pred_xstart'}; the step noise (scaled by eta) is drawn from `key`.
    """
    out = self.p_mean_variance(apply_fn, variables, x, t, clip_denoised, model_kwargs)
    sample = self.ddim_update(out, x, t, jax.random.normal(key, x.shape, x.dtype), eta)
    return {'sample': sample, 'pred_xstart': out['pred_xstart']}

  def ddim_update(self, out: dict[str, Array], x: Array, t: Array, noise: Array, eta: float | Array = 0.0) -> Array:
    """x_{t-1} of a DDIM step from p_mean_variance's `out` and the step's noise (scaled by eta)."""
    # Re-derived from the (possibly clipped) x_0 prediction, as the original does.
    eps = self._predict_eps_from_xstart(x, t, out['pred_xstart'])
    alpha_bar = _extract(self.alphas_cumprod, t, x.ndim)
    alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x.ndim)
    sigma = eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
    mean = out['pred_xstart'] * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    return mean + _nonzero_mask(t, x) * sigma * noise

  def ddim_reverse_sample(self, apply_fn, variables, x, t, clip_denoised=False, model_kwargs=None):
    """One deterministic DDIM inversion step x_t -> x_{t+1}; returns {'sample', 'pred_xstart'}."""
    out = self.p_mean_variance(apply_fn, variables, x, t, clip_denoised, model_kwargs)
    eps = self._predict_eps_from_xstart(x, t, out['pred_xstart'])
    alpha_bar_next = _extract(self.alphas_cumprod_next, t, x.ndim)
    sample = out['pred_xstart'] * jnp.sqrt(alpha_bar_next) + jnp.sqrt(1 - alpha_bar_next) * eps
    return {'sample': sample, 'pred_xstart': out['pred_xstart']}

  # -- losses -------------------------------------------------------------------------------

  def _vb_terms_bpd(self, output: Array, x_start: Array, x_t: Array, t: Array, clip_denoised: bool = False) -> Array:
    """The variational-bound term in bits: decoder NLL at t == 0, else KL(q || p)."""
    true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance_from_output(output, x_t, t, clip_denoised)
    kl = utils.mean_flat(utils.normal_kl(true_mean, true_log_var, out['mean'], out['log_variance'])) / np.log(2.0)
    nll = -utils.discretized_gaussian_log_likelihood(x_start, means=out['mean'], log_scales=0.5 * out['log_variance'])
    nll = utils.mean_flat(nll) / np.log(2.0)
    return jnp.where(t == 0, nll, kl)

  def training_losses(
    self,
    apply_fn: ApplyFn,
    variables: Any,
    x_start: Array,
    t: Array,
    noise: Array | None = None,
    model_kwargs: dict | None = None,
    rng: Array | None = None,
  ) -> dict[str, Array]:
    """Per-example training losses at step indices t of this process; jittable and differentiable.

    Args:
      apply_fn: `apply_fn(variables, x_t, t, **model_kwargs)`, called with the base timesteps.
      variables: the model's variables (what gradients are taken with respect to).
      x_start: (B, H, W, C) clean data.
      t: (B,) int step indices.
      noise: the Gaussian noise of q(x_t | x_0); drawn from `rng` when None.
      model_kwargs: extra model arguments, e.g. {'y': labels}.
      rng: key for the noise; required when `noise` is None.

    Returns:
      (B,) arrays: 'loss'; with an MSE loss also 'mse', and 'vb' (bits) when the variance is
      learned. KL loss types give only 'loss', like the original.
    """
    if noise is None:
      if rng is None:
        raise ValueError('training_losses needs `noise` or an `rng` to draw it; got neither')
      noise = jax.random.normal(rng, x_start.shape, x_start.dtype)
    x_t = self.q_sample(x_start, t, noise)
    output = self.model_output(apply_fn, variables, x_t, t, model_kwargs)
    if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
      loss = self._vb_terms_bpd(output, x_start, x_t, t)
      return {'loss': loss * self.num_timesteps if self.loss_type == LossType.RESCALED_KL else loss}
    terms = {}
    c = x_t.shape[-1]
    if self.model_var_type == ModelVarType.LEARNED_RANGE:
      if output.shape != x_t.shape[:-1] + (2 * c,):
        raise ValueError(f'learned variance needs a model output of shape {x_t.shape[:-1] + (2 * c,)}, '
                         f'got {output.shape}')  # fmt: skip
      mean_out = output[..., :c]
      # Learn the variance with the bound but keep the bound from moving the mean prediction.
      frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), output[..., c:]], axis=-1)
      terms['vb'] = self._vb_terms_bpd(frozen, x_start, x_t, t)
      if self.loss_type == LossType.RESCALED_MSE:
        # The original divides by 1000 so that the vb term does not swamp the mse term.
        terms['vb'] = terms['vb'] * (self.num_timesteps / 1000.0)
      output = mean_out
    target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
    if output.shape != target.shape:
      raise ValueError(f'model output has shape {output.shape}; expected {target.shape}')
    terms['mse'] = utils.mean_flat(jnp.square(target - output))
    terms['loss'] = terms['mse'] + terms['vb'] if 'vb' in terms else terms['mse']
    return terms

  # -- sampling loops (jit + lax.scan; see sampling.py) ---------------------------------------

  def p_sample_loop(
    self,
    apply_fn: ApplyFn,
    variables: Any,
    shape: tuple[int, ...],
    rng: Array,
    noise: Array | None = None,
    model_kwargs: dict | None = None,
    clip_denoised: bool = False,
    progress: bool = False,
  ) -> Array:
    """DDPM ancestral sampling over every step of this process, from x_T = noise (or drawn
    from rng); returns x_0. Deterministic given rng (and noise)."""
    return sampling.sample_loop(
      self, 'ddpm', apply_fn, variables, shape, rng, noise, model_kwargs, clip_denoised, progress=progress
    )

  def ddim_sample_loop(
    self,
    apply_fn: ApplyFn,
    variables: Any,
    shape: tuple[int, ...],
    rng: Array,
    noise: Array | None = None,
    model_kwargs: dict | None = None,
    clip_denoised: bool = False,
    eta: float = 0.0,
    progress: bool = False,
  ) -> Array:
    """DDIM sampling over every step of this process; with eta=0 the result depends only on
    the starting noise."""
    return sampling.sample_loop(
      self, 'ddim', apply_fn, variables, shape, rng, noise, model_kwargs, clip_denoised, eta, progress
    )
