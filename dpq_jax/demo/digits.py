"""The 8x8 handwritten digits that scikit-learn ships in its wheel (1797 images, 10 classes).

Images are (N, 8, 8, 1) float32 in [-1, 1] (the dataset's 0..16 ink levels scaled), NHWC as the
DiT takes them; a fixed, class-stratified split keeps `heldout_per_class` images of every class
apart for the metrics (the DiT and the classifier train on the rest).
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 10
IMAGE_SIZE = 8


def load(heldout_per_class: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
  """{'train_images', 'train_labels', 'heldout_images', 'heldout_labels'}; deterministic in seed."""
  from sklearn.datasets import load_digits

  data = load_digits()
  images = (data.images.astype(np.float32) / 8.0 - 1.0)[..., None]  # [N, 8, 8, 1] in [-1, 1]
  labels = data.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  heldout = np.zeros(len(labels), bool)
  for c in range(NUM_CLASSES):
    idx = np.flatnonzero(labels == c)
    if heldout_per_class > len(idx) - 1:
      raise ValueError(f'heldout_per_class={heldout_per_class}: class {c} has only {len(idx)} images')
    heldout[rng.choice(idx, heldout_per_class, replace=False)] = True
  return {
    'train_images': images[~heldout],
    'train_labels': labels[~heldout],
    'heldout_images': images[heldout],
    'heldout_labels': labels[heldout],
  }
