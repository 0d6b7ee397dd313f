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


PANELS = ('class_logprob', 'fd', 'eps_rel_error', 'class_accuracy')


def _errors(row: dict, key: str) -> list[list[float]] | None:
  """matplotlib's [[below], [above]] from the row's 95% interval, or None without one."""
  ci = row.get('ci95', {}).get(key)
  value = row['metrics'][key]
  return [[max(value - ci[0], 0.0)], [max(ci[1] - value, 0.0)]] if ci else None


BITS_AXIS = 'effective bits per quantized weight (codebooks included)'


def _references(ax, key: str, fp: list[dict], budget: float | None, title: str, xlabel: str = BITS_AXIS) -> None:
  """fp as a dashed line with its 95% interval shaded, the budget (if any) as a dotted one; axis labels, log fd."""
  for row in fp:
    ax.axhline(row['metrics'][key], color='k', linestyle='--', linewidth=1, label=f'{row["name"]} (32 bits)')
    if row.get('ci95', {}).get(key):
      ax.axhspan(*row['ci95'][key], color='k', alpha=0.08)
  if budget:
    ax.axvline(budget, color='grey', linestyle=':', linewidth=1, label=f'{32 / budget:.4g}x budget ({budget:.3f} bits)')
  if key == 'fd':
    ax.set_yscale('log')
  ax.set_xlabel(xlabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)


def _save(fig, path: str, handles: list, labels: list[str]) -> None:
  fig.legend(handles, labels, loc='center left', bbox_to_anchor=(0.86, 0.5), fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0, 0.86, 1))
  io_utils.atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=100))
  import matplotlib.pyplot as plt

  plt.close(fig)


def save_plot(path: str, rows: list[dict], budget: float | None = None) -> None:
  """The classifier's log-probability of the asked class, fd (log scale), eps error and class accuracy against
  effective bits per quantized weight (codes + codebooks + scales): a point per quantized row with its 95%
  interval (marker: plain / compressed / calibrated / unscaled), the full-precision row as a dashed line with
  its interval shaded, the compression budget (if any) as a dotted one; one legend."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fp = [r for r in rows if not r['effective_bits_per_quantized_weight']]
  quantized = [r for r in rows if r['effective_bits_per_quantized_weight']]
  colors = plt.get_cmap('tab20').colors
  fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS) + 2, 4.4))
  for ax, key in zip(axes, PANELS):
    for i, row in enumerate(quantized):
      color = colors[i % len(colors)]
      x, y = row['effective_bits_per_quantized_weight'], row['metrics'][key]
      ax.errorbar([x], [y], yerr=_errors(row, key), fmt='none', ecolor=color, capsize=3, zorder=2)
      ax.scatter([x], [y], s=40, label=row['name'], color=color, marker=_marker(row['name']), zorder=3)
    _references(ax, key, fp, budget, f'{key}{" (log scale)" if key == "fd" else ""}, 95% intervals')
  handles, labels = axes[0].get_legend_handles_labels()
  _save(fig, path, handles, labels)


def save_sweep_plot(path: str, rows: list[dict], budget: float | None = None) -> None:
  """The rate-distortion sweep: one panel per metric (columns), uncalibrated above and calibrated below; a line per
  method and objective (solid: output, dashed: weight) through its points at their measured effective bits, with
  the 95% interval as a band; fp as a dashed black line with its interval shaded, the budget as a dotted line."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fp = [r for r in rows if r['name'] == 'fp']
  swept = [r for r in rows if r.get('sweep')]
  methods = sorted({r['sweep']['method'] for r in swept})
  colors = dict(zip(methods, plt.get_cmap('tab10').colors))
  fig, axes = plt.subplots(2, len(PANELS), figsize=(5 * len(PANELS) + 2, 8.4), squeeze=False)
  for row_i, calibrated in enumerate((False, True)):
    for ax, key in zip(axes[row_i], PANELS):
      lines = sorted({(r['sweep']['method'], r['sweep']['objective']) for r in swept})
      for method, objective in lines:
        pts = sorted(
          (r for r in swept if (r['sweep']['method'], r['sweep']['objective'], r['sweep']['calibrated'])
           == (method, objective, calibrated)),
          key=lambda r: r['effective_bits_per_quantized_weight'],
        )  # fmt: skip
        if not pts:
          continue
        x = [r['effective_bits_per_quantized_weight'] for r in pts]
        style = '-' if objective == 'output' else '--'
        _band(ax, x, pts, key, colors[method], f'{method} ({objective})', style)
      _references(ax, key, fp, budget, f'{key}{" (log)" if key == "fd" else ""}, {("un", "")[calibrated]}calibrated')
  handles, labels = axes[0][0].get_legend_handles_labels()
  for h, lab in zip(*axes[1][0].get_legend_handles_labels()):
    if lab not in labels:
      handles.append(h)
      labels.append(lab)
  _save(fig, path, handles, labels)


def save_curves(path: str, rows: list[dict]) -> None:
  """The calibration-budget curves: one panel per metric, a line per calibrated row through its scores after
  0..N calibration steps of one run (x: steps, symmetric-log so that 0 shows) with the 95% interval as a band,
  fp as a dashed line with its interval shaded; the legend names each row's effective bits."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fp = [r for r in rows if not r['effective_bits_per_quantized_weight']]
  curved = [r for r in rows if r.get('curve')]
  colors = plt.get_cmap('tab10').colors
  fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS) + 2, 4.4))
  for ax, key in zip(axes, PANELS):
    for i, row in enumerate(curved):
      pts = sorted(row['curve'], key=lambda p: p['step'])
      x = [p['step'] for p in pts]
      bits = row['effective_bits_per_quantized_weight']
      label = f'{row["name"]} ({bits:.2f} bits)' if bits else row['name']
      _band(ax, x, pts, key, colors[i % len(colors)], label)
    ax.set_xscale('symlog', linthresh=10)
    _references(ax, key, fp, None, f'{key}{" (log)" if key == "fd" else ""} vs calibration steps, 95% intervals',
                xlabel='calibration steps (one run per row)')  # fmt: skip
  handles, labels = axes[0].get_legend_handles_labels()
  _save(fig, path, handles, labels)


def _band(ax, x: list[float], pts: list[dict], key: str, color, label: str, style: str = '-') -> None:
  """A line through the points' metric `key` at `x`, with their 95% intervals as a band where every point has one."""
  ax.plot(x, [p['metrics'][key] for p in pts], style, marker='o', color=color, label=label, zorder=3)
  if all(p.get('ci95', {}).get(key) for p in pts):
    lo, hi = zip(*(p['ci95'][key] for p in pts))
    ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)


def _marker(name: str) -> str:
  for part, marker in (('calibrated', '*'), ('compressed', 's'), ('unscaled', 'x')):
    if part in name:
      return marker
  return 'o'
