"""Gaussian diffusion (DiT/ADM) in JAX; `create_diffusion` mirrors the original's defaults."""

from __future__ import annotations

import numpy as np

from dpq_jax.diffusion.gaussian_diffusion import (
  GaussianDiffusion,
  LossType,
  ModelMeanType,
  ModelVarType,
  get_named_beta_schedule,
)
from dpq_jax.diffusion.respace import respaced_betas, space_timesteps
from dpq_jax.diffusion.sampling import cfg_batch, split_cfg

__all__ = [
  'GaussianDiffusion',
  'LossType',
  'ModelMeanType',
  'ModelVarType',
  'cfg_batch',
  'create_diffusion',
  'get_named_beta_schedule',
  'space_timesteps',
  'split_cfg',
]


def create_diffusion(
  timestep_respacing: str | int | list[int] | None = '',
  noise_schedule: str = 'linear',
  use_kl: bool = False,
  sigma_small: bool = False,
  predict_xstart: bool = False,
  learn_sigma: bool = True,
  rescale_learned_sigmas: bool = False,
  diffusion_steps: int = 1000,
) -> GaussianDiffusion:
  """The original DiT's create_diffusion.

  Defaults: 1000 linear-beta steps, eps prediction, learned-range variance, loss = mse + vb.

  Args:
    timestep_respacing: "" or None for every step, else which steps to keep: "250",
      "10,20,30", "ddim50" (see space_timesteps), an int or a list of section counts.
    noise_schedule: 'linear' or 'squaredcos_cap_v2'.
    use_kl: train on the rescaled variational bound only.
    sigma_small: with a fixed variance, the posterior variance instead of beta_t.
    predict_xstart: the model predicts x_0 instead of eps.
    learn_sigma: the model outputs 2C channels, the last C interpolating the log-variance.
    rescale_learned_sigmas: scale the vb term by num_timesteps / 1000.
    diffusion_steps: steps of the base process.

  Returns:
    The process; `timestep_map` holds the base timesteps of its steps, which is what the
    model is called with.
  """
  betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
  if use_kl:
    loss_type = LossType.RESCALED_KL
  elif rescale_learned_sigmas:
    loss_type = LossType.RESCALED_MSE
  else:
    loss_type = LossType.MSE
  if timestep_respacing is None or timestep_respacing == '':
    timestep_respacing = [diffusion_steps]
  elif isinstance(timestep_respacing, (int, np.integer)):
    timestep_respacing = [int(timestep_respacing)]
  use_timesteps = space_timesteps(diffusion_steps, timestep_respacing)
  if learn_sigma:
    var_type = ModelVarType.LEARNED_RANGE
  else:
    var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
  return GaussianDiffusion(
    betas=respaced_betas(np.cumprod(1.0 - betas), use_timesteps),
    model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
    model_var_type=var_type,
    loss_type=loss_type,
    timestep_map=np.asarray(use_timesteps),
  )
