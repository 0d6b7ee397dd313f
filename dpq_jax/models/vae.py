"""The Stable Diffusion kl-f8 AutoencoderKL (sd-vae-ft-ema / -mse, the VAE DiT uses) in Flax linen.

A port of diffusers' `AutoencoderKL` (Encoder, Decoder, ResnetBlock2D, the mid-block
attention, quant_conv / post_quant_conv) with its module names, `down_blocks.0.resnets.1`
becoming `down_blocks_0/resnets_1`, so the converter is mechanical. Images and latents are
NHWC; images are in [-1, 1]. The architecture comes from the diffusers config.json
(`VAEConfig.from_diffusers`), so a tiny random VAE runs the same code as the real one.

DiT scales latents by a fixed 0.18215: `encode_images` returns mean (or a sample) * 0.18215
and `decode_latents` decodes latents / 0.18215, as the original train.py / sample.py do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

LATENT_SCALE = 0.18215  # DiT's train.py / sample.py constant (also sd-vae-ft-*'s scaling_factor)
_EPS = 1e-6  # every GroupNorm of the kl-f8 VAE
_DOWN_BLOCK = 'DownEncoderBlock2D'
_UP_BLOCK = 'UpDecoderBlock2D'


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The architecture; defaults are stabilityai/sd-vae-ft-ema's (kl-f8, 4 latent channels)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @property
  def downscale(self) -> int:
    """Image pixels per latent pixel along each side (8 for kl-f8)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
    """Reads a diffusers AutoencoderKL config.json dict; raises ValueError on anything unsupported."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: config[k] for k in fields if k in config}
    if 'block_out_channels' in kwargs:
      kwargs['block_out_channels'] = tuple(int(c) for c in kwargs['block_out_channels'])
    out = cls(**kwargs)
    n = len(out.block_out_channels)
    checks = [
      (config.get('_class_name', 'AutoencoderKL') == 'AutoencoderKL', f'_class_name={config.get("_class_name")!r}'),
      (config.get('act_fn', 'silu') == 'silu', f"act_fn={config.get('act_fn')!r} (only 'silu')"),
      (config.get('norm_type', 'group') == 'group', f"norm_type={config.get('norm_type')!r} (only 'group')"),
      (
        tuple(config.get('down_block_types', (_DOWN_BLOCK,) * n)) == (_DOWN_BLOCK,) * n,
        f'down_block_types={config.get("down_block_types")} (expected {n} x {_DOWN_BLOCK})',
      ),
      (
        tuple(config.get('up_block_types', (_UP_BLOCK,) * n)) == (_UP_BLOCK,) * n,
        f'up_block_types={config.get("up_block_types")} (expected {n} x {_UP_BLOCK})',
      ),
    ]
    bad = [msg for ok, msg in checks if not ok]
    if bad:
      raise ValueError(f'unsupported VAE config: {"; ".join(bad)}; expected the SD kl-f8 AutoencoderKL family')
    out.check()
    return out

  def check(self) -> None:
    """Raises ValueError naming the first inconsistent value."""
    if not self.block_out_channels or min(self.block_out_channels) <= 0:
      raise ValueError(f'block_out_channels={self.block_out_channels}: expected positive channel counts')
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
          f'block_out_channels={self.block_out_channels}: each must divide into {self.norm_num_groups} groups'
        )
    if self.layers_per_block < 1 or self.latent_channels < 1:
      raise ValueError(
        f'layers_per_block={self.layers_per_block}, latent_channels={self.latent_channels}: expected >= 1'
      )

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), 'block_out_channels': list(self.block_out_channels)}


def _group_norm(groups: int, dtype: Any, name: str) -> nn.GroupNorm:
  # Two-pass variance, as torch computes it: E[x^2] - E[x]^2 loses digits on large activations.
  return nn.GroupNorm(num_groups=groups, epsilon=_EPS, use_fast_variance=False, dtype=dtype, name=name)


def _conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1, padding: Any = 'SAME') -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm -> SiLU -> conv3x3, twice, plus a 1x1 shortcut when the width changes."""

  out_channels: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.silu(_group_norm(self.groups, self.dtype, 'norm1')(x))
    h = _conv(self.out_channels, 3, self.dtype, 'conv1')(h)
    h = nn.silu(_group_norm(self.groups, self.dtype, 'norm2')(h))
    h = _conv(self.out_channels, 3, self.dtype, 'conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, 'conv_shortcut')(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over the H*W positions, with a residual (the mid block's)."""

  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    y = _group_norm(self.groups, self.dtype, 'group_norm')(x).reshape(b, h * w, c)
    q = nn.Dense(c, dtype=self.dtype, name='to_q')(y)
    k = nn.Dense(c, dtype=self.dtype, name='to_k')(y)
    v = nn.Dense(c, dtype=self.dtype, name='to_v')(y)
    logits = jnp.einsum('bqc,bkc->bqk', q, k) / jnp.sqrt(jnp.float32(c)).astype(q.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)  # upcast, as diffusers
    y = jnp.einsum('bqk,bkc->bqc', weights, v)
    y = nn.Dense(c, dtype=self.dtype, name='to_out_0')(y)
    return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """resnet -> attention -> resnet at the lowest resolution."""

  channels: int
  groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = ResnetBlock(self.channels, self.groups, self.dtype, name='resnets_0')(x)
    if self.add_attention:
      x = AttentionBlock(self.groups, self.dtype, name='attentions_0')(x)
    return ResnetBlock(self.channels, self.groups, self.dtype, name='resnets_1')(x)


class Downsample(nn.Module):
  """Stride-2 conv3x3 after zero padding bottom/right by one (diffusers' padding=0 Downsample2D)."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.channels, 3, self.dtype, 'conv', stride=2, padding='VALID')(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x, then conv3x3."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(self.channels, 3, self.dtype, 'conv')(x)


class DownBlock(nn.Module):
  """`num_layers` resnets, then a Downsample unless it is the last block (DownEncoderBlock2D)."""

  channels: int
  groups: int
  num_layers: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.num_layers):
      x = ResnetBlock(self.channels, self.groups, self.dtype, name=f'resnets_{j}')(x)
    if self.downsample:
      x = Downsample(self.channels, self.dtype, name='downsamplers_0')(x)
    return x


class UpBlock(nn.Module):
  """`num_layers` resnets, then an Upsample unless it is the last block (UpDecoderBlock2D)."""

  channels: int
  groups: int
  num_layers: int
  upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.num_layers):
      x = ResnetBlock(self.channels, self.groups, self.dtype, name=f'resnets_{j}')(x)
    if self.upsample:
      x = Upsample(self.channels, self.dtype, name='upsamplers_0')(x)
    return x


class Encoder(nn.Module):
  """Images (B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels) moments before quant_conv."""

  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, g = self.config, self.config.norm_num_groups
    x = _conv(cfg.block_out_channels[0], 3, self.dtype, 'conv_in')(x)
    last = len(cfg.block_out_channels) - 1
    for i, channels in enumerate(cfg.block_out_channels):
      x = DownBlock(channels, g, cfg.layers_per_block, i < last, self.dtype, name=f'down_blocks_{i}')(x)
    x = MidBlock(cfg.block_out_channels[-1], g, cfg.mid_block_add_attention, self.dtype, name='mid_block')(x)
    x = nn.silu(_group_norm(g, self.dtype, 'conv_norm_out')(x))
    return _conv(2 * cfg.latent_channels, 3, self.dtype, 'conv_out')(x)


class Decoder(nn.Module):
  """Latents (B, h, w, latent_channels) after post_quant_conv -> images (B, h*f, w*f, out_channels)."""

  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg, g = self.config, self.config.norm_num_groups
    channels = tuple(reversed(cfg.block_out_channels))
    x = _conv(channels[0], 3, self.dtype, 'conv_in')(z)
    x = MidBlock(channels[0], g, cfg.mid_block_add_attention, self.dtype, name='mid_block')(x)
    for i, c in enumerate(channels):
      x = UpBlock(c, g, cfg.layers_per_block + 1, i < len(channels) - 1, self.dtype, name=f'up_blocks_{i}')(x)
    x = nn.silu(_group_norm(g, self.dtype, 'conv_norm_out')(x))
    return _conv(cfg.out_channels, 3, self.dtype, 'conv_out')(x)


class AutoencoderKL(nn.Module):
  """`encode` -> (mean, logvar) of the latent Gaussian; `decode` -> images. Unscaled latents."""

  config: VAEConfig = VAEConfig()
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, self.dtype, 'quant_conv')
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, self.dtype, 'post_quant_conv')

  def encode(self, x: Array) -> tuple[Array, Array]:
    """Images (B, H, W, C) in [-1, 1] -> mean, logvar, each (B, H/f, W/f, latent_channels)."""
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp

  def decode(self, z: Array) -> Array:
    """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: Array) -> Array:
    """Reconstruction from the latent mean; touches every parameter, so `init` uses it."""
    return self.decode(self.encode(x)[0])


def init_params(module: AutoencoderKL, key: Array, image_size: int | None = None) -> dict:
  """Random params of `module`, built on one (1, S, S, C) image (S = the smallest valid size)."""
  size = image_size or module.config.downscale
  x = jnp.zeros((1, size, size, module.config.in_channels), jnp.float32)
  return module.init(key, x)['params']


def encode_images(module: AutoencoderKL, params: dict, images: Array, key: Array | None = None) -> Array:
  """Images in [-1, 1] -> DiT latents: the posterior mean (or a sample when `key`) * 0.18215."""
  mean, logvar = module.apply({'params': params}, images, method=AutoencoderKL.encode)
  if key is not None:
    mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
  return mean * LATENT_SCALE


def decode_latents(module: AutoencoderKL, params: dict, latents: Array) -> Array:
  """DiT latents -> images in about [-1, 1]: decode(latents / 0.18215), as the original sample.py."""
  return module.apply({'params': params}, latents / LATENT_SCALE, method=AutoencoderKL.decode)
