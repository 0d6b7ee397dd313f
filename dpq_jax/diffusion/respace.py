"""Timestep respacing: which steps of the base process a shorter sampler keeps."""

from __future__ import annotations

import numpy as np


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> list[int]:
  """Sorted timesteps of the base process to keep, exactly as the original's space_timesteps.

  section_counts: e.g. "250" (250 evenly spaced steps), "10,15,20" (per equal section), or
  "ddimN" (the DDIM paper's integer stride giving exactly N steps).
  """
  if isinstance(section_counts, str):
    if section_counts.startswith('ddim'):
      desired = int(section_counts[len('ddim') :])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return list(range(0, num_timesteps, stride))
      raise ValueError(f'timestep_respacing={section_counts!r}: cannot create exactly {desired} steps from '
                       f'{num_timesteps} with an integer stride')  # fmt: skip
    try:
      section_counts = [int(x) for x in section_counts.split(',')]
    except ValueError:
      raise ValueError(f'timestep_respacing={section_counts!r}: expected "N", "N1,N2,..." or "ddimN"') from None
  size_per, extra = divmod(num_timesteps, len(section_counts))
  start, steps = 0, []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count or count < 1:
      raise ValueError(f'timestep_respacing: cannot divide a section of {size} steps into {count}')
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):  # accumulated, not stride * j: the original's float rounding
      steps.append(start + round(cur))
      cur += stride
    start += size
  return sorted(set(steps))


def respaced_betas(alphas_cumprod: np.ndarray, use_timesteps: list[int]) -> np.ndarray:
  """Betas of the process that jumps between the kept steps, preserving alphas_cumprod there."""
  kept = alphas_cumprod[np.asarray(use_timesteps)]
  prev = np.concatenate([[1.0], kept[:-1]])
  return 1.0 - kept / prev
