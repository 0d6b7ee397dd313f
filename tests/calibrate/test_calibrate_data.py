"""Calibration data: ADM centre crop, the tfds -> grain -> encode -> cache path on mock ImageNet,
the npz source, and the grain loader's determinism and resumable state."""

import json

import numpy as np
import pytest
from PIL import Image

from dpq_jax.calibrate import data as data_lib


def _stand_in_encoder(images: np.ndarray) -> np.ndarray:
  """(B, 32, 32, 3) in [-1, 1] -> (B, 4, 4, 4): 8x8 mean pooling plus a fourth channel (a VAE stand-in)."""
  b, s, _, _ = images.shape
  pooled = images.reshape(b, s // 8, 8, s // 8, 8, 3).mean((2, 4))
  return np.concatenate([pooled, pooled.mean(-1, keepdims=True)], -1) * 0.18215


def test_center_crop_is_adm():
  rng = np.random.default_rng(0)
  # Short side already the target: no resize (bicubic at scale 1 is the identity), a centre slice.
  img = rng.integers(0, 256, (32, 50, 3), dtype=np.uint8)
  np.testing.assert_array_equal(data_lib.center_crop_arr(img, 32), img[:, 9:41])
  # >= 2x the target: box-filter halvings first (each output pixel the mean of a 2x2 block).
  big = np.kron(rng.integers(0, 256, (16, 24, 3)), np.ones((4, 4, 1))).astype(np.uint8)  # (64, 96)
  out = data_lib.center_crop_arr(big, 16)
  np.testing.assert_array_equal(out, big[::4, ::4][:, 4:20])
  # Any size and a grey image: the exact shape, and grey stays grey.
  grey = np.full((37, 91, 3), 77, np.uint8)
  out = data_lib.center_crop_arr(grey, 24)
  assert out.shape == (24, 24, 3) and (out == 77).all()
  # Against PIL directly for a 1.5x image (one bicubic resize to the short side, then the crop).
  img = rng.integers(0, 256, (48, 60, 3), dtype=np.uint8)
  want = np.asarray(Image.fromarray(img).resize((40, 32), resample=Image.BICUBIC))[:, 4:36]
  np.testing.assert_array_equal(data_lib.center_crop_arr(img, 32), want)


def test_tfds_imagenet_is_encoded_once_into_the_cache(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  cache = tmp_path / 'cache'
  with tfds.testing.mock_data(num_examples=10):
    source = tfds.data_source('imagenet2012', split='train', data_dir=str(tmp_path / 'tfds'), download=False)
    records = [source[i] for i in range(10)]
    data_lib.encode_tfds(_stand_in_encoder, str(cache), data_dir=str(tmp_path / 'tfds'), image_size=32,
                         batch_size=4, max_examples=7, progress=False)  # fmt: skip
  latents, labels = data_lib.load_cache(str(cache))
  assert latents.shape == (7, 4, 4, 4) and labels.dtype == np.int32
  np.testing.assert_array_equal(labels, [int(r['label']) for r in records[:7]])
  for i in (0, 6):  # in order, each the stand-in encoding of the ADM crop of record i
    image = data_lib.center_crop_arr(records[i]['image'], 32).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(latents[i], _stand_in_encoder(image[None])[0], rtol=1e-6)
  assert json.loads((cache / 'index.json').read_text())['num_examples'] == 7
  # A complete cache is reused: no dataset is needed any more.
  assert data_lib.encode_tfds(_stand_in_encoder, str(cache), data_dir='/nonexistent') == str(cache)


def test_npz_source_reads_both_layouts(tmp_path):
  x = np.random.default_rng(0).standard_normal((5, 4, 4, 4)).astype(np.float32)
  y = np.arange(5)
  np.savez(tmp_path / 'a.npz', latents=x, labels=y)
  np.savez(tmp_path / 'b.npz', x, y)  # arr_0 / arr_1, as the sample stage writes
  for name in ('a.npz', 'b.npz'):
    lx, ly = data_lib.load_npz(str(tmp_path / name))
    np.testing.assert_array_equal(lx, x)
    np.testing.assert_array_equal(ly, y)
  np.savez(tmp_path / 'c.npz', images=x)
  with pytest.raises(ValueError, match='expected arrays latents/labels'):
    data_lib.load_npz(str(tmp_path / 'c.npz'))


def test_loader_is_a_seeded_shuffle_over_epochs_and_resumes_from_its_state():
  n, batch = 10, 4
  source = data_lib.ArraySource(np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 4)),
                                np.arange(n))  # fmt: skip
  it = iter(data_lib.train_loader(source, batch, seed=3))
  seen = [next(it)['labels'] for _ in range(5)]
  flat = np.concatenate(seen)
  for epoch in range(2):  # every example once per epoch
    assert sorted(flat[epoch * n : (epoch + 1) * n]) == list(range(n))
  assert not np.array_equal(flat[:n], flat[n : 2 * n])  # a fresh permutation each epoch
  again = iter(data_lib.train_loader(source, batch, seed=3))
  for b in seen[:2]:
    np.testing.assert_array_equal(next(again)['labels'], b)
  state = again.get_state()
  resumed = iter(data_lib.train_loader(source, batch, seed=3))
  resumed.set_state(state)
  for b in seen[2:]:
    np.testing.assert_array_equal(resumed.__next__()['labels'], b)
  other = iter(data_lib.train_loader(source, batch, seed=4))
  assert not np.array_equal(np.concatenate([next(other)['labels'] for _ in range(2)]), flat[:8])
