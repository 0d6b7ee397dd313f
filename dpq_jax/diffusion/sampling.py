"""Sampling loops under jit and classifier-free-guidance batches.

A loop is a `lax.scan` over the reversed timesteps. Step t draws its noise from
`fold_in(loop_key, t)`, so a run is deterministic given its rng. With a progress bar the
steps run in fixed-size chunks from Python (the last one padded with skipped steps), so the
bar advances without a recompilation per chunk.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

MAX_CHUNK = 10  # steps per compiled scan when a progress bar is shown
_KINDS = ('ddpm', 'ddim')


@functools.partial(jax.jit, static_argnames=('diffusion', 'apply_fn', 'kind', 'clip_denoised', 'masked'))
def _scan_steps(diffusion, apply_fn, kind, clip_denoised, masked, variables, x, rng, indices, model_kwargs, eta):
  """Runs the steps `indices` (timesteps, descending; -1 marks padding when `masked`)."""

  def step(x, i):
    t = jnp.full((x.shape[0],), i, jnp.int32)
    key = jax.random.fold_in(rng, i)
    if kind == 'ddim':
      out = diffusion.ddim_sample(apply_fn, variables, x, t, key, clip_denoised, model_kwargs, eta)
    else:
      out = diffusion.p_sample(apply_fn, variables, x, t, key, clip_denoised, model_kwargs)
    return out['sample'].astype(x.dtype)  # a low-precision model must not change the carry's dtype

  def body(x, i):
    if masked:
      # A real conditional, so padding steps never run the model.
      x = jax.lax.cond(i >= 0, step, lambda x, i: x, x, i)
    else:
      x = step(x, i)
    return x, None

  return jax.lax.scan(body, x, indices)[0]


def sample_loop(
  diffusion,
  kind: str,
  apply_fn: Callable[..., jax.Array],
  variables: Any,
  shape: tuple[int, ...],
  rng: jax.Array,
  noise: jax.Array | None = None,
  model_kwargs: dict | None = None,
  clip_denoised: bool = False,
  eta: float = 0.0,
  progress: bool = False,
) -> jax.Array:
  """Runs every step of `diffusion` from x_T to x_0 and returns x_0.

  Args:
    diffusion: a GaussianDiffusion (static under jit, hashed by identity).
    kind: 'ddpm' (ancestral) or 'ddim'.
    apply_fn: `apply_fn(variables, x, t, **model_kwargs)`; static under jit, so pass the
      same callable object across calls to reuse the compilation.
    variables: the model's variables.
    shape: (B, H, W, C) of the samples.
    rng: key for x_T (when `noise` is None) and the per-step noise.
    noise: x_T; drawn from rng when None.
    model_kwargs: extra model arguments; its arrays are traced, not static.
    clip_denoised: clip x_0 predictions to [-1, 1].
    eta: DDIM noise scale (0 is deterministic); unused by 'ddpm'.
    progress: show a tqdm bar, advancing every MAX_CHUNK steps.

  Returns:
    (B, H, W, C) float32 samples.
  """
  if kind not in _KINDS:
    raise ValueError(f'kind={kind!r}: expected one of {_KINDS}')
  shape = tuple(shape)
  init_key, loop_key = jax.random.split(rng)
  if noise is None:
    x = jax.random.normal(init_key, shape, jnp.float32)
  else:
    x = jnp.asarray(noise, jnp.float32)
    if x.shape != shape:
      raise ValueError(f'noise has shape {x.shape}; expected {shape}')
  num_steps = diffusion.num_timesteps
  chunk = min(MAX_CHUNK, num_steps) if progress else num_steps
  pad = -num_steps % chunk
  indices = np.concatenate([np.arange(num_steps)[::-1], np.full(pad, -1)]).astype(np.int32)
  bar = None
  if progress:
    from tqdm.auto import tqdm  # lazy: only progress bars need tqdm

    bar = tqdm(total=num_steps, desc=f'{kind} sampling', unit='step', leave=False)
  for start in range(0, len(indices), chunk):
    x = _scan_steps(
      diffusion, apply_fn, kind, clip_denoised, pad > 0, variables, x, loop_key,
      jnp.asarray(indices[start : start + chunk]), model_kwargs or {}, jnp.float32(eta),
    )  # fmt: skip
    if bar is not None:
      x.block_until_ready()
      bar.update(int((indices[start : start + chunk] >= 0).sum()))
  if bar is not None:
    bar.close()
  return x


def cfg_batch(noise: jax.Array, labels: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Doubles a batch for classifier-free guidance, as the original sample.py does.

  Args:
    noise: (B, H, W, C) starting noise.
    labels: (B,) class labels.
    num_classes: the model's class count; label `num_classes` is the null (unconditional) one.

  Returns:
    z: (2B, H, W, C), [noise; noise]. y: (2B,), [labels; null labels].
  """
  if labels.shape != noise.shape[:1]:
    raise ValueError(f'labels have shape {labels.shape}; expected ({noise.shape[0]},) to match the noise batch')
  z = jnp.concatenate([noise, noise], axis=0)
  y = jnp.concatenate([labels, jnp.full_like(labels, num_classes)], axis=0)
  return z, y


def split_cfg(samples: jax.Array) -> jax.Array:
  """The conditional half of a guided batch (the null-class half is dropped)."""
  if samples.shape[0] % 2:
    raise ValueError(f'a guided batch has an even size; got {samples.shape[0]}')
  return samples[: samples.shape[0] // 2]
