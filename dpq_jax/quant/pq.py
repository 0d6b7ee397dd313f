"""Product and vector quantization of one linear layer (pure array functions).

A Flax kernel W [in_features, out_features] is cut along in_features into
num_subvectors = in_features / subvector_dim positions; output column o at position j is
the sub-vector W[j*d:(j+1)*d, o]. PQ gives every position its own codebook of
codebook_size codewords (k-means over the out_features sub-vectors at that position). VQ
(VQ4DiT-style) is the same mechanism with one codebook shared by all positions of the layer.
Index cost is log2(codebook_size) / subvector_dim bits per weight either way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dpq_jax.quant import codebook_values, metric, packing
from dpq_jax.quant import kmeans as kmeans_lib

# Kernel bytes (float32) that one `quantize_stack` call takes at most: its k-means holds a few copies of the
# sub-vectors plus the seeding's [num_problems, num_trials, num_points] candidate distances (~2x the kernels
# at K=256), so a call's peak should stay within ~1 GiB (estimated, not measured). All 12 layers of a shape of
# DiT-S/2 fit one call; DiT-XL/2 takes its 28 blocks in 2 to 7 calls (surgery.stack_groups).
STACK_BUDGET_BYTES = 128 * 2**20


@dataclasses.dataclass(frozen=True)
class CodebookSpec:
  """How one layer is quantized: codebook_size codewords of subvector_dim values.

  shared=False is PQ (a codebook per sub-vector position); shared=True is VQ (one codebook).
  """

  codebook_size: int
  subvector_dim: int
  shared: bool = False

  @property
  def index_bits(self) -> int:
    return packing.index_bits(self.codebook_size)

  @property
  def bits_per_weight(self) -> float:
    return self.index_bits / self.subvector_dim

  def num_codebooks(self, in_features: int) -> int:
    return 1 if self.shared else in_features // self.subvector_dim

  def check(self, in_features: int, out_features: int, name: str = 'layer') -> None:
    """Raises ValueError naming the bad value before any work is done."""
    if self.codebook_size < 1:
      raise ValueError(f'{name}: codebook_size (k)={self.codebook_size}: expected >= 1')
    if self.subvector_dim < 1 or in_features % self.subvector_dim:
      raise ValueError(
        f'{name}: subvector_dim (d)={self.subvector_dim} does not divide in_features={in_features}; '
        f'expected a divisor such as {", ".join(str(v) for v in (1, 2, 4, 8, 16) if in_features % v == 0)}'
      )
    packing.index_bits(self.codebook_size)  # raises when the bits are unreachable


def to_subvectors(kernel: jax.Array, subvector_dim: int) -> jax.Array:
  """[in_features, out_features] -> [num_subvectors, out_features, subvector_dim]."""
  in_features, out_features = kernel.shape
  return kernel.reshape(in_features // subvector_dim, subvector_dim, out_features).transpose(0, 2, 1)


def from_subvectors(sub: jax.Array) -> jax.Array:
  """[num_subvectors, out_features, subvector_dim] -> [in_features, out_features]."""
  m, out_features, d = sub.shape
  return sub.transpose(0, 2, 1).reshape(m * d, out_features)


def decode(codebooks: jax.Array, codes: jax.Array) -> jax.Array:
  """codebooks [num_codebooks, K, d] (num_codebooks 1 for VQ or num_subvectors for PQ),
  codes [num_subvectors, out_features] -> kernel [in_features, out_features]."""
  if codebooks.shape[0] == 1:
    sub = codebooks[0][codes.astype(jnp.int32)]  # [M, out, d]
  else:
    sub = jnp.take_along_axis(codebooks, codes.astype(jnp.int32)[..., None], axis=1)  # [M, out, d]
  return from_subvectors(sub)


def _problems(kernel: jax.Array, spec: CodebookSpec) -> jax.Array:
  sub = to_subvectors(kernel.astype(jnp.float32), spec.subvector_dim)  # [M, out, d]
  return sub.reshape(1, -1, spec.subvector_dim) if spec.shared else sub


def encode(
  kernel: jax.Array,
  codebooks: jax.Array,
  spec: CodebookSpec,
  u: jax.Array | None = None,
  alive: jax.Array | None = None,
  scale: jax.Array | None = None,
) -> jax.Array:
  """Nearest-codeword codes [num_subvectors, out_features] int32 of a kernel [in_features, out_features]; with
  whitening factors u [num_subvectors, d, d] (metric.factor) nearest in the layer-output metric instead of
  Euclidean. The one argmin of a quantized layer: quantize's final codes and PQDense's dynamic assignment.

  alive: optional [num_codebooks, K] bool live-codeword mask (codebook compression): dead codewords are never
  chosen. scale: optional per-output-channel scale [out_features]: the codewords then approximate W / s
  (`scaled_target`)."""
  in_features, out_features = kernel.shape
  if scale is not None:
    kernel = scaled_target(kernel, scale)
  if u is not None:
    return metric.assign(to_subvectors(jnp.asarray(kernel, jnp.float32), spec.subvector_dim), codebooks, u, alive)
  codes = kmeans_lib.assign(_problems(kernel, spec), codebooks, alive=alive)
  return codes.reshape(in_features // spec.subvector_dim, out_features)


def fit(
  kernel: jax.Array, spec: CodebookSpec, key: jax.Array, iters: int = 25, u: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """k-means codebooks for one kernel.

  With whitening factors u [num_subvectors, d, d] (metric.factor of the layer's input moments) the objective
  is the layer-output error sum_(j,r) (w_rj - c)^T H_j (w_rj - c) instead of the weight error: PQ runs
  k-means on the whitened sub-vectors U_j w of each position and maps the codebooks back; VQ starts from the
  weight-space k-means and runs `iters` Lloyd iterations in the metric (metric.vq_lloyd).

  Returns:
    codebooks [num_codebooks, K, d] float32, codes [num_subvectors, out_features] int32,
    and the k-means objective per iteration (of the weight-space or whitened problem).
  """
  in_features, out_features = kernel.shape
  spec.check(in_features, out_features)
  num_subvectors = in_features // spec.subvector_dim
  if u is not None and not spec.shared:
    sub = to_subvectors(jnp.asarray(kernel, jnp.float32), spec.subvector_dim)  # [M, out, d]
    result = kmeans_lib.kmeans(metric.whiten(sub, u), spec.codebook_size, key, iters=iters)
    return metric.unwhiten(result.codebooks, u), result.codes, result.objective
  result = kmeans_lib.kmeans(_problems(kernel, spec), spec.codebook_size, key, iters=iters)
  codes = result.codes.reshape(num_subvectors, out_features)
  if u is not None:  # VQ in the metric, from the weight-space solution
    sub = to_subvectors(jnp.asarray(kernel, jnp.float32), spec.subvector_dim)
    codebooks, codes = metric.vq_lloyd(sub, result.codebooks, u, iters)
    return codebooks, codes, result.objective
  return result.codebooks, codes, result.objective


class StackResult(NamedTuple):
  """`quantize_stack`'s output for num_layers kernels of one shape."""

  codebooks: jax.Array  # [num_layers, num_codebooks, K, d] float32, rounded to the stored dtype
  codes: jax.Array  # [num_layers, num_subvectors, out_features] int32, nearest codewords of the rounded codebooks
  scale: jax.Array | None  # [num_layers, out_features] float32 per-output-channel scales ('norm'), or None
  rel_mse: jax.Array  # [num_layers] ||W - W_hat||^2 / ||W||^2 of the decoded (and scaled) kernels
  sq_norm: jax.Array  # [num_layers] ||W||^2


@functools.partial(jax.jit, static_argnames=('spec', 'iters', 'codebook_dtype', 'scale_dtype', 'scaled_codes'))
def quantize_stack(
  kernels: jax.Array,
  spec: CodebookSpec,
  key: jax.Array,
  iters: int = 25,
  codebook_dtype: str = 'float32',
  scale_dtype: str | None = None,
  scaled_codes: bool = False,
) -> StackResult:
  """`fit`, codebooks rounded to `codebook_dtype`, `encode`, and optionally `channel_scale`, for several kernels
  of one shape in one compiled program: their k-means problems run as one batch (the problems of a layer are
  independent, so layers just add problems: PQ num_layers x num_subvectors of out_features points, VQ num_layers
  of num_subvectors x out_features), and one program serves every call of that shape.

  Args:
    kernels: [num_layers, in_features, out_features].
    spec: the layers' CodebookSpec (static).
    key: PRNG key of the seeding (one stream for all the problems).
    iters: Lloyd iterations (static).
    codebook_dtype: stored codebook values (codebook_values.DTYPES, static).
    scale_dtype: per-output-channel scales restoring each channel's norm, rounded to this dtype (static); None:
      no scales.
    scaled_codes: with scales, re-assign each code to the nearest codeword of W / s afterwards (static;
      surgery.quantize_params).

  Returns:
    StackResult; layer i's codes are those of `encode(kernels[i], codebooks[i], spec)` (with scaled_codes:
    `encode(kernels[i], codebooks[i], spec, scale=scale[i])`).
  """
  num_layers, in_features, out_features = kernels.shape
  spec.check(in_features, out_features)
  d = spec.subvector_dim
  num_subvectors = in_features // d
  kernels = jnp.asarray(kernels, jnp.float32)
  sub = kernels.reshape(num_layers, num_subvectors, d, out_features).transpose(0, 1, 3, 2)  # [L, M, out, d]
  x = sub.reshape(num_layers, -1, d) if spec.shared else sub.reshape(-1, out_features, d)  # [problems, points, d]
  # fit's own codes and objective are unused here, so XLA drops its final assignment from this program.
  codebooks = kmeans_lib.kmeans(x, spec.codebook_size, key, iters=iters).codebooks  # [problems, K, d]
  codebooks = codebook_values.round_codebooks(codebooks, codebook_dtype)
  codes = kmeans_lib.assign(x, codebooks)  # [problems, points]: nearest codeword of the stored codebooks

  def decoded(codes):  # [L, in, out]
    chosen = jnp.take_along_axis(codebooks, codes[..., None], axis=1)  # [problems, points, d]
    approx = chosen.reshape(num_layers, num_subvectors, out_features, d).transpose(0, 1, 3, 2)
    return approx.reshape(num_layers, in_features, out_features)

  approx = decoded(codes)
  scale = None
  if scale_dtype is not None:
    scale = jax.vmap(functools.partial(channel_scale, dtype=scale_dtype))(kernels, approx)  # [L, out]
    if scaled_codes:  # the layer computes (x @ C[a]) * s: the nearest codewords of W / s (scaled_target)
      target = scaled_target(kernels, scale[:, None, :])
      sub = target.reshape(num_layers, num_subvectors, d, out_features).transpose(0, 1, 3, 2)
      codes = kmeans_lib.assign(sub.reshape(x.shape), codebooks)
      approx = decoded(codes)
    approx = approx * scale[:, None, :]
  num = jnp.sum(jnp.square(kernels - approx), axis=(1, 2))
  den = jnp.sum(jnp.square(kernels), axis=(1, 2))
  codebooks = codebooks.reshape(num_layers, -1, spec.codebook_size, d)
  codes = codes.reshape(num_layers, num_subvectors, out_features)
  return StackResult(codebooks, codes, scale, jnp.where(den > 0, num / den, num), den)


def scaled_target(kernel: jax.Array, scale: jax.Array | None) -> jax.Array:
  """What the codewords of a layer with a per-output-channel scale approximate: W / s (its output is
  (x @ C[a]) * s), channel by channel; W itself where there is no scale (or a channel's scale is 0)."""
  if scale is None:
    return kernel
  scale = jnp.asarray(scale, jnp.float32)
  return jnp.asarray(kernel, jnp.float32) / jnp.where(scale != 0, scale, 1.0)


def channel_scale(kernel: jax.Array, approx: jax.Array, dtype: Any = jnp.float16) -> jax.Array:
  """Per-output-channel scale [out_features] s_r = ||W[:, r]|| / ||W_hat[:, r]|| (1 where W_hat[:, r] = 0),
  rounded to `dtype` (as stored) and returned as float32.

  A k-means reconstruction is the mean of its cell, so it is shorter than the weights it replaces
  (||W_hat||^2 = ||W||^2 - ||W - W_hat||^2 for the Lloyd fixed point): every layer's outputs shrink, by
  0.6-0.7 at 1 bit, and the shrinkage compounds through the blocks (attention logits shrink by its
  square). Restoring each output channel's norm costs C_out values per layer (16 / C_in bits per weight).
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  approx = jnp.asarray(approx, jnp.float32)
  num = jnp.sqrt(jnp.sum(jnp.square(kernel), axis=0))
  den = jnp.sqrt(jnp.sum(jnp.square(approx), axis=0))
  scale = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0)
  return scale.astype(dtype).astype(jnp.float32)


def lsq_scale(kernel: jax.Array, approx: jax.Array, moments: jax.Array | None, dtype: Any = jnp.float16) -> jax.Array:
  """Least-squares per-output-channel scale [out_features] in the layer-output metric, rounded to `dtype` and
  returned as float32 (1 where the decoded channel is 0): s_r = argmin_s sum_j (w_rj - s c_rj)^T H_j (w_rj - s c_rj)
  = sum_j w_rj^T H_j c_rj / sum_j c_rj^T H_j c_rj, with moments [num_subvectors, d, d] (metric.py); None: the
  identity, s_r = <W_r, W_hat_r> / ||W_hat_r||^2."""
  kernel = jnp.asarray(kernel, jnp.float32)
  approx = jnp.asarray(approx, jnp.float32)
  if moments is None:
    num, den = jnp.sum(kernel * approx, axis=0), jnp.sum(approx * approx, axis=0)
  else:
    d = moments.shape[-1]
    w, c = to_subvectors(kernel, d), to_subvectors(approx, d)  # [M, out, d]
    hc = jnp.einsum('mde,mne->mnd', jnp.asarray(moments, jnp.float32), c, precision=jax.lax.Precision.HIGHEST)
    num, den = jnp.sum(w * hc, axis=(0, 2)), jnp.sum(c * hc, axis=(0, 2))  # [out]
  scale = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0)
  return scale.astype(dtype).astype(jnp.float32)


def output_energy(kernel: jax.Array, moments: Any = None, hessian: Any = None) -> jax.Array:
  """Each output channel's energy [out_features] in the layer-output metric: w_r^T H w_r with the full input
  moment hessian [in_features, in_features], else sum_j w_rj^T H_j w_rj with the per-position moments
  [num_subvectors, d, d], else ||w_r||^2."""
  kernel = jnp.asarray(kernel, jnp.float32)
  if hessian is not None:
    h = jnp.asarray(hessian, jnp.float32)
    return jnp.einsum('io,ij,jo->o', kernel, h, kernel, precision=jax.lax.Precision.HIGHEST)
  if moments is not None:
    w = to_subvectors(kernel, moments.shape[-1])  # [M, out, d]
    m = jnp.asarray(moments, jnp.float32)
    return jnp.einsum('mnd,mde,mne->n', w, m, w, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(jnp.square(kernel), axis=0)


def output_norm_scale(
  kernel: jax.Array, approx: jax.Array, moments: Any = None, hessian: Any = None, dtype: Any = jnp.float16
) -> jax.Array:
  """Per-output-channel scale [out_features] restoring each channel's output energy (`output_energy`),
  s_r = sqrt(w_r^T H w_r / q_r^T H q_r) (1 where q_r^T H q_r = 0): channel_scale's norm rule in the metric the
  codes were chosen in. Rounded to `dtype`, returned as float32."""
  num, den = output_energy(kernel, moments, hessian), output_energy(approx, moments, hessian)
  scale = jnp.where(den > 0, jnp.sqrt(jnp.maximum(num, 0.0) / jnp.where(den > 0, den, 1.0)), 1.0)
  return scale.astype(dtype).astype(jnp.float32)


SCALE_RULES = ('norm', 'lsq', 'output_norm')


def scale_of(
  kernel: jax.Array, approx: jax.Array, rule: str, moments: Any = None, dtype: Any = jnp.float16, hessian: Any = None
) -> jax.Array:
  """The per-output-channel scale [out_features] of decoded weights `approx` by `rule` (SCALE_RULES): 'norm'
  restores ||W_r|| (channel_scale), 'lsq' is the least-squares scale in the metric of `moments` (or the
  weights' where None; lsq_scale), 'output_norm' restores each channel's output energy under `hessian` (the full
  input moment), else `moments` (output_norm_scale). Rounded to the stored `dtype`, returned as float32."""
  if rule == 'lsq':
    return lsq_scale(kernel, approx, moments, dtype)
  if rule == 'output_norm':
    return output_norm_scale(kernel, approx, moments, hessian, dtype)
  if rule != 'norm':
    raise ValueError(f'scale_rule={rule!r}: expected one of {SCALE_RULES}')
  return channel_scale(kernel, approx, dtype)


def rel_mse(kernel: jax.Array, approx: jax.Array) -> float:
  """||W - W_hat||^2 / ||W||^2."""
  kernel = jnp.asarray(kernel, jnp.float32)
  num = jnp.sum(jnp.square(kernel - approx))
  den = jnp.sum(jnp.square(kernel))
  return float(jnp.where(den > 0, num / den, num))
