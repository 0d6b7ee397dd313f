"""The demo's pictures: the samples of every row side by side, and the metrics against effective bits."""

from __future__ import annotations

import numpy as np

from dpq_jax import io_utils
from dpq_jax.evaluate import grid as grid_lib


def save_grid(path: str, images: dict[str, np.ndarray], per_row: int) -> None:
  """One line of samples per method (same labels and noise in every line), the name on the left."""
  from PIL import Image, ImageDraw

  scale, pad, label_w = 4, 2, 150
  lines = []
  for name, imgs in images.items():
    tiles = grid_lib.to_uint8(imgs[:per_row])[..., 0]  # [n, 8, 8] grey
    line = grid_lib.make_grid(tiles[..., None], nrow=per_row, padding=pad, pad_value=255)[..., 0]
    lines.append((name, line.repeat(scale, 0).repeat(scale, 1)))
  h, w = lines[0][1].shape
  canvas = Image.new('L', (label_w + w, h * len(lines)), 255)
  draw = ImageDraw.Draw(canvas)
  for i, (name, line) in enumerate(lines):
    canvas.paste(Image.fromarray(line), (label_w, i * h))
    draw.text((4, i * h + h // 2 - 6), name, fill=0)
  io_utils.atomic_write(path, lambda tmp: canvas.save(tmp, format='PNG'))


def save_plot(path: str, rows: list[dict], budget: float | None = None) -> None:
  """fd (log scale), class accuracy and eps error against effective bits per quantized weight (codes +
  codebooks + scales): a point per quantized row (marker: plain / compressed / calibrated / unscaled),
  the full-precision row as a dashed line, the compression budget (if any) as a dotted one; one legend."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fp = [r for r in rows if not r['effective_bits_per_quantized_weight']]
  quantized = [r for r in rows if r['effective_bits_per_quantized_weight']]
  colors = plt.get_cmap('tab20').colors
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
  for ax, key in zip(axes, ('fd', 'class_accuracy', 'eps_rel_error')):
    for i, row in enumerate(quantized):
      ax.scatter([row['effective_bits_per_quantized_weight']], [row['metrics'][key]], s=40, label=row['name'],
                 color=colors[i % len(colors)], marker=_marker(row['name']), zorder=3)  # fmt: skip
    for row in fp:
      ax.axhline(row['metrics'][key], color='k', linestyle='--', linewidth=1, label=f'{row["name"]} (32 bits)')
    if budget:
      ax.axvline(
        budget, color='grey', linestyle=':', linewidth=1, label=f'{32 / budget:.4g}x budget ({budget:.3f} bits)'
      )
    if key == 'fd':
      ax.set_yscale('log')
    ax.set_xlabel('effective bits per quantized weight (codebooks included)')
    ax.set_title(key + (' (log scale)' if key == 'fd' else ''))
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='center left', bbox_to_anchor=(0.83, 0.5), fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0, 0.83, 1))
  io_utils.atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=110))
  plt.close(fig)


def _marker(name: str) -> str:
  for part, marker in (('calibrated', '*'), ('compressed', 's'), ('unscaled', 'x')):
    if part in name:
      return marker
  return 'o'
