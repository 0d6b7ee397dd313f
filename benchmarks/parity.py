r"""Flax DiT vs diffusers' DiT (set up as the original) on random weights: error and speed.

  .venv/bin/python -m benchmarks.parity                  # DiT-S/2, DiT-B/4, DiT-XL/2 at 256px
  .venv/bin/python -m benchmarks.parity --models DiT-S/2 --batch 4

Weights are random (nothing trivially zero), converted with dpq_jax.convert; inputs cover
t in {0, 1, 500, 999} and the null label. Prints max relative error (max |diff| / max |ref|)
for forward and forward_with_cfg, and forward time of each framework in the same process.
"""

import os

import jax
import numpy as np
import torch

from benchmarks import _common
from benchmarks import torch_reference as torch_refs
from dpq_jax import convert
from dpq_jax.models import dit


def _time(fn, repeats):
  fn()  # warm-up / compile
  return _common.best_of(fn, repeats)[1]


def run(name, input_size, batch, repeats):
  size, patch = name[len('DiT-') :].split('/')
  ref = torch_refs.random_diffusers_dit(size, patch=int(patch), sample_size=input_size, num_classes=1000)
  state = convert.diffusers_to_original(torch_refs.state_dict_numpy(ref))
  spec = convert.infer_spec(state, name, input_size)
  params = jax.device_put(convert.original_to_flax(state, spec))
  del state
  model = spec.create()
  rng = np.random.RandomState(0)
  x = rng.randn(batch, input_size, input_size, 4).astype(np.float32)
  t = np.resize(np.array([0, 1, 500, 999]), batch)
  y = np.resize(np.array([207, 1000, 360, 1000]), batch)
  fwd = jax.jit(lambda p, x, t, y: model.apply({'params': p}, x, t, y))
  got = np.asarray(fwd(params, x, t, y))
  want = torch_refs.diffusers_forward(ref, x, t, y)
  err = np.abs(got - want).max() / np.abs(want).max()
  half = x[: batch // 2]
  xc = np.concatenate([half, half])
  yc = np.concatenate([y[: batch // 2], np.full(batch // 2, 1000)])
  cfg = jax.jit(lambda p, x, t, y: model.apply({'params': p}, x, t, y, 1.5, method='forward_with_cfg'))
  got_c = np.asarray(cfg(params, xc, t, yc))
  with torch.no_grad():
    raw = ref(torch.from_numpy(xc.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(yc)).sample
  want_c = torch_refs.original_cfg(raw, 1.5).numpy().transpose(0, 2, 3, 1)
  err_c = np.abs(got_c - want_c).max() / np.abs(want_c).max()
  t_jax = _time(lambda: fwd(params, x, t, y).block_until_ready(), repeats)
  t_torch = _time(lambda: torch_refs.diffusers_forward(ref, x, t, y), repeats)
  return err, err_c, t_jax, t_torch


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--models', type=_common.subset(dit.MODEL_NAMES), default='DiT-S/2,DiT-B/4,DiT-XL/2')
  parser.add_argument('--input-size', type=_common.integer(1), default=32)
  parser.add_argument('--batch', type=_common.integer(2), default=4, help='even: half conditional, half null for cfg')
  parser.add_argument('--repeats', type=_common.integer(1), default=3)
  args = parser.parse_args(argv)
  if args.batch % 2:
    parser.error(f'argument --batch: expected an even number, got {args.batch}')
  torch.set_num_threads(os.cpu_count())
  print(f'jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, batch {args.batch}')
  _common.print_header(['model', 'latent', 'fwd max rel err', 'cfg max rel err', 'Flax fwd (s)', 'PyTorch fwd (s)',
                        'Flax/PyTorch time'])  # fmt: skip
  for name in args.models:
    err, err_c, tj, tt = run(name, args.input_size, args.batch, args.repeats)
    print(f'| {name} | {args.input_size} | {err:.2e} | {err_c:.2e} | {tj:.3f} | {tt:.3f} | {tj / tt:.2f} |', flush=True)


if __name__ == '__main__':
  main()
