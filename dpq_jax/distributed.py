"""Multi-host start-up: `jax.distributed.initialize()` when the environment describes a job.

Must run before anything touches a JAX backend. Recognised environments:
  JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID[, JAX_LOCAL_DEVICE_IDS])  explicit
  DPQ_DISTRIBUTED=1                        let JAX detect the cluster (Cloud TPU pods, SLURM, Open MPI)
  SLURM_NTASKS > 1 / OMPI_COMM_WORLD_SIZE > 1 / MEGASCALE_NUM_SLICES / a multi-host TPU_WORKER_HOSTNAMES
Nothing else is touched, so a single-process run starts exactly as before.

Every process runs every stage; process 0 alone writes (`is_writer`). `sync`, `broadcast` and
`to_host` are the few cross-process steps the stages need around their writes.
"""

from __future__ import annotations

import os

import numpy as np

_done = False


def _wants_distributed(env: os._Environ | dict) -> bool:
  if env.get('JAX_COORDINATOR_ADDRESS') or env.get('DPQ_DISTRIBUTED', '') in ('1', 'true', 'yes'):
    return True
  for key in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if env.get(key, '1').isdigit() and int(env.get(key, '1')) > 1:
      return True
  return bool(env.get('MEGASCALE_NUM_SLICES')) or ',' in env.get('TPU_WORKER_HOSTNAMES', '')


def maybe_initialize() -> bool:
  """Initialises jax.distributed once when the environment asks for it; returns whether it did."""
  global _done
  if _done or not _wants_distributed(os.environ):
    return _done
  import jax

  kwargs = {}
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    kwargs['coordinator_address'] = os.environ['JAX_COORDINATOR_ADDRESS']
    if os.environ.get('JAX_NUM_PROCESSES'):
      kwargs['num_processes'] = int(os.environ['JAX_NUM_PROCESSES'])
    if os.environ.get('JAX_PROCESS_ID'):
      kwargs['process_id'] = int(os.environ['JAX_PROCESS_ID'])
    if os.environ.get('JAX_LOCAL_DEVICE_IDS'):
      kwargs['local_device_ids'] = [int(i) for i in os.environ['JAX_LOCAL_DEVICE_IDS'].split(',')]
  if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU collectives across processes
  jax.distributed.initialize(**kwargs)
  _done = True
  return True


# -- one writer per job: every stage writes through these ------------------------------------


def is_writer() -> bool:
  """Whether this process writes the job's outputs: process 0 only, so a multi-process run writes each file once."""
  import jax

  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process got here (nothing in a single-process run)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def broadcast(value):
  """Process 0's `value` (a numpy array or pytree of them) on every process."""
  import jax

  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(value))


def to_host(tree):
  """numpy copies of a tree of arrays, whole on every process: arrays spanning several processes are
  gathered (one collective: every process must call this), local ones are copied."""
  import jax

  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  leaves, treedef = jax.tree.flatten(tree)
  spread = [i for i, x in enumerate(leaves) if not getattr(x, 'is_fully_addressable', True)]
  out = [None if i in spread else np.asarray(jax.device_get(x)) for i, x in enumerate(leaves)]
  if spread:
    gathered = multihost_utils.process_allgather([leaves[i] for i in spread], tiled=True)
    for i, x in zip(spread, gathered):
      out[i] = np.asarray(x)
  return jax.tree.unflatten(treedef, out)
