"""glibc's mmap threshold for a job: freed large host buffers go back to the system instead of staying in the heap.

glibc serves an allocation of at least M_MMAP_THRESHOLD bytes with its own mmap and unmaps it when freed; smaller
ones come from the heap, whose freed memory stays in the process. The threshold starts at 128 KiB but is dynamic:
each time a mmapped block is freed it rises to that block's size (up to 32 MiB on 64-bit). A job that frees a
per-block kernel of DiT-XL/2 (e.g. 1152 x 4608 float32 = 20 MiB) therefore serves every later buffer of up to that
size from the heap, and the heap's freed pieces stay resident: the DiT-XL/2 smoke chain's peak RSS was 8.32 GiB with
3.6 GiB of live arrays (README, "Measured again"). A fixed threshold (mallopt, which also turns the dynamic rule off)
keeps every buffer of at least that size in its own mapping: 7.41 GiB at 64 KiB, 7.84 GiB at 4 MiB on the same chain.
Each mapping costs page faults and zeroing (sys time) when it is made: on the DiT-S/8 smoke chain 64 KiB took 1.22x
the dynamic rule's wall time, 4 MiB 1.06x, and the digits demo's training (a 16M-parameter model whose 6-10 MB
kernels and Adam moments are new buffers every step) 1.11x at 4 MiB (README, "The DiT-XL/2 jobs now set it
themselves").

`config.malloc_mmap_threshold` (bytes) chooses it: 0 (DEFAULT: glibc's own rule) in the base config, FIXED (4 MiB) in
the DiT-XL/2 jobs (configs/common.py quant_job), whose host memory is what limits them. Where the environment already
sets MALLOC_MMAP_THRESHOLD_ (glibc reads it at start-up) that setting stays. Not glibc (macOS, musl): nothing is
done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = 'MALLOC_MMAP_THRESHOLD_'
M_MMAP_THRESHOLD = -3  # <malloc.h>
MAX = 32 * 1024 * 1024  # glibc refuses a threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit)
DEFAULT = 0  # glibc's dynamic rule
FIXED = 4 * 1024 * 1024  # the DiT-XL/2 jobs


def check(value) -> list[str]:
  """The config's problems with `value` (config.malloc_mmap_threshold), one line each."""
  if isinstance(value, bool) or not isinstance(value, int) or not (value == 0 or 4096 <= value <= MAX):
    return [
      f'config.malloc_mmap_threshold={value!r}: expected 0 (glibc decides) or a byte count in 4096..{MAX}'
      f' (default {DEFAULT})'
    ]
  return []


def _mallopt():
  if platform.libc_ver()[0] != 'glibc':
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    fn = libc.mallopt
  except (OSError, AttributeError):
    return None
  fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return fn


def configure(threshold: int) -> str:
  """Fixes glibc's mmap threshold at `threshold` bytes (0: leave it); returns what was done, in words."""
  if not threshold:
    return "glibc's dynamic mmap threshold"
  if os.environ.get(ENV):
    return f'{ENV}={os.environ[ENV]} from the environment'
  fn = _mallopt()
  if fn is None:
    return 'not glibc: allocator unchanged'
  if fn(M_MMAP_THRESHOLD, int(threshold)) != 1:
    return f'mallopt(M_MMAP_THRESHOLD, {threshold}) refused'
  return f'mmap threshold {threshold} bytes'
