"""Round-to-nearest (RTN) scalar quantization: the scalar baseline PQ is compared against.

Per output channel (optionally per group of `group_size` input channels), a uniform grid of
2**bits levels spanning the group's [min, max]:
  scale = (max - min) / (2**bits - 1),  q = clip(round((w - min) / scale), 0, 2**bits - 1),
  w_hat = min + q * scale.
Weights are in PyTorch layout [out_features, in_features].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _groups(w: jax.Array, group_size: int | None) -> jax.Array:
  out_features, in_features = w.shape
  g = group_size or in_features
  if g <= 0 or in_features % g:
    raise ValueError(f'group_size={group_size}: expected a positive divisor of in_features={in_features}')
  return w.reshape(out_features, in_features // g, g)  # [out, num_groups, group_size]


def quantize(w: jax.Array, bits: int, group_size: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """w [out, in] -> (codes [out, num_groups, group_size] int32, scale, offset [out, num_groups, 1])."""
  if not 1 <= bits <= 16:
    raise ValueError(f'bits={bits}: expected 1..16')
  wg = _groups(w.astype(jnp.float32), group_size)
  lo = wg.min(-1, keepdims=True)
  hi = wg.max(-1, keepdims=True)
  levels = 2**bits - 1
  scale = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
  codes = jnp.clip(jnp.round((wg - lo) / scale), 0, levels).astype(jnp.int32)
  return codes, scale, lo


def dequantize(codes: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
  """Inverse of `quantize`: [out, num_groups, group_size] -> [out, in] float32."""
  w = offset + codes.astype(jnp.float32) * scale
  return w.reshape(w.shape[0], -1)


def quantize_dequantize(w: jax.Array, bits: int, group_size: int | None = None) -> jax.Array:
  return dequantize(*quantize(w, bits, group_size))
