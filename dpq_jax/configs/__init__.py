"""The shipped job configs: one file per job whose get_config(arg) returns an ml_collections.ConfigDict.

They live in the package so that an installed dpq_jax runs them by name (`--config=dit_xl_1bit:smoke`, README
"Running jobs"); configs/ at the repository's top level re-exports each under its old path
(`--config=configs/dit_xl_1bit.py`, `from configs import common`).
"""

from __future__ import annotations

import os

DIR = os.path.dirname(os.path.abspath(__file__))
_NOT_JOBS = ('__init__', 'common')  # common: the base config and argument parser every job builds on


def names() -> list[str]:
  """The shipped job configs by name ('digits', 'dit_xl_1bit', ...)."""
  stems = (f[:-3] for f in os.listdir(DIR) if f.endswith('.py'))
  return sorted(s for s in stems if s not in _NOT_JOBS)


def path(name: str) -> str:
  """The file of shipped config `name`."""
  return os.path.join(DIR, f'{name}.py')


def resolve(value: str) -> str:
  """`--config`'s value with a shipped config's path for `NAME[.py][:arg]` or `configs/NAME[.py][:arg]` when no
  such file exists here; any other value unchanged. Raises ValueError naming the shipped configs when a bare
  name is none of them."""
  file, sep, arg = value.partition(':')
  folder, name = os.path.split(file)
  if os.path.exists(file) or folder not in ('', 'configs'):
    return value
  stem = name.removesuffix('.py')
  if stem not in names():
    raise ValueError(
      f'--config={value}: no such file, and no shipped config {stem!r}; shipped: {", ".join(names())} '
      '(README "Running jobs")'
    )
  return f'{path(stem)}{sep}{arg}'
