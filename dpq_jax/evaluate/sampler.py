"""Sharded DDPM/DDIM sampling where every sample's randomness is its own.

Sample i draws its starting noise from `fold_in(key(seed), i)` and its step-t noise from
`fold_in(fold_in(key(seed), i), t + 1)`, each of one sample's shape. No draw spans the batch,
so a sample's trajectory does not depend on the batch it is in, the number of devices the
batch is split over, or where an interrupted run was resumed. The batch is sharded along a
1-D 'data' mesh over all devices (jit follows the input shardings; never pmap). The steps are
diffusion/sampling.py's loop (`run_steps`), the one `p_sample_loop`/`ddim_sample_loop` run, with
this per-sample noise.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpq_jax.diffusion import sampling
from dpq_jax.diffusion.sampling import KINDS as KINDS
from dpq_jax.diffusion.sampling import denoise_step as denoise_step  # x_{t-1} from explicit noise

Array = jax.Array
STEPS_PER_CALL = 25  # denoising steps per compiled call, so a progress bar can advance


def data_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all)."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))


def sample_keys(seed: int, indices: Array) -> Array:
  """(B,) per-sample keys fold_in(key(seed), index)."""
  root = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(indices, jnp.uint32))


def initial_noise(keys: Array, shape: tuple[int, ...]) -> Array:
  """x_T: (B, *shape), row b drawn from keys[b] alone."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def step_noise(keys: Array, t: Array, shape: tuple[int, ...]) -> Array:
  """Noise of step t: (B, *shape), row b drawn from fold_in(keys[b], t + 1)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t + 1), shape, jnp.float32))(keys)


class GuidedApply:
  """apply_fn(variables, x, t, y) of the (guided) model on a B-batch.

  With cfg_scale > 1 it runs the model's forward_with_cfg on [x; x] with labels [y; null], as the
  original sample.py does, and keeps the conditional half (the only one the original uses).
  Equal by value, so jit reuses one compilation for every sampler of the same model.
  """

  def __init__(self, model: Any, num_classes: int, cfg_scale: float):
    self.model, self.num_classes, self.cfg_scale = model, num_classes, float(cfg_scale)

  def _key(self):
    return (self.model, self.num_classes, self.cfg_scale)

  def __eq__(self, other):
    return isinstance(other, GuidedApply) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def __call__(self, variables: Any, x: Array, t: Array, y: Array) -> Array:
    if self.cfg_scale <= 1.0:
      return self.model.apply(variables, x, t, y)
    b = x.shape[0]
    xx = jnp.concatenate([x, x], axis=0)
    tt = jnp.concatenate([t, t], axis=0)
    yy = jnp.concatenate([y, jnp.full_like(y, self.num_classes)], axis=0)
    return self.model.apply(variables, xx, tt, yy, self.cfg_scale, method='forward_with_cfg')[:b]


def own_step_noise(keys: Array, t: Array, x_shape: tuple[int, ...]) -> Array:
  """sampling.run_steps' noise_fn: step t's noise drawn per sample (step_noise)."""
  return step_noise(keys, t, x_shape[1:])


class Sampler:
  """Draws latents for given sample indices and labels, the batch sharded over `mesh`.

  Args:
    model: the DiT module (full precision or quantized).
    variables: its variables; replicated over the mesh once.
    diffusion: the (respaced) process; DDIM uses a 'ddimN' respacing.
    kind: 'ddpm' or 'ddim'.
    cfg_scale: classifier-free guidance scale (1.0: none).
    seed: root of every sample's keys.
    mesh: 1-D 'data' mesh; the batch size must divide by its size.
    eta: DDIM noise scale.
  """

  def __init__(self, model, variables, diffusion, kind: str, cfg_scale: float, seed: int, mesh: Mesh, eta=0.0):
    if kind not in KINDS:
      raise ValueError(f'kind={kind!r}: expected one of {KINDS}')
    self.model, self.diffusion, self.kind, self.seed, self.mesh, self.eta = model, diffusion, kind, seed, mesh, eta
    self.apply_fn = GuidedApply(model, model.num_classes, cfg_scale)
    self.batch_sharding = NamedSharding(mesh, PartitionSpec('data'))
    self.variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    self.shape = (model.input_size, model.input_size, model.in_channels)

  def __call__(self, indices: np.ndarray, labels: np.ndarray, progress: bool = False) -> Array:
    """(B, H, W, C) float32 latents of samples `indices` with class `labels` (sharded along B)."""
    n = len(indices)
    if n % self.mesh.size:
      raise ValueError(f'a batch of {n} samples does not split over {self.mesh.size} devices')
    # Global arrays from the host values every process holds: this process fills its devices' rows,
    # so a multi-process mesh samples each process's share (device_put cannot reach other hosts).
    put = functools.partial(_global, self.batch_sharding)
    keys = _keys(self.seed, put(np.asarray(indices, np.uint32)))
    y = put(np.asarray(labels, np.int32))
    x = _noise(keys, self.shape)
    # masked=True: every step under lax.cond, as this sampler has always compiled it (same bits).
    return sampling.run_steps(
      self.diffusion, self.kind, self.apply_fn, self.variables, x, own_step_noise, keys, {'y': y},
      eta=self.eta, chunk=STEPS_PER_CALL, masked=True, progress=progress, desc=f'{self.kind} steps',
    )  # fmt: skip


def _global(sharding: NamedSharding, host: np.ndarray) -> Array:
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@functools.partial(jax.jit, static_argnums=(0,))
def _keys(seed: int, indices: Array) -> Array:
  return sample_keys(seed, indices)


@functools.partial(jax.jit, static_argnums=(1,))
def _noise(keys: Array, shape: tuple[int, ...]) -> Array:
  return initial_noise(keys, shape)


@functools.partial(jax.jit, static_argnums=(0,))
def decode_to_uint8(vae_module: Any, vae_params: Any, latents: Array) -> Array:
  """DiT latents -> uint8 images with the SD VAE (decode(latents / 0.18215), then to_uint8)."""
  from dpq_jax.models import vae as vae_lib

  return to_uint8(vae_lib.decode_latents(vae_module, vae_params, latents))


def to_uint8(images: Array) -> Array:
  """Images in [-1, 1] -> uint8 as DiT's sample_ddp.py: clamp(127.5 x + 128, 0, 255), truncated."""
  return jnp.clip(127.5 * images + 128.0, 0, 255).astype(jnp.uint8)
