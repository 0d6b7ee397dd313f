"""Flax wiring of the quantizers: PQDense, and the Dense factory that picks it by path rules.

Collections: codebooks and biases are `params` (optax sees only floats); integer codes (and
the latent float weight when assignments are recomputed) live in the non-trainable `quant`
collection. A quantized layer's params hold no float kernel.

Memory of the backward pass: `y = x @ decode(codebooks, codes)` keeps the decoded kernel
[in_features, out_features] for dx = dy @ W^T, a float copy of every quantized layer per device.
With `remat=True` the product is `remat_decoded_matmul`: only x, codebooks and codes are kept, and
the backward re-gathers the kernel (and computes dx and dW only: the forward matmul is not redone);
a dynamic assignment's kernel-sized argmin copies are then also made when the layer runs, so that no
point of the step holds a float copy of every quantized layer.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dpq_jax.models import dit
from dpq_jax.models import scan as scan_lib
from dpq_jax.quant import packing, pq

ASSIGNMENTS = ('frozen', 'dynamic', 'ste')

# All five linear layers of every DiT block; embedders and the final layer stay full precision.
DEFAULT_PATTERN = r'blocks_\d+/(attn/(qkv|proj)|mlp/(fc1|fc2)|adaLN_modulation)'


@dataclasses.dataclass(frozen=True)
class QuantRules:
  """Ordered (regex over the module path, spec) pairs; the first full match wins."""

  rules: tuple[tuple[str, pq.CodebookSpec], ...]

  def spec_for(self, path: str) -> pq.CodebookSpec | None:
    for pattern, spec in self.rules:
      if re.fullmatch(pattern, path):
        return spec
    return None


class PQDense(nn.Module):
  """y = x @ decode(codebooks, codes) [* scale] + b, or a plain Dense where no spec applies.

  `scale` [out_features] is used where the params hold one (surgery.quantize_params(channel_scale=True)).

  The spec is `spec`, or else the first of `rules` matching this module's path; with neither,
  the layer is nn.Dense (params `kernel`, `bias`), so fp and quantized layers share names.

  assignment:
    'frozen': codes fixed (the `quant/codes` variable).
    'dynamic': codes = argmin over the current codebooks of the latent weight `quant/latent` (divided by the
      channel scale where there is one: the codewords approximate W / s), recomputed in every forward under
      stop_gradient, in the layer-output metric `quant/metric` where given; gradients reach the chosen codewords.
    'ste': like dynamic, plus a straight-through latent weight in params:
      W_hat = C[a] + W - stop_gradient(W), so the latent weight trains too.
  """

  features: int
  spec: pq.CodebookSpec | None = None
  rules: QuantRules | None = None
  assignment: str = 'frozen'
  remat: bool = False  # re-gather the decoded kernel in the backward pass instead of keeping it
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    spec = self.spec
    if spec is None and self.rules is not None:  # a scanned block's layer is looked up as block 0's
      spec = self.rules.spec_for(scan_lib.rule_path('/'.join(self.path)))
    if spec is None:
      kernel = self.param('kernel', self.kernel_init, (in_features, self.features), jnp.float32)
      y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    else:
      codebooks, codes, latent = self._quantized_operands(spec, x)
      y = (remat_decoded_matmul if self.remat else decoded_matmul)(x, codebooks, codes, latent, self.dtype)
      if self.has_variable('params', 'scale'):  # per-output-channel scale (pq.channel_scale), where quantized with it
        y = y * self.param('scale', nn.initializers.ones, (self.features,), jnp.float32).astype(self.dtype)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
    return y

  def _quantized_operands(self, spec: pq.CodebookSpec, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(codebooks [num_codebooks, K, d], codes [num_subvectors, out_features], straight-through
    latent [in_features, out_features] or None) of `decoded_matmul` for the input x [..., in_features]."""
    in_features = x.shape[-1]
    spec.check(in_features, self.features, '/'.join(self.path))
    num_subvectors = in_features // spec.subvector_dim
    codebooks = self.param(
      'codebooks',
      nn.initializers.normal(0.02),
      (spec.num_codebooks(in_features), spec.codebook_size, spec.subvector_dim),  # [num_codebooks, K, d]
      jnp.float32,
    )
    codes = self.variable(
      'quant',
      'codes',
      lambda: jnp.zeros((num_subvectors, self.features), packing.code_dtype(spec.codebook_size)),
    )  # [num_subvectors, out_features]
    if self.assignment == 'frozen':
      return codebooks, codes.value, None
    if self.assignment not in ASSIGNMENTS:
      raise ValueError(f'assignment={self.assignment!r}: expected one of {ASSIGNMENTS}')
    shape = (in_features, self.features)
    if self.assignment == 'ste':
      latent = self.param('latent', self.kernel_init, shape, jnp.float32)
    else:
      latent = self.variable('quant', 'latent', lambda: jnp.zeros(shape, jnp.float32)).value
    target = jax.lax.stop_gradient(latent)
    if self.remat:  # the argmin's kernel-sized copies exist only while this layer runs, not all at once
      target = _after(target, x)
    # The layer computes (x @ C[a]) * s where it has a scale: C[a] approximates W / s.
    scale = (
      jax.lax.stop_gradient(self.get_variable('params', 'scale')) if self.has_variable('params', 'scale') else None
    )
    # After codebook compression the `quant/alive` mask [num_codebooks, K] bool marks the live codewords
    # (dead ones are never assigned); without it every codeword is live, as before compression.
    alive = self.get_variable('quant', 'alive') if self.has_variable('quant', 'alive') else None
    # The layer-output metric quantize fitted in (metric.py): whitening factors [num_subvectors, d, d].
    u = self.get_variable('quant', 'metric') if self.has_variable('quant', 'metric') else None
    assigned = pq.encode(target, jax.lax.stop_gradient(codebooks), spec, u, alive, scale)  # [M, out_features]
    # The stored dtype (uint8 for K <= 256): the codes are what a rematerialised product keeps.
    assigned = assigned.astype(codes.value.dtype)
    # Kept by a rematerialised block (models/dit.py): its backward pass then re-gathers, not re-assigns.
    assigned = checkpoint_name(assigned, dit.REMAT_KEEP)
    if self.is_mutable_collection('quant') and not self.is_initializing():
      codes.value = assigned
    return codebooks, assigned, latent if self.assignment == 'ste' else None


def decoded_matmul(
  x: jax.Array, codebooks: jax.Array, codes: jax.Array, latent: jax.Array | None = None, dtype: Any = jnp.float32
) -> jax.Array:
  """x [..., in_features] @ decode(codebooks [num_codebooks, K, d], codes [num_subvectors, out_features]).

  With a straight-through `latent` [in_features, out_features] the kernel is
  W_hat = C[a] + W - stop_gradient(W): value C[a], and the gradient reaches both the codewords and
  the latent weight (W + stop_gradient(C[a] - W) would starve the codebooks).
  """
  kernel = pq.decode(codebooks, codes)  # [in_features, out_features]
  if latent is not None:
    kernel = kernel + (latent - jax.lax.stop_gradient(latent))
  return jnp.dot(x.astype(dtype), kernel.astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def remat_decoded_matmul(
  x: jax.Array, codebooks: jax.Array, codes: jax.Array, latent: jax.Array | None = None, dtype: Any = jnp.float32
) -> jax.Array:
  """`decoded_matmul` whose backward pass re-gathers the kernel instead of keeping it.

  Residuals: x, codebooks [num_codebooks, K, d] and codes [num_subvectors, out_features] (uint8 for
  K <= 256), no [in_features, out_features] float. jax.checkpoint states the same, but XLA:CPU removes
  its optimization barrier before scheduling and then gathers every kernel again right after the
  forward pass (measured: more memory, not less); here the re-gather reads the codes through the
  cotangent (`_after`), so no backend can run it before this layer's backward.
  """
  return decoded_matmul(x, codebooks, codes, latent, dtype)


def _remat_fwd(x, codebooks, codes, latent, dtype):
  straight_through = None if latent is None else jnp.zeros((0,), jnp.float32)  # a marker, not the weight
  return decoded_matmul(x, codebooks, codes, latent, dtype), (x, codebooks, codes, straight_through)


def _remat_bwd(dtype, res, dy):
  x, codebooks, codes, straight_through = res
  kernel, decode_vjp = jax.vjp(lambda c: pq.decode(c, _after(codes, dy)), codebooks)  # [in, out] re-gathered
  dy = dy.astype(dtype)
  dx = jnp.einsum('...o,io->...i', dy, kernel.astype(dtype)).astype(x.dtype)
  dkernel = jnp.einsum('...i,...o->io', x.astype(dtype), dy).astype(jnp.float32)  # [in, out]
  (dcodebooks,) = decode_vjp(dkernel)  # scatter-add of dW's sub-vectors onto the chosen codewords
  # Straight-through: W_hat = C[a] + W - stop_gradient(W) passes dW on to the latent weight unchanged.
  return dx, dcodebooks, None, None if straight_through is None else dkernel


remat_decoded_matmul.defvjp(_remat_fwd, _remat_bwd)


def _after(value: jax.Array, token: jax.Array) -> jax.Array:
  """value (integers as int32), computed only once `token` exists.

  min(value, bound): the bound is the top of the range (2^30 for integer codes, +inf for floats) whatever
  the token, so the value is exact, but no compiler can evaluate it before the token. XLA:CPU removes
  optimization barriers before it schedules; only a data dependency keeps work where it belongs.
  """
  flag = token.reshape(-1)[0] > 0
  if jnp.issubdtype(value.dtype, jnp.floating):
    return jnp.minimum(value, jnp.inf + flag.astype(value.dtype))
  return jnp.minimum(value.astype(jnp.int32), jnp.int32(2**30) + flag.astype(jnp.int32))


def dense_factory(rules: QuantRules, assignment: str = 'frozen', remat: bool = False) -> Callable[..., nn.Module]:
  """A DiT `dense` factory: PQDense on the layers matched by rules, plain Dense elsewhere.

  remat: quantized layers recompute their decoded kernel in the backward pass (PQDense.remat).
  """
  if assignment not in ASSIGNMENTS:
    raise ValueError(f'assignment={assignment!r}: expected one of {ASSIGNMENTS}')
  return functools.partial(PQDense, rules=rules, assignment=assignment, remat=remat)
