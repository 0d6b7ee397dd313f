"""Sharded DDPM/DDIM sampling where every sample's randomness is its own.

Sample i draws its starting noise from `fold_in(key(seed), i)` and its step-t noise from
`fold_in(fold_in(key(seed), i), t + 1)`, each of one sample's shape. No draw spans the batch,
so a sample's trajectory does not depend on the batch it is in, the number of devices the
batch is split over, or where an interrupted run was resumed. The batch is sharded along a
1-D 'data' mesh over all devices (jit follows the input shardings; never pmap).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpq_jax.diffusion import gaussian_diffusion

Array = jax.Array
KINDS = ('ddpm', 'ddim')
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


def _at(table: np.ndarray, t: Array, x: Array) -> Array:
  return jnp.asarray(table, jnp.float32)[t].reshape((-1,) + (1,) * (x.ndim - 1))


def denoise_step(
  diffusion: gaussian_diffusion.GaussianDiffusion,
  kind: str,
  out: dict[str, Array],
  x: Array,
  t: Array,
  noise: Array,
  eta: float | Array = 0.0,
) -> Array:
  """x_{t-1} from p_mean_variance's `out` and explicit noise: the same update as the process's
  p_sample (DDPM) / ddim_sample (DDIM), which draw their noise from one key for the batch."""
  nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))  # no noise at t == 0
  if kind == 'ddpm':
    return out['mean'] + nonzero * jnp.exp(0.5 * out['log_variance']) * noise
  eps = (_at(diffusion.sqrt_recip_alphas_cumprod, t, x) * x - out['pred_xstart']) / _at(
    diffusion.sqrt_recipm1_alphas_cumprod, t, x
  )
  alpha_bar = _at(diffusion.alphas_cumprod, t, x)
  alpha_bar_prev = _at(diffusion.alphas_cumprod_prev, t, x)
  sigma = eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
  mean = out['pred_xstart'] * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(1 - alpha_bar_prev - sigma**2) * eps
  return mean + nonzero * sigma * noise


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


@functools.partial(jax.jit, static_argnames=('diffusion', 'apply_fn', 'kind'))
def run_steps(diffusion, apply_fn, kind, variables, x, keys, y, indices, eta):
  """Runs the (descending) step indices; -1 marks padding that leaves x unchanged."""
  shape = x.shape[1:]

  def step(x, i):
    t = jnp.full((x.shape[0],), i, jnp.int32)
    out = diffusion.p_mean_variance(apply_fn, variables, x, t, False, {'y': y})
    return denoise_step(diffusion, kind, out, x, t, step_noise(keys, i, shape), eta).astype(x.dtype)

  def body(x, i):
    return jax.lax.cond(i >= 0, step, lambda x, i: x, x, i), None

  return jax.lax.scan(body, x, indices)[0]


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
    num_steps = self.diffusion.num_timesteps
    per_call = min(STEPS_PER_CALL, num_steps)
    order = np.arange(num_steps)[::-1]
    order = np.concatenate([order, np.full(-num_steps % per_call, -1)]).astype(np.int32)
    bar = None
    if progress:
      from tqdm.auto import tqdm

      bar = tqdm(total=num_steps, desc=f'{self.kind} steps', unit='step', leave=False)
    for start in range(0, len(order), per_call):
      chunk = order[start : start + per_call]
      x = run_steps(
        self.diffusion, self.apply_fn, self.kind, self.variables, x, keys, y, jnp.asarray(chunk),
        jnp.float32(self.eta),
      )  # fmt: skip
      if bar is not None:
        x.block_until_ready()
        bar.update(int((chunk >= 0).sum()))
    if bar is not None:
      bar.close()
    return x


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
