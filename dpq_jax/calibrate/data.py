"""Calibration data: (latents, labels) from ImageNet, from the fp model itself, or from an npz.

Every source ends as arrays latents (N, H, W, C) float32 (already scaled by the VAE factor
0.18215) and labels (N,) int32, read by one grain loader: a seeded shuffle over epochs,
sharded by JAX process, whose iterator state is a small JSON string saved with the checkpoint.

  imagenet   tfds `imagenet2012` via `tfds.data_source` (manual download dir, never downloads),
             ADM centre crop, encoded once by `encode_fn` and cached as .npy shards
  data_free  samples of the full-precision model (a few DDIM steps) with random labels
  npz        an npz with `latents`/`labels` (or the sample stage's `arr_0`/`arr_1`)
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np

from dpq_jax import io_utils

SOURCES = ('imagenet', 'data_free', 'npz', 'train')  # train: the data the job's `train` stage used
CACHE_INDEX = 'index.json'


class ArraySource:
  """grain random-access source over in-memory (or memory-mapped) arrays."""

  def __init__(self, latents: np.ndarray, labels: np.ndarray):
    if latents.ndim != 4 or labels.shape != latents.shape[:1]:
      raise ValueError(f'latents {latents.shape} / labels {labels.shape}: expected (N, H, W, C) and (N,)')
    self.latents = latents
    self.labels = labels

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def __repr__(self) -> str:
    # grain checks a restored iterator against repr(source): make it a fingerprint of the data.
    digest = hashlib.sha256(np.ascontiguousarray(self.labels).tobytes())
    digest.update(np.ascontiguousarray(self.latents[: min(len(self), 4)]).tobytes())
    return f'ArraySource(n={len(self)}, latents={tuple(self.latents.shape[1:])}, sha256={digest.hexdigest()[:16]})'

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {'latents': np.asarray(self.latents[index], np.float32), 'labels': np.int32(self.labels[index])}


def train_loader(
  source: ArraySource, batch_size: int, seed: int, read_options: grain.ReadOptions | None = None
) -> grain.DataLoader:
  """Endless seeded shuffle, this process's shard, batches of `batch_size` rows (per process)."""
  if len(source) < batch_size * jax.process_count():
    raise ValueError(f'{len(source)} calibration examples; a global batch needs {batch_size * jax.process_count()}')
  sampler = grain.samplers.IndexSampler(
    num_records=len(source),
    shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
    shuffle=True,
    num_epochs=None,
    seed=seed,
  )
  return grain.DataLoader(
    data_source=source,
    sampler=sampler,
    operations=[grain.transforms.Batch(batch_size, drop_remainder=True)],
    read_options=read_options,
  )


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(latents, labels) of an npz holding `latents`/`labels` or ADM-style `arr_0`/`arr_1`."""
  if not io_utils.isfile(path):
    raise FileNotFoundError(f'config.data.path={path!r}: no such npz file')
  with io_utils.load_npz(path) as f:
    for lk, yk in (('latents', 'labels'), ('arr_0', 'arr_1')):
      if lk in f and yk in f:
        latents, labels = f[lk], f[yk]
        break
    else:
      raise ValueError(f'{path}: expected arrays latents/labels (or arr_0/arr_1); found {", ".join(f.files)}')
  if latents.ndim != 4 or labels.shape != latents.shape[:1]:
    raise ValueError(f'{path}: latents {latents.shape} / labels {labels.shape}: expected (N, H, W, C) and (N,)')
  return latents.astype(np.float32), labels.astype(np.int32)


# -- data-free: the fp model's own samples ---------------------------------------------------


def sample_data_free(
  model, params: dict, num: int, steps: int, seed: int, batch_size: int = 16, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """`num` DDIM samples (eta 0, `steps` steps, no guidance) of the fp model with uniform random labels."""
  from dpq_jax import diffusion as diffusion_lib

  diffusion = diffusion_lib.create_diffusion(f'ddim{steps}')
  key = jax.random.key(seed)
  labels = np.asarray(jax.random.randint(jax.random.fold_in(key, 0), (num,), 0, model.num_classes), np.int32)
  shape = (model.input_size, model.input_size, model.in_channels)
  apply_fn = model.apply  # one callable object, so every batch reuses the compilation
  variables = {'params': params}
  out = []
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=num, desc='data-free latents', unit='sample')
  for start in range(0, num, batch_size):
    n = min(batch_size, num - start)
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 1), i), shape))(
      jnp.arange(start, start + n)
    )
    x = diffusion.ddim_sample_loop(
      apply_fn, variables, (n,) + shape, jax.random.fold_in(key, 2), noise=noise,
      model_kwargs={'y': jnp.asarray(labels[start : start + n])},
    )  # fmt: skip
    out.append(np.asarray(x, np.float32))
    if bar is not None:
      bar.update(n)
  if bar is not None:
    bar.close()
  return np.concatenate(out), labels


# -- ImageNet: tfds data_source -> ADM centre crop -> encode_fn -> cached .npy shards -----------


def center_crop_arr(image: np.ndarray, image_size: int) -> np.ndarray:
  """ADM/DiT centre crop: halve with a box filter while >= 2x, bicubic to the short side, crop."""
  from PIL import Image

  pil = Image.fromarray(np.asarray(image, np.uint8))
  while min(*pil.size) >= 2 * image_size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = image_size / min(*pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  arr = np.asarray(pil.convert('RGB'))
  top = (arr.shape[0] - image_size) // 2
  left = (arr.shape[1] - image_size) // 2
  return arr[top : top + image_size, left : left + image_size]


class _CropAndScale(grain.transforms.Map):
  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(record['image'])
    if image.ndim == 2 or image.shape[-1] == 1:
      image = np.broadcast_to(image.reshape(image.shape[:2] + (1,)), image.shape[:2] + (3,))
    crop = center_crop_arr(image, self.image_size)
    return {'image': crop.astype(np.float32) / 127.5 - 1.0, 'label': np.int32(record['label'])}


def encode_tfds(
  encode_fn: Callable[[np.ndarray], np.ndarray],
  cache_dir: str,
  *,
  data_dir: str,
  name: str = 'imagenet2012',
  split: str = 'train',
  image_size: int = 256,
  batch_size: int = 32,
  max_examples: int = 0,
  progress: bool = True,
) -> str:
  """Encodes a tfds image dataset once into cache_dir; returns cache_dir.

  Args:
    encode_fn: images (B, S, S, 3) float32 in [-1, 1] -> latents (B, S/8, S/8, 4), already
      multiplied by the VAE scale 0.18215.
    cache_dir: gets latents-PPPPP.npy / labels-PPPPP.npy per process and index.json last.
    data_dir: tfds data dir holding the prepared dataset (nothing is downloaded).
    max_examples: encode only the first n examples of the split (0: all).
  """
  import tensorflow_datasets as tfds

  if io_utils.exists(os.path.join(cache_dir, CACHE_INDEX)):
    return cache_dir
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  num = len(source) if max_examples <= 0 else min(max_examples, len(source))
  sampler = grain.samplers.IndexSampler(
    num_records=num, shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=False), shuffle=False, num_epochs=1
  )
  loader = grain.DataLoader(
    data_source=source,
    sampler=sampler,
    operations=[_CropAndScale(image_size), grain.transforms.Batch(batch_size, drop_remainder=False)],
  )
  latents, labels = [], []
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=-(-num // jax.process_count()), desc=f'encode {name}/{split}', unit='image')
  for batch in loader:
    latents.append(np.asarray(encode_fn(batch['image']), np.float32))
    labels.append(np.asarray(batch['label'], np.int32))
    if bar is not None:
      bar.update(len(batch['label']))
  if bar is not None:
    bar.close()
  pid = jax.process_index()
  for stem, arrays in (('latents', latents), ('labels', labels)):
    arr = np.concatenate(arrays)
    io_utils.atomic_write(os.path.join(cache_dir, f'{stem}-{pid:05d}.npy'), lambda tmp, a=arr: _save_npy(tmp, a))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices('dpq_jax encode_tfds')
  if pid == 0:
    index = {'name': name, 'split': split, 'image_size': image_size, 'num_examples': num,
             'shards': jax.process_count()}  # fmt: skip
    io_utils.write_json(os.path.join(cache_dir, CACHE_INDEX), index)
  return cache_dir


def _save_npy(path: str, arr: np.ndarray) -> None:
  with open(path, 'wb') as f:  # a file object: np.save would append '.npy' to a bare name
    np.save(f, arr)


def load_cache(cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """(latents, labels) of an encode_tfds cache, memory-mapped (a gs:// cache is downloaded to local temp first)."""
  path = os.path.join(cache_dir, CACHE_INDEX)
  if not io_utils.isfile(path):
    raise FileNotFoundError(f'{cache_dir}: no complete latent cache ({CACHE_INDEX} missing)')
  shards = io_utils.read_json(path)['shards']

  def local(name: str) -> str:
    return io_utils.local_copy(os.path.join(cache_dir, name))  # mmap needs a real file

  latents = [np.load(local(f'latents-{i:05d}.npy'), mmap_mode='r') for i in range(shards)]
  labels = [np.load(local(f'labels-{i:05d}.npy')) for i in range(shards)]
  if shards == 1:
    return latents[0], labels[0]
  return np.concatenate(latents), np.concatenate(labels)
