"""Stage `sample`: class-conditional samples with DDPM/DDIM and classifier-free guidance.

Every sample's starting noise is drawn from (seed, sample index), so a sample does not depend
on the batch size it was drawn in.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpq_jax import diffusion as diffusion_lib
from dpq_jax import io_utils
from dpq_jax.evaluate import grid


def check_config(cfg: ml_collections.ConfigDict, num_classes: int) -> list[str]:
  """Problems with config.sample, each a line naming the value and what was expected."""
  errors = []
  if cfg.sampler not in ('ddpm', 'ddim'):
    errors.append(f"config.sample.sampler={cfg.sampler!r}: expected 'ddpm' or 'ddim'")
  if not 1 <= cfg.steps <= 1000:
    errors.append(f'config.sample.steps={cfg.steps}: expected 1..1000 sampling steps')
  if cfg.cfg_scale < 1.0:
    errors.append(f'config.sample.cfg_scale={cfg.cfg_scale}: expected >= 1.0 (1.0 disables guidance)')
  if cfg.num_samples <= 0 or cfg.batch_size <= 0:
    errors.append(f'config.sample.num_samples={cfg.num_samples}, batch_size={cfg.batch_size}: expected positive')
  try:
    labels = sample_labels(cfg.labels, 1, num_classes, 0)
    del labels
  except ValueError as e:
    errors.append(str(e))
  return errors


def sample_labels(spec: str, n: int, num_classes: int, seed: int) -> np.ndarray:
  """'random' (uniform, from seed), 'balanced' (0, 1, ..., cycling) or '207,360,...' (cycled)."""
  if spec == 'random':
    return np.asarray(jax.random.randint(jax.random.key(seed), (n,), 0, num_classes), np.int32)
  if spec == 'balanced':
    return (np.arange(n) % num_classes).astype(np.int32)
  try:
    ids = [int(s) for s in str(spec).split(',')]
  except ValueError:
    ids = []
  if not ids or min(ids) < 0 or max(ids) >= num_classes:
    raise ValueError(f"config.sample.labels={spec!r}: expected 'random', 'balanced' or class ids in [0, {num_classes})")
  return np.resize(np.asarray(ids, np.int32), n)


def sample_noise(seed: int, start: int, count: int, shape: tuple[int, ...]) -> jax.Array:
  """Noise of samples start..start+count-1, each from fold_in(key(seed), index)."""
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(start, start + count))
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def generate(model, variables, cfg: ml_collections.ConfigDict, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Draws cfg.num_samples latents: (N, H, W, C) float32 and their (N,) labels."""
  respacing = f'ddim{cfg.steps}' if cfg.sampler == 'ddim' else str(cfg.steps)
  diffusion = diffusion_lib.create_diffusion(respacing)
  shape = (model.input_size, model.input_size, model.in_channels)
  labels = sample_labels(cfg.labels, cfg.num_samples, model.num_classes, cfg.seed)
  guided = cfg.cfg_scale > 1.0
  if guided:
    apply_fn = functools.partial(model.apply, method='forward_with_cfg')
  else:
    apply_fn = model.apply
  loop = diffusion.ddim_sample_loop if cfg.sampler == 'ddim' else diffusion.p_sample_loop
  out = []
  for start in range(0, cfg.num_samples, cfg.batch_size):
    n = min(cfg.batch_size, cfg.num_samples - start)
    z = sample_noise(cfg.seed, start, n, shape)
    y = jnp.asarray(labels[start : start + n])
    kwargs = {'y': y}
    if guided:
      z, y = diffusion_lib.cfg_batch(z, y, model.num_classes)
      kwargs = {'y': y, 'cfg_scale': cfg.cfg_scale}
    rng = jax.random.fold_in(jax.random.key(cfg.seed + 1), start)
    x = loop(apply_fn, variables, z.shape, rng, noise=z, model_kwargs=kwargs, progress=progress)
    if guided:
      x = diffusion_lib.split_cfg(x)
    out.append(np.asarray(x))
  return np.concatenate(out), labels


def run(config: ml_collections.ConfigDict, workdir: str, state: dict) -> dict:
  """Samples from state['model'] / state['variables'] and writes samples/latents.npz and a grid PNG."""
  latents, labels = generate(state['model'], state['variables'], config.sample)
  path = os.path.join(workdir, 'samples', 'latents.npz')
  io_utils.write_npz(path, arr_0=latents, arr_1=labels)
  grid_path = os.path.join(workdir, 'samples_grid.png')
  grid.save_png(grid_path, grid.make_grid(grid.latents_to_rgb(latents)), upscale=4)
  state['report'].setdefault('samples', {}).update(
    {
      'latents': os.path.relpath(path, workdir),
      'grid': os.path.relpath(grid_path, workdir),
      'num_samples': int(latents.shape[0]),
      'sampler': config.sample.sampler,
      'steps': config.sample.steps,
      'cfg_scale': config.sample.cfg_scale,
      'latent_std': float(latents.std()),
      'finite': bool(np.isfinite(latents).all()),
    }
  )
  state['report_notes'].append(
    'The grid shows latent channels 0-2 as RGB: decoding to pixels needs the SD-VAE (not yet ported).'
  )
  return state
