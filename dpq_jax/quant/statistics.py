"""Input statistics of the quantized layers, recorded from forward passes of the model."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpq_jax.quant import layers as layers_lib


def activation_energy(model, variables: dict, spec, num_batches: int, seed: int, batch_size: int = 4) -> dict:
  """Mean squared input per input channel {module path: [in_features]} of every PQ/VQ layer, from
  `num_batches` forward passes on random latents, timesteps and labels."""
  import flax.linen as nn

  def energies(variables: dict, x: jax.Array, t: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    found: dict[str, jax.Array] = {}

    def record(next_fun, args, kwargs, context):
      module = context.module
      if isinstance(module, layers_lib.PQDense) and context.method_name == '__call__':
        inputs = args[0].reshape(-1, args[0].shape[-1]).astype(jnp.float32)
        found['/'.join(module.path)] = jnp.mean(jnp.square(inputs), axis=0)  # [in_features]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):  # runs while tracing: the energies leave the jit as outputs
      model.apply(variables, x, t, y)
    return found

  energies = jax.jit(energies)
  sums: dict[str, Any] = {}
  key = jax.random.key(seed)
  size = spec.input_size
  for i in range(num_batches):
    kx, kt, ky = jax.random.split(jax.random.fold_in(key, i), 3)
    x = jax.random.normal(kx, (batch_size, size, size, spec.in_channels))
    t = jax.random.randint(kt, (batch_size,), 0, 1000)
    y = jax.random.randint(ky, (batch_size,), 0, spec.num_classes + 1)
    for name, energy in energies(variables, x, t, y).items():
      sums[name] = sums.get(name, 0.0) + energy / num_batches
  return {k: np.asarray(v) for k, v in sums.items()}
