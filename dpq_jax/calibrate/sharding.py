"""Device mesh and FSDP-style shardings for calibration.

The mesh has a data-parallel axis and an `fsdp` axis (big_vision's naming); the batch is split
over both, and every array of the train state with a dimension divisible by the `fsdp` size
is split along its largest such dimension. The same rule covers params, their optimizer
moments and the integer codes, so nothing is replicated beyond what the mesh requires.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ('data', 'fsdp')  # the batch dimension is split over both axes


def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves (('data', -1), ('fsdp', 2)) against a device count; -1 takes what is left.

  Raises:
    ValueError naming the axes when they do not tile the devices.
  """
  names = tuple(str(a) for a, _ in axes)
  if sorted(names) != sorted(DATA_AXES):
    raise ValueError(
      f'config.calibrate.mesh={tuple(axes)}: expected the axes {DATA_AXES}, e.g. (("data", -1), ("fsdp", 1))'
    )
  sizes = [int(s) for _, s in axes]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.calibrate.mesh={tuple(axes)}: expected positive sizes and at most one -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'config.calibrate.mesh={tuple(axes)}: {num_devices} devices are not divisible by {known}')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f'config.calibrate.mesh={tuple(axes)}: {int(np.prod(sizes))} devices needed, {num_devices} present'
    )
  return names, tuple(sizes)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(axes, len(devices))
  return Mesh(np.asarray(devices, dtype=object).reshape(sizes), names)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """Splits the largest dimension divisible by fsdp_size over 'fsdp'; replicates otherwise."""
  if fsdp_size <= 1 or not shape:
    return P()
  candidates = [(n, -i) for i, n in enumerate(shape) if n % fsdp_size == 0 and n >= fsdp_size]
  if not candidates:
    return P()
  _, neg = max(candidates)
  spec: list[Any] = [None] * len(shape)
  spec[-neg] = 'fsdp'
  return P(*spec)


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
  """NamedShardings for a tree of arrays or ShapeDtypeStructs (FSDP over 'fsdp')."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over every device of the mesh."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in DATA_AXES]))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's rows of the batch into global arrays sharded over the data axes."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: jax.device_put(x, sharding), local)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * jax.process_count(),) + x.shape[1:]),
    local,
  )
