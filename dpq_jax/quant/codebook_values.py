"""How codebook values are stored (`config.quant.codebook_dtype`): rounding, encoding and their bytes.

Float dtypes ('float16', 'bfloat16', 'float32') store every value as that type. 'int8' stores every
value as a symmetric 8-bit integer with one float16 scale per codebook (AQLM-style per-codebook scaling):
  s_c = fp16(max_k,i |C[c, k, i]| / 127) over the live rows of codebook c (1 for an all-zero codebook,
        at least the smallest positive float16 otherwise),
  q   = clip(round(C / s_c), -127, 127) int8,   decoded C_hat = q * s_c in float32.
At K=256, d=8 a per-position codebook costs 16 K / C_out bits per weight in fp16 (more than the
1-bit indices on DiT shapes); int8 halves it for 2 bytes of scale per codebook.

Per-output-channel scales and RTN scales/offsets are not codebook values: they stay float16 when the
codebooks are int8 (`side_dtype`). Decoding is exact (an 8-bit integer times a float16 value fits
float32's mantissa) and rounding is idempotent, so re-rounding already stored values (calibrate, then
save; compress after calibrate) changes nothing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = ('float16', 'bfloat16', 'float32', 'int8')
INT8_MAX = 127
SCALE_DTYPE = 'float16'
_FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)  # 2**-24
_FP16_MAX = float(np.finfo(np.float16).max)


def dtype_name(dtype: Any) -> str:
  """'float16' | 'bfloat16' | 'float32' | 'int8' from a name or a dtype; ValueError naming the value otherwise."""
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise ValueError(f"codebook_dtype={dtype!r}: expected 'float16', 'bfloat16', 'float32' or 'int8'")
  return name


def is_int8(dtype: Any) -> bool:
  return dtype_name(dtype) == 'int8'


def value_bytes(dtype: Any) -> int:
  """Bytes of one stored codebook value."""
  return jnp.dtype(dtype_name(dtype)).itemsize


def overhead_bytes(dtype: Any) -> int:
  """Bytes stored per codebook besides its values: the float16 scale of an int8 codebook, else 0."""
  return jnp.dtype(SCALE_DTYPE).itemsize if is_int8(dtype) else 0


def side_dtype(dtype: Any) -> str:
  """dtype of the other stored scalars (per-output-channel scales, RTN scale/offset): float16 for int8
  codebooks, the codebook dtype otherwise."""
  name = dtype_name(dtype)
  return SCALE_DTYPE if name == 'int8' else name


def int8_scales(codebooks: jax.Array, alive: jax.Array | None = None) -> jax.Array:
  """Per-codebook scale [num_codebooks] float32 holding float16 values, > 0.

  Args:
    codebooks: [num_codebooks, K, d] float.
    alive: [num_codebooks, K] bool, live codewords (dead rows do not widen the range); None: all live.
  """
  values = jnp.abs(jnp.asarray(codebooks, jnp.float32))  # [C, K, d]
  if alive is not None:
    values = jnp.where(jnp.asarray(alive, bool)[..., None], values, 0.0)
  peak = jnp.max(values, axis=(1, 2))  # [C]
  scale = jnp.clip(peak / INT8_MAX, 0.0, _FP16_MAX).astype(jnp.float16).astype(jnp.float32)
  # A range below float16's smallest step (rounded to 0) gets that step; an all-zero codebook gets 1.
  return jnp.where(peak > 0, jnp.maximum(scale, _FP16_TINY), 1.0)


def encode(codebooks: jax.Array, dtype: Any, alive: jax.Array | None = None) -> tuple[np.ndarray, np.ndarray | None]:
  """What storage writes: (values [num_codebooks, K, d] in `dtype`, scales [num_codebooks] float16 or None).

  Args:
    codebooks: [num_codebooks, K, d] float.
    dtype: the codebook dtype (name or dtype).
    alive: [num_codebooks, K] bool (int8 only: dead rows excluded from the range); None: all live.
  """
  name = dtype_name(dtype)
  if name != 'int8':
    return np.asarray(jnp.asarray(codebooks, jnp.float32).astype(name)), None
  values, scales = _encode_int8(jnp.asarray(codebooks, jnp.float32), None if alive is None else jnp.asarray(alive))
  return np.asarray(values), np.asarray(scales).astype(np.float16)


@jax.jit
def _encode_int8(codebooks: jax.Array, alive: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  scales = int8_scales(codebooks, alive)  # [C]
  q = jnp.clip(jnp.round(codebooks / scales[:, None, None]), -INT8_MAX, INT8_MAX)  # [C, K, d]
  return q.astype(jnp.int8), scales


def decode(values: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
  """Stored values [num_codebooks, K, d] (and scales [num_codebooks] for int8) -> float32 codebooks."""
  values = np.asarray(values)
  if scales is None:
    return values.astype(np.float32)
  return values.astype(np.float32) * np.asarray(scales, np.float32)[:, None, None]  # exact: 8 x 11 bits


def decode_rows(rows: np.ndarray, scales: np.ndarray | None, live: np.ndarray) -> np.ndarray:
  """Live rows [sum K', d] of compressed codebooks (codebook c's K'_c rows in turn) -> float32."""
  rows = np.asarray(rows)
  if scales is None:
    return rows.astype(np.float32)
  return rows.astype(np.float32) * np.repeat(np.asarray(scales, np.float32), np.asarray(live))[:, None]


def round_codebooks(codebooks: jax.Array, dtype: Any, alive: jax.Array | None = None) -> jax.Array:
  """What stored codebooks [num_codebooks, K, d] decode to, float32 (see the module docstring).

  alive [num_codebooks, K] bool: int8 scales from the live rows only (dead rows are clipped into range).
  """
  name = dtype_name(dtype)
  codebooks = jnp.asarray(codebooks, jnp.float32)
  if name != 'int8':
    return codebooks.astype(name).astype(jnp.float32)
  values, scales = _encode_int8(codebooks, None if alive is None else jnp.asarray(alive))
  return values.astype(jnp.float32) * scales[:, None, None]


def round_side(values: jax.Array, dtype: Any) -> jax.Array:
  """Per-output-channel or RTN scalars rounded to `side_dtype(dtype)`, float32."""
  return jnp.asarray(values).astype(side_dtype(dtype)).astype(jnp.float32)
