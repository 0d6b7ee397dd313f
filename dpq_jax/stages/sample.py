"""Stage `sample`: class-conditional samples of the job's model with DDPM/DDIM and classifier-free guidance.

Resumable in chunks, sharded over every process's devices (evaluate/sample_batch.py). Outputs:
DIR/samples/latents.npz (arr_0 float32 latents, arr_1 labels); with a VAE (config.vae.checkpoint) also
DIR/samples.npz, the ADM sample batch (arr_0 uint8 NHWC images, arr_1 int64 labels) that the evaluate
stage reads; DIR/samples_grid.png.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections

from dpq_jax import convert, distributed, errors, integrity, io_utils
from dpq_jax.evaluate import sample_batch, sampler
from dpq_jax.models import vae as vae_lib
from dpq_jax.stages.job import Job


def check(config: ml_collections.ConfigDict) -> list[str]:
  """Problems with config.sample (and config.vae), each a line naming the value and what was expected."""
  cfg, num_classes, vae, errors = config.sample, config.model.num_classes, config.get('vae'), []
  if cfg.sampler not in sampler.KINDS:
    errors.append(f"config.sample.sampler={cfg.sampler!r}: expected 'ddpm' or 'ddim'")
  if not 1 <= cfg.steps <= 1000:
    errors.append(f'config.sample.steps={cfg.steps}: expected 1..1000 sampling steps')
  if cfg.cfg_scale < 1.0:
    errors.append(f'config.sample.cfg_scale={cfg.cfg_scale}: expected >= 1.0 (1.0 disables guidance)')
  if cfg.num_samples <= 0 or cfg.batch_size <= 0:
    errors.append(f'config.sample.num_samples={cfg.num_samples}, batch_size={cfg.batch_size}: expected positive')
  elif cfg.batch_size % jax.device_count():
    errors.append(
      f'config.sample.batch_size={cfg.batch_size}: expected a multiple of the {jax.device_count()} devices '
      '(the batch is split evenly over them)'
    )
  if not 0.0 <= cfg.get('eta', 0.0) <= 1.0:
    errors.append(f'config.sample.eta={cfg.eta}: expected 0..1 (DDIM noise scale)')
  try:
    sample_batch.sample_labels(cfg.labels, 1, num_classes, 0)
  except ValueError as e:
    errors.append(str(e))
  if vae is not None and vae.checkpoint:
    if vae.checkpoint != convert.RANDOM_VAE and not io_utils.isdir(vae.checkpoint):
      errors.append(
        f'config.vae.checkpoint={vae.checkpoint!r}: expected a converted VAE or diffusers AutoencoderKL '
        "directory, or 'random' (smoke runs)"
      )
    if vae.batch_size < 0 or (vae.batch_size and vae.batch_size % jax.device_count()):
      errors.append(
        f'config.vae.batch_size={vae.batch_size}: expected 0 (the sample batch) or a multiple of '
        f'the {jax.device_count()} devices'
      )
  return errors


@contextlib.contextmanager
def _resumable(chunk_dir: str) -> Iterator[None]:
  """A write that fails (a full disk) says that the finished chunks stay for the rerun to resume from."""
  try:
    yield
  except errors.WriteError as e:
    e.args = (f'{e}; the samples finished so far stay in {chunk_dir}: the same command resumes from them',)
    raise


def run(config: ml_collections.ConfigDict, workdir: str, job: Job) -> Job:
  """Samples from the job's model in resumable chunks; writes the ADM batch and a grid."""
  from tqdm.auto import tqdm

  cfg = config.sample
  model, variables = job.runtime(config)
  vae_cfg = config.get('vae')
  vae = None
  if vae_cfg is not None and vae_cfg.checkpoint:
    vae_config, vae_params = convert.load_vae(vae_cfg.checkpoint)
    if vae_config.latent_channels != model.in_channels:
      raise errors.ConfigError(
        f'config.vae.checkpoint={vae_cfg.checkpoint!r} has {vae_config.latent_channels} latent channels; '
        f'the model samples {model.in_channels}'
      )
    vae = (vae_lib.AutoencoderKL(vae_config), jax.tree.map(jnp.asarray, vae_params))
  batch = sample_batch.Run(model, variables, cfg, vae_cfg, vae)
  chunk_dir = os.path.join(workdir, sample_batch.CHUNK_DIR)
  starts = list(range(0, cfg.num_samples, cfg.batch_size))
  paths = [os.path.join(chunk_dir, f'{s:08d}.npz') for s in starts]
  finished = sample_batch.chunks_done(chunk_dir, sample_batch.fingerprint(config, variables, vae and vae[1]), paths)
  todo = [(s, p) for s, p, f in zip(starts, paths, finished) if not f]
  writer = distributed.is_writer()
  sampling_s, done = 0.0, 0
  with _resumable(chunk_dir), tqdm(total=cfg.num_samples, initial=cfg.num_samples - sum(min(cfg.batch_size, cfg.num_samples - s) for s, _ in todo),
            desc='sampling', unit='img', disable=not writer) as bar:  # fmt: skip
    for start, path in todo:
      t0 = time.perf_counter()
      latents = batch.latents(start, progress=writer)  # sharded over every process's devices
      arrays = {'latents': distributed.to_host(latents)}
      n = min(cfg.batch_size, cfg.num_samples - start)
      integrity.check_finite(arrays, f'samples {start}..{start + n - 1} (not written: the model makes NaN/Inf)')
      if vae is not None:
        arrays['images'] = batch.decode(latents)
      sampling_s += time.perf_counter() - t0
      if writer:
        io_utils.write_npz(path, labels=batch.chunk_indices(start)[1], **arrays)
      done += n
      bar.update(n)

  report = {}
  if writer:  # the others hold no chunks (they may not even see process 0's files)
    with _resumable(chunk_dir):
      report = sample_batch.assemble(workdir, cfg, batch.labels, paths, vae is not None)
    io_utils.rmtree(chunk_dir)  # the npz files now hold everything
  report.update(
    sampler=cfg.sampler, steps=cfg.steps, cfg_scale=cfg.cfg_scale, labels=str(cfg.labels), seed=cfg.seed,
    devices=jax.device_count(), resumed_chunks=len(paths) - len(todo),
    images_per_s=round(done / sampling_s, 4) if done else None,
    vae=vae_cfg.checkpoint if vae is not None else '',
  )  # fmt: skip
  job.report.setdefault('samples', {}).update(report)
  if vae is not None:
    job.samples = os.path.join(workdir, sample_batch.SAMPLES_FILE)
  else:
    job.notes.append(
      'No VAE (config.vae.checkpoint is empty): no ADM samples.npz was written and the grid shows latent '
      'channels 0-2 as RGB.'
    )
  return job
