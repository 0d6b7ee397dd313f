"""Gaussian diffusion (DiT/ADM) in JAX; `create_diffusion` mirrors the original's defaults."""

from __future__ import annotations

import numpy as np

from dpq_jax.diffusion import respace
from dpq_jax.diffusion.gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from dpq_jax.diffusion.sampling import cfg_batch, split_cfg

__all__ = ['GaussianDiffusion', 'LossType', 'ModelMeanType', 'ModelVarType', 'cfg_batch', 'create_diffusion',
           'split_cfg']  # fmt: skip


def create_diffusion(
  timestep_respacing: str | list[int] | None = '',
  noise_schedule: str = 'linear',
  use_kl: bool = False,
  sigma_small: bool = False,
  predict_xstart: bool = False,
  learn_sigma: bool = True,
  rescale_learned_sigmas: bool = False,
  diffusion_steps: int = 1000,
) -> GaussianDiffusion:
  """The original DiT's create_diffusion: 1000 linear-beta steps, learned-range variance,
  loss = mse + vb. `timestep_respacing` ("" for all steps, "250", "ddim50", "10,20,30")
  selects the kept steps; `timestep_map` holds their original indices."""
  from dpq_jax.diffusion.gaussian_diffusion import get_named_beta_schedule

  betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
  if use_kl:
    loss_type = LossType.RESCALED_KL
  elif rescale_learned_sigmas:
    loss_type = LossType.RESCALED_MSE
  else:
    loss_type = LossType.MSE
  if not timestep_respacing:
    timestep_respacing = [diffusion_steps]
  use_timesteps = respace.space_timesteps(diffusion_steps, timestep_respacing)
  base_alphas_cumprod = np.cumprod(1.0 - betas)
  if learn_sigma:
    var_type = ModelVarType.LEARNED_RANGE
  else:
    var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
  return GaussianDiffusion(
    betas=respace.respaced_betas(base_alphas_cumprod, use_timesteps),
    model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
    model_var_type=var_type,
    loss_type=loss_type,
    timestep_map=np.asarray(use_timesteps),
  )
