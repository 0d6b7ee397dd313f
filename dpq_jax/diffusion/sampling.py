"""The one DDPM/DDIM step loop (under jit) and classifier-free-guidance batches.

A loop is a `lax.scan` over the reversed timesteps, run from Python in chunks of steps (so a
progress bar can advance without a recompilation per chunk; the last chunk is padded with skipped
steps). Where step t's noise comes from is the caller's `noise_fn`: `sample_loop` draws one batch
from `fold_in(loop_key, t)`, the sharded sampler (evaluate/sampler.py) one draw per sample. Either
way a run is deterministic given its keys.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

MAX_CHUNK = 10  # steps per compiled scan when sample_loop shows a progress bar
KINDS = ('ddpm', 'ddim')

# noise_fn(noise_key, t, x_shape) -> the (float32) noise of step t, of x's shape.
NoiseFn = Callable[[jax.Array, jax.Array, tuple[int, ...]], jax.Array]


def denoise_step(
  diffusion,
  kind: str,
  out: dict[str, jax.Array],
  x: jax.Array,
  t: jax.Array,
  noise: jax.Array,
  eta: float | jax.Array = 0.0,
) -> jax.Array:
  """x_{t-1} from p_mean_variance's `out` and explicit noise: the update of the process's p_sample
  (DDPM) or ddim_sample (DDIM), which draw their noise from one key for the batch."""
  if kind == 'ddpm':
    return diffusion.ddpm_update(out, x, t, noise)
  return diffusion.ddim_update(out, x, t, noise, eta)


def batch_noise(rng: jax.Array, t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Step t's noise as one draw for the whole batch: normal(fold_in(rng, t))."""
  return jax.random.normal(jax.random.fold_in(rng, t), shape, jnp.float32)


@functools.partial(jax.jit, static_argnames=('diffusion', 'apply_fn', 'kind', 'clip_denoised', 'masked', 'noise_fn'))
def scan_steps(
  diffusion, apply_fn, kind, clip_denoised, masked, noise_fn, variables, x, noise_key, indices, model_kwargs, eta
):
  """Runs the steps `indices` (timesteps, descending; -1 marks padding when `masked`)."""

  def step(x, i):
    t = jnp.full((x.shape[0],), i, jnp.int32)
    out = diffusion.p_mean_variance(apply_fn, variables, x, t, clip_denoised, model_kwargs)
    noise = noise_fn(noise_key, i, x.shape)
    # A low-precision model must not change the carry's dtype.
    return denoise_step(diffusion, kind, out, x, t, noise, eta).astype(x.dtype)

  def body(x, i):
    if masked:
      # A real conditional, so padding steps never run the model.
      x = jax.lax.cond(i >= 0, step, lambda x, i: x, x, i)
    else:
      x = step(x, i)
    return x, None

  return jax.lax.scan(body, x, indices)[0]


def run_steps(
  diffusion,
  kind: str,
  apply_fn: Callable[..., jax.Array],
  variables: Any,
  x: jax.Array,
  noise_fn: NoiseFn,
  noise_key: jax.Array,
  model_kwargs: dict | None = None,
  clip_denoised: bool = False,
  eta: float = 0.0,
  chunk: int | None = None,
  masked: bool | None = None,
  progress: bool = False,
  desc: str = '',
) -> jax.Array:
  """Runs every step of `diffusion` on x = x_T and returns x_0: the loop both samplers share.

  Args:
    diffusion: a GaussianDiffusion (static under jit, hashed by identity).
    kind: 'ddpm' (ancestral) or 'ddim'.
    apply_fn: `apply_fn(variables, x, t, **model_kwargs)`; static under jit (as is noise_fn), so
      pass the same callable object across calls to reuse the compilation.
    variables: the model's variables.
    x: (B, H, W, C) float32 x_T; its sharding is followed.
    noise_fn: `noise_fn(noise_key, t, x.shape)`, step t's noise.
    noise_key: the key (or per-sample keys) noise_fn draws from; traced.
    model_kwargs: extra model arguments; its arrays are traced, not static.
    clip_denoised: clip x_0 predictions to [-1, 1].
    eta: DDIM noise scale (0 is deterministic); unused by 'ddpm'.
    chunk: steps per compiled call (default all of them).
    masked: run each step under lax.cond on its index; None: only when the last chunk is padded.
    progress: show a tqdm bar described by `desc`, advancing every chunk.

  Returns:
    x_0, of x's shape and dtype.
  """
  if kind not in KINDS:
    raise ValueError(f'kind={kind!r}: expected one of {KINDS}')
  num_steps = diffusion.num_timesteps
  chunk = min(chunk or num_steps, num_steps)
  pad = -num_steps % chunk
  masked = pad > 0 if masked is None else masked
  indices = np.concatenate([np.arange(num_steps)[::-1], np.full(pad, -1)]).astype(np.int32)
  bar = None
  if progress:
    from tqdm.auto import tqdm  # lazy: only progress bars need tqdm

    bar = tqdm(total=num_steps, desc=desc, unit='step', leave=False)
  for start in range(0, len(indices), chunk):
    x = scan_steps(
      diffusion, apply_fn, kind, clip_denoised, masked, noise_fn, variables, x, noise_key,
      jnp.asarray(indices[start : start + chunk]), model_kwargs or {}, jnp.float32(eta),
    )  # fmt: skip
    if bar is not None:
      x.block_until_ready()
      bar.update(int((indices[start : start + chunk] >= 0).sum()))
  if bar is not None:
    bar.close()
  return x


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
  if kind not in KINDS:
    raise ValueError(f'kind={kind!r}: expected one of {KINDS}')
  shape = tuple(shape)
  init_key, loop_key = jax.random.split(rng)
  if noise is None:
    x = jax.random.normal(init_key, shape, jnp.float32)
  else:
    x = jnp.asarray(noise, jnp.float32)
    if x.shape != shape:
      raise ValueError(f'noise has shape {x.shape}; expected {shape}')
  return run_steps(
    diffusion, kind, apply_fn, variables, x, batch_noise, loop_key, model_kwargs, clip_denoised, eta,
    chunk=MAX_CHUNK if progress else None, progress=progress, desc=f'{kind} sampling',
  )  # fmt: skip


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
