"""Flax wiring of the quantizers: PQDense, and the Dense factory that picks it by path rules.

Collections: codebooks and biases are `params` (optax sees only floats); integer codes (and
the latent float weight when assignments are recomputed) live in the non-trainable `quant`
collection. A quantized layer's params hold no float kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpq_jax.quant import kmeans as kmeans_lib
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
    'dynamic': codes = argmin over the current codebooks of the latent weight `quant/latent`,
      recomputed in every forward under stop_gradient; gradients reach the chosen codewords.
    'ste': like dynamic, plus a straight-through latent weight in params:
      W_hat = C[a] + W - stop_gradient(W), so the latent weight trains too.
  """

  features: int
  spec: pq.CodebookSpec | None = None
  rules: QuantRules | None = None
  assignment: str = 'frozen'
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    spec = self.spec
    if spec is None and self.rules is not None:
      spec = self.rules.spec_for('/'.join(self.path))
    if spec is None:
      kernel = self.param('kernel', self.kernel_init, (in_features, self.features), jnp.float32)
    else:
      kernel = self._quantized_kernel(spec, in_features)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if spec is not None and self.has_variable('params', 'scale'):  # per-output-channel scale (pq.channel_scale)
      y = y * self.param('scale', nn.initializers.ones, (self.features,), jnp.float32).astype(self.dtype)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
    return y

  def _quantized_kernel(self, spec: pq.CodebookSpec, in_features: int) -> jax.Array:
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
      return pq.decode(codebooks, codes.value)
    if self.assignment not in ASSIGNMENTS:
      raise ValueError(f'assignment={self.assignment!r}: expected one of {ASSIGNMENTS}')
    shape = (in_features, self.features)
    if self.assignment == 'ste':
      latent = self.param('latent', self.kernel_init, shape, jnp.float32)
    else:
      latent = self.variable('quant', 'latent', lambda: jnp.zeros(shape, jnp.float32)).value
    sub = pq.to_subvectors(jax.lax.stop_gradient(latent), spec.subvector_dim)  # [M, out, d]
    problems = sub.reshape(1, -1, spec.subvector_dim) if spec.shared else sub
    # After codebook compression the `quant/alive` mask [num_codebooks, K] bool marks the live codewords
    # (dead ones are never assigned); without it every codeword is live, as before compression.
    alive = self.get_variable('quant', 'alive') if self.has_variable('quant', 'alive') else None
    assigned = kmeans_lib.assign(problems, jax.lax.stop_gradient(codebooks), alive=alive).reshape(num_subvectors, -1)
    if self.is_mutable_collection('quant') and not self.is_initializing():
      codes.value = assigned.astype(codes.value.dtype)
    kernel = pq.decode(codebooks, assigned)
    if self.assignment == 'ste':
      # Value C[a]; the gradient of W_hat reaches both the codewords and the latent weight
      # (W + stop_gradient(C[a] - W) would starve the codebooks).
      kernel = kernel + (latent - jax.lax.stop_gradient(latent))
    return kernel


def dense_factory(rules: QuantRules, assignment: str = 'frozen') -> Callable[..., nn.Module]:
  """A DiT `dense` factory: PQDense on the layers matched by rules, plain Dense elsewhere."""
  if assignment not in ASSIGNMENTS:
    raise ValueError(f'assignment={assignment!r}: expected one of {ASSIGNMENTS}')
  return functools.partial(PQDense, rules=rules, assignment=assignment)
