"""The calibration data of a job: which source `config.data` means, its checks, and its (latents, labels).

Shared by the stages that read data: `calibrate` (the DDPM loss) and `quantize` (the input statistics of the
output-aware objective). The data-free source's samples are drawn once per workdir (DIR/data_free_latents.npz)
and reused by every stage and rerun that asks for the same ones.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpq_jax import distributed, errors, io_utils
from dpq_jax.calibrate import data as data_lib
from dpq_jax.models import load as load_lib
from dpq_jax.models import scan as scan_lib

DATA_FREE_FILE = 'data_free_latents.npz'


def effective_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config with data.source 'auto' resolved: imagenet for a checkpoint, the `train` stage's data for a job
  that trains its model (the demo), else data_free."""
  config = config.copy_and_resolve_references()
  data = config.data
  if data.source == 'auto':
    if config.model.init == 'checkpoint':
      data.source = 'imagenet'
    else:
      data.source = 'train' if 'train' in config.stages else 'data_free'
  return config


def check(data: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
  """Problems with config.data (after `effective_config`), each naming the value and what was expected."""
  if data.source not in data_lib.SOURCES:
    return [f'config.data.source={data.source!r}: expected one of {", ".join(data_lib.SOURCES)}']
  errs = []
  if data.source == 'npz' and not io_utils.isfile(data.path):
    errs.append(f'config.data.path={data.path!r}: no such npz file (config.data.source=npz)')
  if data.source == 'imagenet':
    cached = data.cache_dir and io_utils.isfile(os.path.join(data.cache_dir, data_lib.CACHE_INDEX))
    if not cached:
      if not data.data_dir or not io_utils.isdir(data.data_dir):
        errs.append(
          f'config.data.data_dir={data.data_dir!r}: no such directory; expected the tfds data dir holding a '
          'prepared imagenet2012 (or set config.data.source=data_free)'
        )
      from dpq_jax import convert

      vae = _vae_checkpoint(config)
      if not vae or (vae != convert.RANDOM_VAE and not io_utils.exists(vae)):
        errs.append(f'config.vae.checkpoint={vae!r}: the imagenet source encodes images with the SD VAE; give its path')
      if data.image_size != 8 * config.model.input_size:
        errs.append(
          f'config.data.image_size={data.image_size}: expected 8 x config.model.input_size = {8 * config.model.input_size}'
        )
  if data.source == 'data_free' and (data.num_samples < config.calibrate.batch_size or data.sample_steps < 1):
    errs.append(
      f'config.data.num_samples={data.num_samples}, sample_steps={data.sample_steps}: expected at least one '
      f'global batch ({config.calibrate.batch_size}) of samples and >= 1 DDIM step'
    )
  return errs


def _vae_checkpoint(config: ml_collections.ConfigDict) -> str:
  vae = config.get('vae')
  return str(vae.get('checkpoint', '')) if vae is not None else ''


def data_free_count(config: ml_collections.ConfigDict) -> int:
  """How many data-free samples a job draws: config.data.num_samples where `calibrate` trains on them, else only
  what the input statistics read (quant.stats_batches x stats_batch_size): each sample costs sample_steps forward
  passes of the fp model, so 1024 x 10 of them for 128 latents of statistics would cost 80x the statistics."""
  if 'calibrate' in config.stages:
    return config.data.num_samples
  return min(config.data.num_samples, config.quant.stats_batches * config.quant.stats_batch_size)


def resolve(config: ml_collections.ConfigDict, workdir: str, job) -> data_lib.ArraySource:
  """The (latents, labels) of config.data (after `effective_config`) for a stages.job.Job: its `train` data, its
  fp model's data-free samples (`data_free_count` of them), an npz, or ImageNet encoded once into a latent cache."""
  data = config.data
  if data.source == 'npz':
    latents, labels = data_lib.load_npz(data.path)
  elif data.source == 'train':
    if job.data is None:
      raise errors.ConfigError("config.data.source='train': expected a 'train' stage before 'calibrate'")
    latents, labels = job.data['train_images'], job.data['train_labels']
  elif data.source == 'data_free':
    path = os.path.join(workdir, DATA_FREE_FILE)
    num_samples = data_free_count(config)
    meta = np.asarray([num_samples, data.sample_steps, data.seed])
    latents = None
    if io_utils.exists(path):  # a resumed run reuses the samples instead of drawing them again
      with io_utils.load_npz(path) as f:
        if np.array_equal(f['meta'], meta):
          latents, labels = f['latents'], f['labels']
    if latents is None:
      scan = bool(config.model.get('scan_blocks', False))
      fp = job.spec.create(dtype=load_lib.DTYPES[config.model.dtype]).clone(scan_blocks=scan)
      fp, variables, _ = scan_lib.runnable(fp, {'params': job.fp_params})  # fp blocks always stack
      latents, labels = data_lib.sample_data_free(
        fp, variables['params'], num_samples, data.sample_steps, data.seed, data.sample_batch_size
      )
      if distributed.is_writer():
        io_utils.write_npz(path, latents=latents, labels=labels, meta=meta)
  else:
    cache = data.cache_dir or os.path.join(workdir, 'latent_cache')
    if not io_utils.isfile(os.path.join(cache, data_lib.CACHE_INDEX)):
      from dpq_jax import convert
      from dpq_jax.models import vae as vae_lib

      vae_cfg, vae_params = convert.load_vae(_vae_checkpoint(config))
      module = vae_lib.AutoencoderKL(vae_cfg)
      encode = jax.jit(lambda images: vae_lib.encode_images(module, vae_params, images))
      data_lib.encode_tfds(
        lambda images: np.asarray(encode(jnp.asarray(images))),
        cache,
        data_dir=data.data_dir,
        split=data.split,
        image_size=data.image_size,
        batch_size=data.encode_batch_size,
        max_examples=data.max_examples,
      )
    latents, labels = data_lib.load_cache(cache)
  size, channels = config.model.input_size, job.spec.in_channels
  if latents.shape[1:] != (size, size, channels):
    raise errors.ConfigError(
      f'calibration latents have shape {latents.shape[1:]}; the model expects ({size}, {size}, {channels})'
    )
  return data_lib.ArraySource(latents, labels)


def input_moments(
  config: ml_collections.ConfigDict, workdir: str, job, targets: dict[str, int], gradients: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(input second moments {layer: [num_subvectors, d, d]}, output-gradient energies {layer: [out_features]}, or
  {} without `gradients`) of `targets` {module path: d} under the job's fp model on config.data
  (quant/statistics.py: config.quant.stats_batches batches of stats_batch_size latents, guided inputs at
  config.quant.stats_guidance), reused from DIR/stats/ when they were collected for the same weights, data and
  settings (statistics with gradients serve a call without). The batch is split over config.calibrate.mesh's
  devices where it divides evenly."""
  from dpq_jax.calibrate import sharding
  from dpq_jax.quant import lineage, statistics

  config = effective_config(config)
  cfg = config.quant
  key = {
    'weights': lineage.weights_digest(job.fp_params),
    'model': config.model.to_dict(),
    'data': config.data.to_dict(),
    'stats': [cfg.stats_batches, cfg.stats_batch_size, cfg.seed, cfg.stats_guidance],
    **({'conditions': cfg.stats_conditions} if cfg.stats_conditions else {}),  # keeps the older keys
    'targets': targets,
  }
  if config.data.source == 'data_free':  # without a `calibrate` stage fewer samples: other statistics
    key['data_free_samples'] = data_free_count(config)

  def collect() -> dict[str, np.ndarray]:
    data = resolve(config, workdir, job)
    # scanned where the targets are alike in every block (statistics.scannable): one compiled block
    model = job.spec.create(dtype=load_lib.DTYPES[config.model.dtype]).clone(scan_blocks=bool(config.model.scan_blocks))
    mesh = None
    if jax.device_count() > 1:
      mesh = sharding.make_mesh(tuple(tuple(a) for a in config.calibrate.mesh))
      if (2 * cfg.stats_batch_size) % sharding.data_parallel_size(mesh):
        mesh = None
    batches = statistics.noisy_batches(
      data.latents, data.labels, cfg.stats_batches, cfg.stats_batch_size, job.spec.num_classes, cfg.seed
    )
    return statistics.input_moments(
      model, job.fp_params, targets, batches, cfg.stats_batches, mesh, gradients=gradients,
      guidance=cfg.stats_guidance, conditions=cfg.stats_conditions, seed=cfg.seed,
    )  # fmt: skip

  keys = [dict(key, gradients=True)] + ([] if gradients else [dict(key, gradients=False)])
  moments, grad2 = statistics.split(statistics.load_or_collect(workdir, keys, collect))
  return moments, grad2 if gradients else {}


def layer_statistics(
  config: ml_collections.ConfigDict, workdir: str, job, dims: dict[str, int], gradients: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray] | None]:
  """(moments {layer: [num_subvectors, d, d]}, output-gradient energies (`input_moments`), hessians {layer:
  [in_features, in_features]} or None) of the layers `dims` {module path: d}. With config.quant.error_feedback
  (PQ/VQ) the statistics are each layer's full input second moment H (`input_moments` with d = in_features: one
  position), the per-position moments its diagonal blocks; otherwise only the blocks are collected."""
  from dpq_jax.quant import feedback, surgery

  if not config.quant.error_feedback or config.quant.method == 'rtn':
    moments, grad2 = input_moments(config, workdir, job, dims, gradients)
    return moments, grad2, None
  in_features = {'/'.join(path): kernel.shape[0] for path, kernel in surgery.module_kernels(job.fp_params)}
  full, grad2 = input_moments(config, workdir, job, {name: in_features[name] for name in dims}, gradients)
  hessians = {name: h[0] for name, h in full.items()}  # [1, in, in] -> [in, in]
  return {name: feedback.blocks(h, dims[name]) for name, h in hessians.items()}, grad2, hessians
