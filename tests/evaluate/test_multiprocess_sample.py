"""Two local JAX processes (CPU, gloo collectives) run load -> quantize -> sample (tiny DiT, tiny VAE):
the sampler and the decoder are sharded over both processes' devices, and only process 0 writes. Each process gets its own
workdir (as hosts with their own disks would), so the test sees who wrote what: process 1's stays
absent, process 0's equals a single-process run's."""

import json
import os

import numpy as np

from tests import helpers

WORKER = r"""
import json, os, sys
from dpq_jax import distributed
distributed.maybe_initialize()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, if set
import jax
from dpq_jax import pipeline
from tests import helpers

config = helpers.tiny_pipeline_config()
config.sample.num_samples, config.sample.batch_size, config.sample.labels = 6, 4, 'random'  # one padded chunk
config.vae.checkpoint = os.environ['TINY_VAE']
workdir = sys.argv[1 + jax.process_index()]
report = pipeline.run(config, workdir)
print('RESULT ' + json.dumps({'pid': jax.process_index(), 'processes': jax.process_count(),
                              'devices': jax.device_count(), 'bytes': report['bytes']}))
"""


def _start(args, vae, **env):
  return helpers.start_python('-c', WORKER, *args, env=dict(JAX_PLATFORMS='cpu', XLA_FLAGS='', TINY_VAE=vae, **env))


def test_two_processes_sample_like_one_and_only_process_0_writes(tmp_path, tiny_vae_dir):
  port = helpers.free_port()
  w0, w1, single = tmp_path / 'p0', tmp_path / 'p1', tmp_path / 'single'
  env = {'JAX_COORDINATOR_ADDRESS': f'localhost:{port}', 'JAX_NUM_PROCESSES': '2'}
  procs = [_start([str(w0), str(w1)], tiny_vae_dir, JAX_PROCESS_ID=str(i), **env) for i in range(2)]
  procs.append(_start([str(single)], tiny_vae_dir))
  results = helpers.process_results(procs, timeout=300, what='a sampling process')
  assert [(r['pid'], r['processes'], r['devices']) for r in results] == [(0, 2, 2), (1, 2, 2), (0, 1, 1)]
  assert results[0]['bytes'] == results[1]['bytes'] == results[2]['bytes']  # every process measured the artifact

  assert not w1.exists()  # process 1 wrote nothing, not even its workdir
  files = sorted(os.path.relpath(os.path.join(r, f), w0) for r, _, fs in os.walk(w0) for f in fs)
  assert files == sorted(os.path.relpath(os.path.join(r, f), single) for r, _, fs in os.walk(single) for f in fs)
  assert {'samples/latents.npz', 'samples.npz', 'samples_grid.png', 'quantized/index.json', 'report.json'} <= set(files)
  for name in os.listdir(w0 / 'quantized'):  # k-means ran on each process alike; process 0 stored it
    assert (w0 / 'quantized' / name).read_bytes() == (single / 'quantized' / name).read_bytes(), name
  with np.load(w0 / 'samples' / 'latents.npz') as a, np.load(single / 'samples' / 'latents.npz') as b:
    assert a['arr_0'].shape == (6, 8, 8, 4)
    np.testing.assert_array_equal(a['arr_1'], b['arr_1'])
    # Each sample's noise is its own; only the batch split (2 devices vs 1) changes float summation order.
    np.testing.assert_allclose(a['arr_0'], b['arr_0'], rtol=1e-4, atol=1e-5)
  with np.load(w0 / 'samples.npz') as a, np.load(single / 'samples.npz') as b:  # decoded on both processes
    assert a['arr_0'].shape == (6, 16, 16, 3) and a['arr_0'].dtype == np.uint8
    np.testing.assert_array_equal(a['arr_1'], b['arr_1'])
    assert np.abs(a['arr_0'].astype(int) - b['arr_0']).max() <= 1  # uint8 truncation of ~1e-5 differences
  report = json.loads((w0 / 'report.json').read_text())
  assert report['samples']['devices'] == 2 and report['samples']['num_samples'] == 6
