"""Sampling loops under jit: a lax.scan over the reversed timesteps, run in equal chunks so a
progress bar can advance without recompiling. Step i draws its noise from fold_in(rng, i)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MAX_CHUNK = 10  # steps per compiled scan when a progress bar is shown


@functools.partial(jax.jit, static_argnames=('diffusion', 'apply_fn', 'kind', 'clip_denoised'))
def _scan_steps(diffusion, apply_fn, kind, clip_denoised, variables, x, rng, indices, model_kwargs, eta):
  def body(x, i):
    t = jnp.full((x.shape[0],), i, jnp.int32)
    key = jax.random.fold_in(rng, i)
    if kind == 'ddim':
      x = diffusion.ddim_sample_step(apply_fn, variables, x, t, key, clip_denoised, model_kwargs, eta)
    else:
      x = diffusion.p_sample_step(apply_fn, variables, x, t, key, clip_denoised, model_kwargs)
    return x, None

  return jax.lax.scan(body, x, indices)[0]


def _chunk_size(num_steps: int, progress: bool) -> int:
  if not progress:
    return num_steps
  return max(c for c in range(1, min(MAX_CHUNK, num_steps) + 1) if num_steps % c == 0)


def sample_loop(
  diffusion,
  kind: str,
  apply_fn,
  variables: Any,
  shape: tuple[int, ...],
  rng: jax.Array,
  noise: jax.Array | None = None,
  model_kwargs: dict | None = None,
  clip_denoised: bool = False,
  eta: float = 0.0,
  progress: bool = False,
) -> jax.Array:
  """Runs all steps from x_T (`noise`, or drawn from rng) to x_0 and returns x_0."""
  init_key, loop_key = jax.random.split(rng)
  x = jnp.asarray(noise, jnp.float32) if noise is not None else jax.random.normal(init_key, shape, jnp.float32)
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f'noise has shape {x.shape}; expected {tuple(shape)}')
  indices = np.arange(diffusion.num_timesteps, dtype=np.int32)[::-1]
  chunk = _chunk_size(len(indices), progress)
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(indices), desc=f'{kind} sampling', unit='step', leave=False)
  for start in range(0, len(indices), chunk):
    x = _scan_steps(
        diffusion, apply_fn, kind, clip_denoised, variables, x, loop_key,
        jnp.asarray(indices[start : start + chunk]), model_kwargs or {}, jnp.float32(eta),
    )  # fmt: skip
    if bar is not None:
      x.block_until_ready()
      bar.update(chunk)
  if bar is not None:
    bar.close()
  return x


def cfg_batch(noise: jax.Array, labels: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """[z; z] and [y; null] for classifier-free guidance, as the original sample.py builds them."""
  z = jnp.concatenate([noise, noise], axis=0)
  y = jnp.concatenate([labels, jnp.full_like(labels, num_classes)], axis=0)
  return z, y


def split_cfg(samples: jax.Array) -> jax.Array:
  """The conditional half of a guided batch (the null-class half is dropped)."""
  return samples[: samples.shape[0] // 2]
