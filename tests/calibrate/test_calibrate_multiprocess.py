"""Two local JAX processes (CPU, gloo collectives) run the unchanged train step on a mesh that
spans both (fsdp 2: params split across processes, batch split across processes) and match the
single-device step; then the full loop runs there, with one metrics writer and a shared checkpoint."""

import json

import pytest

from tests import helpers

WORKER = r"""
import json, os, sys
import numpy as np
from dpq_jax import distributed
assert distributed.maybe_initialize()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
import jax
from dpq_jax.calibrate import data as data_lib, loop, sharding
from dpq_jax.quant import layers
from tests.calibrate import tiny

pid, workdir = jax.process_index(), sys.argv[1]
assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
setup = tiny.tiny_setup()
x, y = tiny.tiny_data(8)
many, s2, f2, _ = tiny.build(tiny.calib_config(lr=1e-2, mesh=(('data', 1), ('fsdp', 2))), setup, devices=jax.devices())
one, s1, f1, _ = tiny.build(tiny.calib_config(lr=1e-2, mesh=(('data', 1), ('fsdp', 1))), setup, devices=jax.local_devices())
cb = s2['params']['blocks_0']['mlp']['fc1']['codebooks']
assert not cb.is_fully_addressable and cb.addressable_shards[0].data.size == cb.size // 2
rows = slice(4 * pid, 4 * pid + 4)  # this process's half of the global batch
out = []
for _ in range(2):
  s2, m2 = many(s2, f2, sharding.global_batch({'latents': x[rows], 'labels': y[rows]}, jax.sharding.Mesh(
    np.asarray(jax.devices()).reshape(1, 2), ('data', 'fsdp'))))
  s1, m1 = one(s1, f1, {'latents': x, 'labels': y})
  out.append((float(m2['loss']), float(m1['loss'])))
from jax.experimental import multihost_utils
p2 = multihost_utils.process_allgather(s2['params'], tiled=True)
p1 = jax.device_get(s1['params'])
err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)))
fp, rules, params, q = setup
xs, ys = tiny.tiny_data(16)
res = loop.calibrate(
  dynamic_model=fp.clone(dense=layers.dense_factory(rules, 'dynamic')),
  frozen_model=fp.clone(dense=layers.dense_factory(rules, 'frozen')),
  params=q.variables()['params'], quant=q.variables()['quant'], fp_params=params, source=data_lib.ArraySource(xs, ys),
  cfg=tiny.calib_config(steps=3, batch_size=4, checkpoint_every=2, log_every=1, mesh=(('data', 1), ('fsdp', 2))),
  num_classes=tiny.NUM_CLASSES, workdir=workdir, progress=False,
)
print('RESULT ' + json.dumps({'pid': pid, 'losses': out, 'max_param_diff': err, 'loop_steps': res['steps']}))
"""


@pytest.mark.slow  # three compilations in each of two processes
def test_two_processes_match_one_device(tmp_path):
  port = helpers.free_port()
  procs = []
  for pid in range(2):
    env = dict(JAX_PLATFORMS='cpu', XLA_FLAGS='', JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(pid))  # fmt: skip
    procs.append(helpers.start_python('-c', WORKER, tmp_path, env=env))
  results = helpers.process_results(procs, timeout=420, what='two-process run')
  for r in results:
    for sharded, single in r['losses']:
      assert abs(sharded - single) <= 2e-5 * abs(single), r
    assert r['max_param_diff'] < 1e-5, r
    assert r['loop_steps'] == 3
  assert results[0]['losses'] == results[1]['losses']  # one global computation, seen by both
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(s)['step'] for s in lines] == [1, 2, 3]  # written once, by process 0
  assert (tmp_path / 'checkpoints' / '3').is_dir()
