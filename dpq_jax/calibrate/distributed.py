"""Multi-host start-up: `jax.distributed.initialize()` when the environment describes a job.

Must run before anything touches a JAX backend. Recognised environments:
  JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID[, JAX_LOCAL_DEVICE_IDS])  explicit
  DPQ_DISTRIBUTED=1                        let JAX detect the cluster (Cloud TPU pods, SLURM, Open MPI)
  SLURM_NTASKS > 1 / OMPI_COMM_WORLD_SIZE > 1 / MEGASCALE_NUM_SLICES / a multi-host TPU_WORKER_HOSTNAMES
Nothing else is touched, so a single-process run starts exactly as before.
"""

from __future__ import annotations

import os

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
