"""The persistent compilation cache (dpq_jax/compile_cache.py): a second process loads what the first compiled."""

import json
import os
import subprocess
import sys

import jax

from dpq_jax import compile_cache
from tests import helpers

# One tiny quantize_stack (the quantize stage's program) in a fresh process with the cache at argv[1]; prints the
# persistent cache's hits and misses (jax.monitoring events) and the codes.
_CHILD = """
import json, sys
import jax
from jax import monitoring
from dpq_jax import compile_cache
from dpq_jax.quant import pq
from tests import helpers
compile_cache.configure(sys.argv[1])
events = {'hits': 0, 'misses': 0}
def listen(event, **_):
  for name in events:
    if event == f'/jax/compilation_cache/cache_{name}':
      events[name] += 1
monitoring.register_event_listener(listen)
out = pq.quantize_stack(helpers.heavy_tailed((2, 16, 24), 3), pq.CodebookSpec(8, 4), jax.random.key(0), 2)
print(json.dumps({**events, 'codes': out.codes.tolist()}))
"""


def _child(cache_dir: str) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}  # not the session's cache settings
  done = subprocess.run([sys.executable, '-c', _CHILD, cache_dir], cwd=helpers.ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=True)  # fmt: skip
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_loads_what_the_first_compiled(tmp_path):
  cache = str(tmp_path / 'cache')
  first = _child(cache)
  entries = sorted(os.listdir(cache))
  assert first['misses'] > 0 and first['hits'] == 0 and entries  # every program written, short compiles included
  second = _child(cache)
  assert second['hits'] == first['misses'] and second['misses'] == 0
  assert sorted(os.listdir(cache)) == entries  # nothing new compiled
  assert second['codes'] == first['codes']


def test_settings_resolve(monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert compile_cache.default_dir() == os.path.join(str(tmp_path), 'dpq_jax', 'jax')
  assert compile_cache.resolve('off') is None
  assert compile_cache.resolve(str(tmp_path / 'c')) == str(tmp_path / 'c')
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / 'env'))
  assert compile_cache.resolve('') == str(tmp_path / 'env')


def test_default_keeps_a_cache_already_set():
  """The test session's cache (conftest) stays as it is when a job runs with the default setting."""
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  assert before[0]  # conftest set one
  assert compile_cache.setup('') == before[0]
  assert (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) == before
