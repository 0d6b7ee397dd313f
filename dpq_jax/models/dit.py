"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") in Flax linen.

A port of facebookresearch/DiT `models.py` with the original's module names
(`x_embedder`, `t_embedder`, `y_embedder`, `blocks_N`, `adaLN_modulation`, `final_layer`)
so that the PyTorch -> Flax converter is a readable table. Inputs and outputs are NHWC.

Every linear layer of the model is built by `DiT.dense`, a factory with `nn.Dense`'s
signature. Quantized models pass a factory building `PQDense` instead: one model definition
serves full precision and every quantized variant.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpq_jax.models import scan as scan_lib

# Values a rematerialised block keeps whatever its policy (jax.ad_checkpoint.checkpoint_name): small, and dear to
# recompute. A dynamic assignment's codes (quant/layers.py) are 1 byte per sub-vector, and recomputing them is the
# whole argmin again in the backward pass (measured on the demo's calibration step: 2x the assignment's cost).
REMAT_KEEP = 'remat_keep'


def remat_policy(name: str | None) -> Callable:
  """The jax.checkpoint policy of a rematerialised block: `name` (a `jax.checkpoint_policies` name; None: nothing
  saved), plus the values tagged REMAT_KEEP."""
  keep = jax.checkpoint_policies.save_only_these_names(REMAT_KEEP)
  if name is None:
    return keep
  return jax.checkpoint_policies.save_from_both_policies(getattr(jax.checkpoint_policies, name), keep)


Array = jax.Array
DenseFactory = Callable[..., nn.Module]


@dataclasses.dataclass(frozen=True)
class DiTSize:
  depth: int
  hidden_size: int
  num_heads: int


# The model sizes of the original repository; patch size comes from the name suffix.
SIZES = {
  'S': DiTSize(depth=12, hidden_size=384, num_heads=6),
  'B': DiTSize(depth=12, hidden_size=768, num_heads=12),
  'L': DiTSize(depth=24, hidden_size=1024, num_heads=16),
  'XL': DiTSize(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)
MODEL_NAMES = tuple(f'DiT-{s}/{p}' for s in SIZES for p in PATCH_SIZES)


# Sizes outside the registry (small demo models): 'DiT-<depth>x<hidden>x<heads>/<patch>'.
_CUSTOM_NAME = re.compile(r'DiT-(\d+)x(\d+)x(\d+)/(\d+)')


def parse_name(name: str) -> tuple[DiTSize, int]:
  """'DiT-XL/2' -> (DiTSize(28, 1152, 16), 2); 'DiT-4x256x4/2' -> (DiTSize(4, 256, 4), 2).

  Raises ValueError naming the valid names."""
  if name in MODEL_NAMES:
    size, patch = name[len('DiT-') :].split('/')
    return SIZES[size], int(patch)
  m = _CUSTOM_NAME.fullmatch(name)
  if m:
    depth, hidden, heads, patch = map(int, m.groups())
    if depth >= 1 and patch >= 1 and heads >= 1 and hidden % heads == 0 and hidden % 4 == 0:
      return DiTSize(depth=depth, hidden_size=hidden, num_heads=heads), patch
  raise ValueError(
    f'unknown DiT model {name!r}; expected one of {", ".join(MODEL_NAMES)} or DiT-<depth>x<hidden>x<heads>/<patch> '
    '(hidden a multiple of 4 and of heads)'
  )


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding, (grid_size**2, embed_dim), as MAE/DiT compute it."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w goes first, as in the original
  grid = grid.reshape(2, 1, grid_size, grid_size)
  emb_h = _get_1d_sincos(embed_dim // 2, grid[0])
  emb_w = _get_1d_sincos(embed_dim // 2, grid[1])
  return np.concatenate([emb_h, emb_w], axis=1)


def _get_1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  if embed_dim % 2:
    raise ValueError(f'sin-cos embedding dim must be even, got {embed_dim}')
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum('m,d->md', pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal timestep embedding [cos, sin] (GLIDE/DiT: frequencies divide by dim//2)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
  """LayerNorm without affine parameters, computed in float32 whatever the compute dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class TimestepEmbedder(nn.Module):
  hidden_size: int
  dense: DenseFactory
  frequency_embedding_size: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t: Array) -> Array:
    init = nn.initializers.normal(0.02)
    t_freq = timestep_embedding(t, self.frequency_embedding_size).astype(self.dtype)
    h = self.dense(features=self.hidden_size, kernel_init=init, dtype=self.dtype, name='mlp_0')(t_freq)
    return self.dense(features=self.hidden_size, kernel_init=init, dtype=self.dtype, name='mlp_2')(nn.silu(h))


class LabelEmbedder(nn.Module):
  """Class embedding with one extra row, index num_classes, for the null label of CFG."""

  num_classes: int
  hidden_size: int
  dropout_prob: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, labels: Array, train: bool, force_drop_ids: Array | None = None) -> Array:
    if (train and self.dropout_prob > 0) or force_drop_ids is not None:
      if force_drop_ids is None:
        drop = jax.random.uniform(self.make_rng('dropout'), labels.shape) < self.dropout_prob
      else:
        drop = force_drop_ids == 1
      labels = jnp.where(drop, self.num_classes, labels)
    table = nn.Embed(
      self.num_classes + int(self.dropout_prob > 0),
      self.hidden_size,
      embedding_init=nn.initializers.normal(0.02),
      dtype=self.dtype,
      name='embedding_table',
    )
    return table(labels)


class Attention(nn.Module):
  """timm's Attention: fused qkv projection, softmax(q k^T / sqrt(d)) v, output projection."""

  hidden_size: int
  num_heads: int
  dense: DenseFactory
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, n, c = x.shape
    head_dim = c // self.num_heads
    qkv = self.dense(features=3 * c, dtype=self.dtype, name='qkv')(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, head_dim)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q * head_dim**-0.5, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, n, c)
    return self.dense(features=c, dtype=self.dtype, name='proj')(out)


class Mlp(nn.Module):
  hidden_features: int
  dense: DenseFactory
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = self.dense(features=self.hidden_features, dtype=self.dtype, name='fc1')(x)
    h = nn.gelu(h, approximate=True)
    return self.dense(features=x.shape[-1], dtype=self.dtype, name='fc2')(h)


class DiTBlock(nn.Module):
  """Transformer block with adaLN-Zero conditioning."""

  hidden_size: int
  num_heads: int
  dense: DenseFactory
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array) -> Array:
    mod = self.dense(
      features=6 * self.hidden_size, kernel_init=nn.initializers.zeros, dtype=self.dtype, name='adaLN_modulation'
    )(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    attn = Attention(self.hidden_size, self.num_heads, self.dense, self.dtype, name='attn')
    x = x + gate_msa[:, None] * attn(modulate(layer_norm(x), shift_msa, scale_msa))
    mlp = Mlp(int(self.hidden_size * self.mlp_ratio), self.dense, self.dtype, name='mlp')
    x = x + gate_mlp[:, None] * mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))
    return x


class _ScanBlock(DiTBlock):
  """DiTBlock as nn.scan's body: (x, c) -> (x, None), c broadcast to every block."""

  def __call__(self, x: Array, c: Array) -> tuple[Array, None]:
    return super().__call__(x, c), None


class FinalLayer(nn.Module):
  hidden_size: int
  out_features: int
  dense: DenseFactory
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array) -> Array:
    zeros = nn.initializers.zeros
    mod = self.dense(features=2 * self.hidden_size, kernel_init=zeros, dtype=self.dtype, name='adaLN_modulation')(
      nn.silu(c)
    )
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = modulate(layer_norm(x), shift, scale)
    return self.dense(features=self.out_features, kernel_init=zeros, dtype=self.dtype, name='linear')(x)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> tokens, a strided convolution as timm's PatchEmbed."""

  hidden_size: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.patch_size
    conv = nn.Conv(
      self.hidden_size, (p, p), strides=(p, p), padding='VALID', kernel_init=_patch_init, dtype=self.dtype, name='proj'
    )
    return conv(x.astype(self.dtype))


def _default_dense(**kwargs) -> nn.Module:
  kwargs.setdefault('kernel_init', nn.initializers.xavier_uniform())
  return nn.Dense(**kwargs)


class DiT(nn.Module):
  """Diffusion model with a Transformer backbone; NHWC in (B,H,W,C), NHWC out (B,H,W,C or 2C).

  Attributes:
    dense: factory for every linear layer, called with nn.Dense's keyword arguments
      (`features`, `dtype`, optional `kernel_init`, `name`). Swap it to quantize.
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
    remat: rematerialise every block in the backward pass (nn.remat: only a block's inputs are
      kept, its activations are recomputed). Parameter names are unchanged, so any checkpoint loads.
      Unrolled, XLA:CPU drops the optimization barrier of jax.checkpoint before scheduling and runs the
      recomputation early, so on CPU this costs memory instead of saving it; under scan the recomputation
      sits inside the backward loop's body, where it belongs.
    remat_policy: what a rematerialised block keeps, a `jax.checkpoint_policies` name (None: nothing).
    scan_blocks: run the blocks under nn.scan: one compiled block, variables stacked under `blocks`
      (leaves [depth, ...]; models/scan.py converts from and to the per-block `blocks_N` trees), and a
      quantized block decodes only its own kernels. Same values as unrolled (float rounding).
  """

  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  dtype: Any = jnp.float32
  dense: DenseFactory = _default_dense
  remat: bool = False
  remat_policy: str | None = None
  scan_blocks: bool = False

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Array, train: bool = False, force_drop_ids: Array | None = None) -> Array:
    p = self.patch_size
    b, h, w, _ = x.shape
    if h != self.input_size or w != self.input_size or h % p:
      raise ValueError(f'DiT expects inputs of {self.input_size}x{self.input_size} (NHWC), got {x.shape}')
    x = PatchEmbed(self.hidden_size, p, self.dtype, name='x_embedder')(x)
    grid = self.input_size // p
    x = x.reshape(b, grid * grid, self.hidden_size)
    x = x + jnp.asarray(get_2d_sincos_pos_embed(self.hidden_size, grid), self.dtype)[None]
    t_emb = TimestepEmbedder(self.hidden_size, self.dense, dtype=self.dtype, name='t_embedder')(t)
    y_emb = LabelEmbedder(
      self.num_classes, self.hidden_size, self.class_dropout_prob, dtype=self.dtype, name='y_embedder'
    )(y, train, force_drop_ids)
    c = t_emb + y_emb
    args = (self.hidden_size, self.num_heads, self.dense, self.mlp_ratio, self.dtype)
    if self.scan_blocks:
      body = self._remat(_ScanBlock, prevent_cse=False)  # scan already keeps the loop's order
      scanned = nn.scan(
        body,
        variable_axes={'params': 0, 'quant': 0, 'intermediates': 0, 'perturbations': 0},
        split_rngs={'params': True},
        in_axes=nn.broadcast,
        length=self.depth,
      )
      x, _ = scanned(*args, name=scan_lib.STACKED)(x, c)
    else:
      block = self._remat(DiTBlock)
      for i in range(self.depth):
        x = block(*args, name=f'blocks_{i}')(x, c)
    x = FinalLayer(self.hidden_size, p * p * self.out_channels, self.dense, self.dtype, name='final_layer')(x, c)
    return self.unpatchify(x.astype(jnp.float32))

  def _remat(self, block: type[nn.Module], **kwargs) -> type[nn.Module]:
    if not self.remat:
      return block
    return nn.remat(block, policy=remat_policy(self.remat_policy), **kwargs)

  def unpatchify(self, x: Array) -> Array:
    """(B, T, p*p*C) -> (B, H, W, C); features are ordered (row in patch, column in patch, channel)."""
    p, c = self.patch_size, self.out_channels
    b, t, _ = x.shape
    g = int(round(t**0.5))
    x = x.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, c)

  def forward_with_cfg(self, x: Array, t: Array, y: Array, cfg_scale: float | Array) -> Array:
    """Classifier-free guidance exactly as the original: the batch is [cond; uncond] halves
    sharing the first half's x, and guidance touches only the first 3 output channels.

    The original's 3 (of 4 latent eps channels) is kept for 4-channel inputs; models of other
    widths (the 1-channel digits demo) guide all their eps channels and none of the variance ones."""
    half = x[: x.shape[0] // 2]
    out = self(jnp.concatenate([half, half], axis=0), t, y)
    guided = 3 if self.in_channels == 4 else self.in_channels
    eps, rest = out[..., :guided], out[..., guided:]
    cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return jnp.concatenate([jnp.concatenate([half_eps, half_eps], axis=0), rest], axis=-1)


def _patch_init(key, shape, dtype=jnp.float32):
  # The original initialises the patch projection like a Linear (xavier over the flattened kernel).
  kh, kw, cin, cout = shape
  return nn.initializers.xavier_uniform()(key, (kh * kw * cin, cout), dtype).reshape(shape)


def create_model(
  name: str,
  *,
  input_size: int,
  num_classes: int = 1000,
  learn_sigma: bool = True,
  in_channels: int = 4,
  class_dropout_prob: float = 0.1,
  dtype: Any = jnp.float32,
  dense: DenseFactory | None = None,
  remat: bool = False,
  remat_policy: str | None = None,
  scan_blocks: bool = False,
) -> DiT:
  """Builds a registry DiT, e.g. create_model('DiT-XL/2', input_size=32) for 256x256 images."""
  size, patch = parse_name(name)
  if input_size % patch:
    raise ValueError(f'input_size {input_size} is not a multiple of the patch size {patch} of {name}')
  return DiT(
    input_size=input_size,
    patch_size=patch,
    in_channels=in_channels,
    hidden_size=size.hidden_size,
    depth=size.depth,
    num_heads=size.num_heads,
    class_dropout_prob=class_dropout_prob,
    num_classes=num_classes,
    learn_sigma=learn_sigma,
    dtype=dtype,
    dense=dense or _default_dense,
    remat=remat,
    remat_policy=remat_policy,
    scan_blocks=scan_blocks,
  )


def init_params(model: DiT, rng: Array, batch_size: int = 1) -> dict:
  """Initialises float32 params with the original's scheme (zeroed adaLN and output layers)."""
  x = jnp.zeros((batch_size, model.input_size, model.input_size, model.in_channels), jnp.float32)
  t = jnp.zeros((batch_size,), jnp.int32)
  y = jnp.zeros((batch_size,), jnp.int32)
  return model.init(rng, x, t, y)['params']
