"""JAX's persistent compilation cache for jobs: XLA executables kept on disk, so a rerun or a later stage that
compiles the same program (the k-means of a layer shape, a train step, a sampler chunk) loads it instead.

The cache holds the executables XLA would build again, so results are identical with or without it. Every
program is cached, however short its compile (JAX's own default skips those under 1 s: most of a job's
k-means programs). `config.compile_cache` chooses the directory:
  ''      the default: a cache already set up is used as it is (JAX_COMPILATION_CACHE_DIR, or jax.config as the
          tests' session cache sets it), or else $XDG_CACHE_HOME/dpq_jax/jax (~/.cache/dpq_jax/jax)
  'off'   no persistent cache
  a path  that directory (local; JAX also accepts gs:// there)
"""

from __future__ import annotations

import os

import jax

OFF = 'off'
ENV = 'JAX_COMPILATION_CACHE_DIR'


def default_dir() -> str:
  """$XDG_CACHE_HOME/dpq_jax/jax, or ~/.cache/dpq_jax/jax."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'dpq_jax', 'jax')


def resolve(setting: str | None) -> str | None:
  """The cache directory a `config.compile_cache` setting means (None: no cache); see the module docstring."""
  if setting is None or setting == OFF:
    return None
  if setting:
    return os.path.expanduser(setting)
  return os.environ.get(ENV) or jax.config.jax_compilation_cache_dir or default_dir()


def configure(directory: str | None) -> str | None:
  """Points JAX's persistent cache at `directory` (made if missing) and caches every program; None turns the
  cache off. Returns the directory. Safe to call again with another directory (the cache is re-opened)."""
  from jax.experimental.compilation_cache import compilation_cache

  current = jax.config.jax_compilation_cache_dir
  if directory is None:
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  if '://' not in directory:
    os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)  # no size floor, and none chosen for us
  if current and current != directory:
    compilation_cache.reset_cache()  # JAX opens the cache once: re-open it at the new directory
  return directory


def setup(setting: str | None) -> str | None:
  """configure(resolve(setting)), what a job calls before its first compile; with the default '' a cache that
  is already set (JAX_COMPILATION_CACHE_DIR, jax.config) is left as it is, thresholds included."""
  if setting == '' and (os.environ.get(ENV) or jax.config.jax_compilation_cache_dir):
    return jax.config.jax_compilation_cache_dir or os.environ[ENV]
  return configure(resolve(setting))
