"""glibc's mmap threshold (dpq_jax/host_memory.py): freed large buffers leave the process's resident memory."""

import json
import os
import platform
import subprocess
import sys

import pytest

from dpq_jax import host_memory
from tests import helpers

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc malloc only')

# In a fresh process: free one 24 MiB buffer (glibc's dynamic threshold rises to its size), then allocate 24 buffers of
# 8 MiB and free all but the last (which pins the heap's top, as a live array does in a job). Prints VmRSS growth
# in MiB over the process's start (read from /proc, not from the allocator).
_CHILD = """
import json, sys
import numpy as np
from dpq_jax import host_memory
def rss():
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) for l in f if l.startswith('VmRSS:')) / 1024
done = host_memory.configure(int(sys.argv[1]))
base = rss()
big = np.ones(24 << 18, np.float32)  # 24 MiB (under glibc's 32 MiB ceiling of the dynamic rule)
del big
bufs = [np.ones(8 << 18, np.float32) for _ in range(24)]  # 8 MiB each, touched
last = bufs[-1]
del bufs
print(json.dumps({'done': done, 'growth_mib': rss() - base, 'last': float(last[0])}))
"""


def _child(threshold: int, env: dict | None = None) -> dict:
  env = {k: v for k, v in os.environ.items() if k != host_memory.ENV} | (env or {})
  done = subprocess.run([sys.executable, '-c', _CHILD, str(threshold)], cwd=helpers.ROOT, env=env,
                        capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_fixed_threshold_returns_freed_buffers_that_glibcs_dynamic_one_keeps():
  dynamic = _child(0)
  fixed = _child(host_memory.FIXED)
  assert fixed['done'] == f'mmap threshold {host_memory.FIXED} bytes'
  # glibc's own rule keeps the 23 freed 8 MiB buffers in the heap (184 MiB): the behaviour the setting is for.
  assert dynamic['growth_mib'] > 150, dynamic
  # Fixed at 4 MiB (the DiT-XL/2 jobs' setting) each 8 MiB buffer is its own mapping: only the live one (8 MiB) stays
  # resident.
  assert fixed['growth_mib'] < 40, fixed


def test_the_environments_setting_is_left_alone():
  out = _child(host_memory.FIXED, env={host_memory.ENV: '33554432'})
  assert out['done'] == f'{host_memory.ENV}=33554432 from the environment'
  assert out['growth_mib'] > 150, out  # glibc honours the variable: no mallopt over it


@pytest.mark.parametrize('value', [-1, 100, 1 << 26, 1.5, True, '65536'])
def test_a_bad_threshold_is_one_line(value):
  (line,) = host_memory.check(value)
  assert line.startswith(f'config.malloc_mmap_threshold={value!r}: expected 0')


def test_a_bad_threshold_fails_the_job_before_any_work(tmp_path):
  workdir = tmp_path / 'w'
  r = helpers.run_main(workdir, '--config.malloc_mmap_threshold=-1')
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith('error:')]
  assert r.returncode == 2 and len(errors) == 1 and 'malloc_mmap_threshold=-1' in errors[0], r.stderr
  assert not workdir.exists()


def test_the_dit_xl_jobs_fix_the_threshold_and_the_rest_keep_glibcs_rule():
  # Host memory limits the DiT-XL/2 jobs on a CPU; elsewhere (the demo) the page faults of a fixed threshold cost wall
  # time (README: 1.11x the demo's training) for memory that is not short.
  from dpq_jax.configs import digits, dit_xl_1bit, dit_xl_2bit, smoke

  for module in (dit_xl_1bit, dit_xl_2bit):
    assert module.get_config().malloc_mmap_threshold == host_memory.FIXED, module.__name__
    assert not host_memory.check(module.get_config().malloc_mmap_threshold)
  for module in (digits, smoke):
    assert module.get_config().malloc_mmap_threshold == 0, module.__name__
