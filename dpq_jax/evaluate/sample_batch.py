"""The sample batch of a run: labels, starting noise, resumable chunks and their assembly into npz files.

Every sample's noise comes from (seed, sample index) (see sampler.py), so a sample depends
neither on the batch it was drawn in nor on the device count. The run is chunked: chunk c holds
samples [c * batch_size, (c + 1) * batch_size), is saved atomically to DIR/samples/chunks/ and
skipped when the stage runs again, so a killed run restarted with the same config continues
where it stopped and ends with the same files. Chunks carry a fingerprint of the config and
the weights; chunks of another run are refused, never mixed in.

In a multi-process run the batch is sharded over the global mesh (every process samples its share),
the chunk is gathered, and only process 0 writes: chunks, the npz files and the grid. Which chunks
are done is process 0's view, broadcast, so every process samples the same ones. DIR may be gs://.

Outputs: DIR/samples/latents.npz (arr_0 float32 latents, arr_1 labels); with a VAE
(config.vae.checkpoint) also DIR/samples.npz, the ADM sample batch (arr_0 uint8 NHWC images,
arr_1 int64 labels) that the evaluate stage reads; DIR/samples_grid.png.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np

from dpq_jax import diffusion as diffusion_lib
from dpq_jax import distributed, errors, io_utils
from dpq_jax.evaluate import adm_npz, grid, sampler
from dpq_jax.quant import lineage

SAMPLES_FILE = 'samples.npz'  # DIR/samples.npz: the ADM batch
LATENTS_FILE = os.path.join('samples', 'latents.npz')
CHUNK_DIR = os.path.join('samples', 'chunks')
GRID_FILE = 'samples_grid.png'
GRID_IMAGES = 64


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
  """Starting noise of samples start..start+count-1, each from fold_in(key(seed), index)."""
  return sampler.initial_noise(sampler.sample_keys(seed, np.arange(start, start + count)), shape)


def make_diffusion(cfg: ml_collections.ConfigDict) -> diffusion_lib.GaussianDiffusion:
  return _diffusion(f'ddim{cfg.steps}' if cfg.sampler == 'ddim' else str(cfg.steps))


@functools.lru_cache(maxsize=8)
def _diffusion(respacing: str) -> diffusion_lib.GaussianDiffusion:
  # One object per respacing: jit hashes the process by identity, so this reuses compilations.
  return diffusion_lib.create_diffusion(respacing)


def generate(model, variables, cfg: ml_collections.ConfigDict, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Draws cfg.num_samples latents in memory: (N, H, W, C) float32 and their (N,) labels."""
  run = Run(model, variables, cfg, None, None)
  out = [distributed.to_host(run.latents(start, progress)) for start in range(0, cfg.num_samples, cfg.batch_size)]
  return np.concatenate(out)[: cfg.num_samples], run.labels


class Run:
  """One sampling job: its chunks, labels, sampler and (optional) decoder."""

  def __init__(self, model, variables, cfg, vae_cfg, vae):
    self.cfg = cfg
    self.labels = sample_labels(cfg.labels, cfg.num_samples, model.num_classes, cfg.seed)
    self.sampler = sampler.Sampler(
      model, variables, make_diffusion(cfg), cfg.sampler, cfg.cfg_scale, cfg.seed, sampler.data_mesh(),
      eta=cfg.get('eta', 0.0),
    )  # fmt: skip
    self.vae = vae  # (module, params) or None
    self.decode_batch = (vae_cfg.batch_size if vae_cfg is not None else 0) or cfg.batch_size
    if vae is not None:
      module, params = vae
      self.vae_params = jax.device_put(
        params, jax.sharding.NamedSharding(self.sampler.mesh, jax.sharding.PartitionSpec())
      )
      self.vae_module = module

  def chunk_indices(self, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and labels of the chunk at `start`, padded to batch_size (padding samples are dropped)."""
    idx = np.arange(start, start + self.cfg.batch_size)
    labels = self.labels[np.minimum(idx, self.cfg.num_samples - 1)]
    return idx, labels

  def latents(self, start: int, progress: bool) -> jax.Array:
    idx, labels = self.chunk_indices(start)
    return self.sampler(idx, labels, progress)

  def decode(self, latents: jax.Array) -> np.ndarray:
    out = []
    for i in range(0, latents.shape[0], self.decode_batch):
      z = jax.device_put(latents[i : i + self.decode_batch], self.sampler.batch_sharding)
      out.append(distributed.to_host(sampler.decode_to_uint8(self.vae_module, self.vae_params, z)))
    return np.concatenate(out)


def fingerprint(config: ml_collections.ConfigDict, variables, vae_params) -> dict:
  """What decides the samples: the sampling config, the model and VAE, and digests of their weights."""
  digest = lineage.weights_digest
  s = config.sample
  return {
    'sampler': s.sampler, 'steps': s.steps, 'cfg_scale': float(s.cfg_scale), 'eta': float(s.get('eta', 0.0)),
    'num_samples': s.num_samples, 'batch_size': s.batch_size, 'labels': str(s.labels), 'seed': s.seed,
    'model': config.model.name, 'input_size': config.model.input_size, 'dtype': config.model.dtype,
    'weights': digest(variables), 'vae': digest(vae_params),
  }  # fmt: skip


def _check_chunks(chunk_dir: str, meta: dict) -> None:
  path = os.path.join(chunk_dir, 'meta.json')
  if io_utils.exists(path):
    old = io_utils.read_json(path)
    if old != meta:
      diff = ', '.join(
        f'{k}: {old.get(k)!r} -> {meta.get(k)!r}' for k in sorted(set(old) | set(meta)) if old.get(k) != meta.get(k)
      )
      raise errors.ConfigError(
        f'{chunk_dir} holds chunks of a different sampling run ({diff}); delete it to start over, '
        "or rerun with that run's config to resume it"
      )
  else:
    io_utils.write_json(path, meta)


def chunks_done(chunk_dir: str, meta: dict, paths: list[str]) -> list[bool]:
  """Which chunks an earlier run left (checking they are this run's): process 0 looks, everyone gets its answer."""
  status = np.zeros(len(paths) + 1, np.int32)  # [refused, done per chunk]
  refused = None
  if distributed.is_writer():
    try:
      _check_chunks(chunk_dir, meta)
      status[1:] = [io_utils.exists(p) for p in paths]
    except errors.ConfigError as e:
      refused, status[0] = e, 1
  status = distributed.broadcast(status)  # also when refusing: the others must not wait for process 0
  if status[0]:
    raise refused or errors.ConfigError(f'{chunk_dir} holds chunks of a different sampling run (see process 0)')
  return [bool(x) for x in status[1:]]


def assemble(workdir: str, cfg, labels: np.ndarray, paths: list[str], with_images: bool) -> dict:
  """Streams the chunks into the final npz files and draws the grid; returns the report entries."""
  n = cfg.num_samples

  def blocks(key: str):
    left = n
    for path in paths:
      with io_utils.load_npz(path) as f:
        block = f[key][:left]
      left -= block.shape[0]
      yield block

  with io_utils.load_npz(paths[0]) as f:
    latent_shape = f['latents'].shape[1:]
    image_shape = f['images'].shape[1:] if with_images else None
  latents_path = os.path.join(workdir, LATENTS_FILE)
  adm_npz.write_streaming(
    latents_path,
    {'arr_0': ((n, *latent_shape), np.float32, blocks('latents')), 'arr_1': ((n,), np.int64, [labels])},
  )
  stats = _latent_stats(blocks('latents'))
  out = {'latents': LATENTS_FILE, 'grid': GRID_FILE, 'num_samples': n, **stats}
  if with_images:
    adm_npz.write_streaming(
      os.path.join(workdir, SAMPLES_FILE),
      {'arr_0': ((n, *image_shape), np.uint8, blocks('images')), 'arr_1': ((n,), np.int64, [labels])},
    )
    first = np.concatenate(list(_take(blocks('images'), GRID_IMAGES)))
    out.update(npz=SAMPLES_FILE, image_size=int(image_shape[0]))
    upscale = 1
  else:
    first = grid.latents_to_rgb(np.concatenate(list(_take(blocks('latents'), GRID_IMAGES))))
    upscale = 4
  grid.save_png(os.path.join(workdir, GRID_FILE), grid.make_grid(first), upscale=upscale)
  return out


def _take(blocks, count: int):
  for block in blocks:
    yield block[:count]
    count -= block.shape[0]
    if count <= 0:
      return


def _latent_stats(blocks) -> dict:
  total, sq, size, finite = 0.0, 0.0, 0, True
  for b in blocks:
    b = b.astype(np.float64)
    finite &= bool(np.isfinite(b).all())
    total, sq, size = total + b.sum(), sq + (b**2).sum(), size + b.size
  mean = total / size
  return {'latent_std': float(np.sqrt(max(sq / size - mean**2, 0.0))), 'finite': finite}
