"""Independent PyTorch references: diffusers' DiT with random weights, set up as the original, and the FID
Inception's input transform.

The one oracle of the parity checks: benchmarks/parity.py, benchmarks/inception_speed.py and the tests
(tests/models, tests/evaluate) import it.

diffusers' DiT differs from the original in two constants: its timestep embedding divides
the frequencies by (half - 1) instead of half (downscale_freq_shift=1) and its pre-MLP
LayerNorm uses eps 1e-5. Both are set to the original's values here, which makes diffusers
compute exactly the original DiT. Every block of diffusers has its own copy of the
timestep/label embedders; the original shares one, so the copies are tied to block 0's.
"""

from __future__ import annotations

import numpy as np
import torch

# diffusers' DiT sizes for the registry names: (heads, head_dim, layers).
DIFFUSERS_SIZES = {'S': (6, 64, 12), 'B': (12, 64, 12), 'L': (16, 64, 24), 'XL': (16, 72, 28)}


def random_diffusers_dit(size: str = 'S', patch: int = 2, sample_size: int = 8, num_classes: int = 10, seed: int = 0):
  """A diffusers DiTTransformer2DModel computing the original DiT, with nothing trivially zero."""
  from diffusers import DiTTransformer2DModel

  heads, head_dim, layers = DIFFUSERS_SIZES[size]
  torch.manual_seed(seed)
  model = DiTTransformer2DModel(
    num_attention_heads=heads,
    attention_head_dim=head_dim,
    num_layers=layers,
    sample_size=sample_size,
    patch_size=patch,
    in_channels=4,
    out_channels=8,
    norm_eps=1e-6,  # the original's pre-MLP LayerNorm eps
    num_embeds_ada_norm=num_classes,
  ).eval()
  gen = torch.Generator().manual_seed(seed)
  state = model.state_dict()
  with torch.no_grad():
    for key, value in state.items():
      # Re-randomise everything, including the zero-initialised adaLN and output layers.
      fan_in = value.shape[-1] if value.ndim > 1 else value.shape[0]
      value.copy_(torch.randn(value.shape, generator=gen) / np.sqrt(fan_in))
    for key, value in state.items():
      if '.norm1.emb.' in key and not key.startswith('transformer_blocks.0.'):
        value.copy_(state['transformer_blocks.0.' + key.split('.', 2)[2]])
  for block in model.transformer_blocks:
    block.norm1.emb.time_proj.downscale_freq_shift = 0  # the original divides by half
  return model


def diffusers_forward(model, x_nhwc: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(y))
  return out.sample.numpy().transpose(0, 2, 3, 1)


def original_cfg(model_out_nchw: torch.Tensor, cfg_scale: float) -> torch.Tensor:
  """The original DiT forward_with_cfg's guidance, applied to a [cond; uncond] model output."""
  eps, rest = model_out_nchw[:, :3], model_out_nchw[:, 3:]
  cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
  half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
  eps = torch.cat([half_eps, half_eps], dim=0)
  return torch.cat([eps, rest], dim=1)


def state_dict_numpy(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def inception_input(images: np.ndarray) -> torch.Tensor:
  """NHWC uint8-range images -> the FID Inception's NCHW input: TF1's resize to 299 as NVIDIA's nv_bilinear
  (affine_grid + grid_sample), then (x - 128) / 128."""
  x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
  n, c, h, w = x.shape
  if (h, w) != (299, 299):
    theta = torch.eye(2, 3)
    theta[0, 2] += 1 / w - 1 / 299
    theta[1, 2] += 1 / h - 1 / 299
    grid = torch.nn.functional.affine_grid(theta[None].repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
  return (x - 128) / 128
