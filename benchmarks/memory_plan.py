r"""Per-device memory of a DiT-XL/2 calibration step for a mesh and batch, computed from the real shapes.

  .venv/bin/python benchmarks/memory_plan.py                        # v5e-8 and 8x A100-40GB plans
  .venv/bin/python benchmarks/memory_plan.py --data 2 --fsdp 4 --batch 32 --hbm-gib 16

Counted per device, float32 as the calibration step keeps them (`dpq_jax/calibrate/`):
  latent     the full-precision block kernels the assignments are computed from (frozen), FSDP-sharded
  other fp   embedders, final layer, biases (frozen), FSDP-sharded
  codebooks  [num_codebooks, K, d] per layer (trained), FSDP-sharded; Adam keeps 2 more copies + 1 gradient
  codes      uint8/uint16 [num_subvectors, C_out] per layer, FSDP-sharded
  decoded    W_hat = codebooks[codes]: all-gathered per layer for its matmul. Kept for the backward pass
             (what the step does now) it is the whole quantized model per device; recomputed in the
             backward pass (jax.checkpoint per block, not implemented yet) only the largest block's.
  acts       activations kept for the backward pass: per sample and block ~17 T*h + heads*T^2 floats
             (T = 256 tokens, h = 1152), times the per-device batch (the global batch is split over data x fsdp).
The first table checks the model against XLA's own memory analysis of the real step at batch 1 on one
CPU device (benchmarks/calibrate_step.py --skip-s: arguments 3.33 GiB, temporaries 3.76 GiB).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dpq_jax.models import dit  # noqa: E402
from dpq_jax.quant import layers  # noqa: E402

GIB = 2**30
PLANS = {  # name -> (data, fsdp, global batch, HBM GiB per device)
  'v5e-8 (16 GiB/chip), fsdp 8': (1, 8, 128, 16),
  'v5e-8 (16 GiB/chip), data 8 (no fsdp)': (8, 1, 128, 16),
  '8x A100-40GB, fsdp 8': (1, 8, 256, 40),
  '8x A100-40GB, data 2 x fsdp 4': (2, 4, 256, 40),
}


def shapes(model_name: str, k: int, d: int) -> dict:
  import re

  model = dit.create_model(model_name, input_size=32)
  tree = jax.eval_shape(lambda key: dit.init_params(model, key), jax.random.key(0))
  out = {'latent': 0, 'other': 0, 'codebooks': 0, 'codes': 0, 'largest_block_kernels': 0}
  block = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = '/'.join(p.key for p in path)
    n = int(np.prod(leaf.shape))
    module = name.rsplit('/', 1)[0]
    if name.endswith('kernel') and re.fullmatch(layers.DEFAULT_PATTERN, module):
      c_in, c_out = leaf.shape
      out['latent'] += 4 * n
      out['codebooks'] += 4 * (c_in // d) * k * d
      out['codes'] += (1 if k <= 256 else 2) * (c_in // d) * c_out
      b = module.split('/')[0]
      block[b] = block.get(b, 0) + 4 * n
    else:
      out['other'] += 4 * n
  out['largest_block_kernels'] = max(block.values())
  hidden, tokens, heads = model.hidden_size, (32 // model.patch_size) ** 2, model.num_heads
  out['acts_per_sample'] = 4 * model.depth * (17 * tokens * hidden + heads * tokens * tokens)
  return out


def plan(s: dict, data: int, fsdp: int, batch: int, remat: bool) -> dict:
  per = {
    'latent': s['latent'] / fsdp,
    'other fp': s['other'] / fsdp,
    'codebooks + Adam + grad': 4 * s['codebooks'] / fsdp,
    'codes': s['codes'] / fsdp,
    'decoded': 2 * s['largest_block_kernels'] if remat else s['latent'],
    'acts': s['acts_per_sample'] * batch / (data * fsdp),  # the batch is split over both mesh axes
  }
  per['total'] = sum(per.values())
  return per


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='DiT-XL/2')
  parser.add_argument('--k', type=int, default=256)
  parser.add_argument('--d', type=int, default=8)
  parser.add_argument('--data', type=int, default=0, help='a custom plan: data-parallel size')
  parser.add_argument('--fsdp', type=int, default=1)
  parser.add_argument('--batch', type=int, default=32, help='global batch')
  parser.add_argument('--hbm-gib', type=float, default=16.0)
  args = parser.parse_args(argv)
  for flag, v in (('--fsdp', args.fsdp), ('--batch', args.batch), ('--k', args.k), ('--d', args.d)):
    if v < 1:
      parser.error(f'{flag}={v}: expected >= 1')
  if args.data and args.batch % (args.data * args.fsdp):
    parser.error(f'--batch={args.batch}: expected a multiple of --data x --fsdp = {args.data * args.fsdp}')
  s = shapes(args.model, args.k, args.d)
  cols = ['latent', 'other fp', 'codebooks + Adam + grad', 'codes', 'decoded', 'acts', 'total']

  print(f'{args.model}, PQ K={args.k} d={args.d}: block kernels {s["latent"] / GIB:.2f} GiB fp32, codebooks '
        f'{s["codebooks"] / GIB:.3f} GiB, activations {s["acts_per_sample"] / GIB:.3f} GiB per sample\n')  # fmt: skip
  one = plan(s, 1, 1, 1, remat=False)
  args_gib = (one['latent'] + one['other fp'] + 3 * s['codebooks'] / 1 + one['codes']) / GIB
  temps_gib = (one['decoded'] + one['acts'] + s['codebooks']) / GIB
  print('| check: batch 1, one device | this model GiB | XLA memory analysis GiB |')
  print('|---|---|---|')
  print(f'| arguments (weights, codebooks, Adam, codes) | {args_gib:.2f} | 3.33 |')
  print(f'| temporaries (decoded kernels, activations, gradients) | {temps_gib:.2f} | 3.76 |\n')

  plans = dict(PLANS)
  if args.data:
    plans[f'custom: data {args.data} x fsdp {args.fsdp}, {args.hbm_gib:g} GiB'] = (
      args.data,
      args.fsdp,
      args.batch,
      args.hbm_gib,
    )
  print('| plan | batch (per device) | decoded kernels | ' + ' | '.join(cols) + ' | HBM | fits |')
  print('|---|---|---|' + '---|' * len(cols) + '---|---|')
  for name, (data, fsdp, batch, hbm) in plans.items():
    for remat in (False, True):
      p = plan(s, data, fsdp, batch, remat)
      fits = 'yes' if p['total'] < 0.9 * hbm * GIB else 'no'
      mode = 'recomputed per block' if remat else 'kept (now)'
      print(f'| {name} | {batch} ({batch // (data * fsdp)}) | {mode} | ' + ' | '.join(f'{p[c] / GIB:.2f}' for c in cols)
            + f' | {hbm:g} | {fits} |')  # fmt: skip


if __name__ == '__main__':
  main()
