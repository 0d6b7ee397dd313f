"""Sample grids as PNG."""

from __future__ import annotations

import numpy as np

from dpq_jax import io_utils


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2, pad_value: int = 255) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*H', cols*W', C) uint8 image, torchvision's layout."""
  n, h, w, c = images.shape
  ncol = min(nrow, n)
  nrows = -(-n // ncol)
  grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, ncol)
    y, x = padding + r * (h + padding), padding + q * (w + padding)
    grid[y : y + h, x : x + w] = img
  return grid


def to_uint8(images: np.ndarray, low: float = -1.0, high: float = 1.0) -> np.ndarray:
  """Float images in [low, high] -> uint8, as ADM/DiT do (x * 127.5 + 128, clipped)."""
  x = (np.asarray(images, np.float32) - low) / (high - low) * 255.0 + 0.5
  return np.clip(x, 0, 255).astype(np.uint8)


def latents_to_rgb(latents: np.ndarray) -> np.ndarray:
  """Shows SD latents (N, h, w, 4) without a VAE: channels 0-2 as RGB, each image min-max scaled."""
  x = np.asarray(latents[..., :3], np.float32)
  lo = x.min(axis=(1, 2, 3), keepdims=True)
  hi = x.max(axis=(1, 2, 3), keepdims=True)
  return to_uint8((x - lo) / np.maximum(hi - lo, 1e-8), 0.0, 1.0)


def save_png(path: str, image: np.ndarray, upscale: int = 1) -> None:
  from PIL import Image

  if upscale > 1:
    image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
  io_utils.atomic_write(path, lambda tmp: Image.fromarray(image.squeeze()).save(tmp, format='PNG'))
