"""Timestep respacing: which steps of the base process a shorter sampler keeps."""

from __future__ import annotations

import numpy as np

_FORMATS = '"N", "N1,N2,..." or "ddimN"'


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> list[int]:
  """The base-process timesteps to keep, exactly as the original's space_timesteps.

  The base process is cut into len(section_counts) equal sections (the first ones one step
  longer when it does not divide), and section i keeps section_counts[i] evenly spaced steps.

  Args:
    num_timesteps: steps of the base process.
    section_counts: "250" (250 evenly spaced steps), "10,15,20" (steps per section), a list
      of ints, or "ddimN" (the DDIM paper's integer stride giving exactly N steps).

  Returns:
    The kept timesteps, ascending.

  Raises:
    ValueError: for an unparsable string or counts that do not fit.
  """
  if isinstance(section_counts, str):
    if section_counts.startswith('ddim'):
      try:
        desired = int(section_counts[len('ddim') :])
      except ValueError:
        raise ValueError(f'timestep_respacing={section_counts!r}: expected "ddimN" with an integer N') from None
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return list(range(0, num_timesteps, stride))
      raise ValueError(f'timestep_respacing={section_counts!r}: cannot create exactly {desired} steps from '
                       f'{num_timesteps} with an integer stride')  # fmt: skip
    try:
      section_counts = [int(x) for x in section_counts.split(',')]
    except ValueError:
      raise ValueError(f'timestep_respacing={section_counts!r}: expected {_FORMATS}') from None
  if not section_counts:
    raise ValueError(f'timestep_respacing={section_counts!r}: expected {_FORMATS}')
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
  """Betas of the process that jumps between the kept steps, keeping alphas_cumprod there.

  Args:
    alphas_cumprod: (T,) float64 of the base process.
    use_timesteps: ascending kept timesteps.

  Returns:
    (len(use_timesteps),) float64 betas, computed as the original's SpacedDiffusion does.
  """
  kept = alphas_cumprod[np.asarray(use_timesteps)]
  prev = np.concatenate([[1.0], kept[:-1]])
  return 1.0 - kept / prev
