r"""What a rematerialised block's backward pass costs when it runs the dynamic assignment again.

  .venv/bin/python -m benchmarks.remat_keep                       # the demo's DiT, batch 64, 9 steps
  .venv/bin/python -m benchmarks.remat_keep --model DiT-S/2 --input-size 32 --batch 8

The calibration step of config.calibrate.remat 'blocks' and 'dots' (blocks under nn.scan, as the stage runs
them) with PQ K=256 d=8 on every block layer, three ways in one process, runs interleaved:
  frozen            stored codes (assign_every=0): no argmin at all
  dynamic, again    the argmin in the forward and again in the backward's recomputation (before dit.REMAT_KEEP)
  dynamic, kept     the argmin in the forward only: the block keeps its codes (dit.REMAT_KEEP, today)
Codebooks are K random sub-vectors of each kernel (the cost does not depend on them). The two dynamic steps give
the same loss, printed; 'assignment' is the step minus the frozen step.
"""

import argparse
import os
import time

import jax

from benchmarks import _calibration, _common
from dpq_jax.models import dit
from dpq_jax.quant import surgery


def _policy_without_keep(name):  # the policy before dit.REMAT_KEEP: the block keeps nothing of the assignment
  return None if name is None else getattr(jax.checkpoint_policies, name)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='DiT-2x640x10/4')
  parser.add_argument('--input-size', type=int, default=8)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=9)
  parser.add_argument('--remat', default='blocks,dots')
  args = parser.parse_args()
  model = dit.create_model(args.model, input_size=args.input_size)
  params = _common.random_dit_params(model)
  rules = surgery.default_rules('pq', 256, 8)
  batch = _common.latent_batch(args.batch, args.input_size)
  names, runs, compile_s, losses = [], [], [], []
  keep = dit.remat_policy
  for remat in args.remat.split(','):
    for variant, label in (('pq frozen', 'frozen'), ('pq dynamic', 'dynamic, again'), ('pq dynamic', 'dynamic, kept')):
      dit.remat_policy = _policy_without_keep if label == 'dynamic, again' else keep
      try:
        jstep, state, frozen = _calibration.make_step(model, rules, params, variant, args.batch, remat, scan=True)
        t0 = time.perf_counter()
        state, m = jstep(state, frozen, batch)  # traced and compiled here, under the policy set above
        jax.block_until_ready(m)
      finally:
        dit.remat_policy = keep
      compile_s.append(time.perf_counter() - t0)
      losses.append(float(m['loss']))
      names.append((remat, label))
      runs.append([jstep, state, frozen])
  medians = _calibration.median_step_times(runs, batch, args.repeats, progress=True)
  print(f'\n{args.model} at {args.input_size}x{args.input_size}, batch {args.batch}, blocks under nn.scan, '
        f'{jax.devices()[0].platform} ({os.cpu_count()} cores), median of {args.repeats} steps, runs interleaved\n')  # fmt: skip
  _common.print_header(['remat', 'step', 'first call (compile) s', 'step s', 'assignment s', 'vs again', 'loss'])
  frozen_s, again_s = {}, {}
  for (remat, label), first, step_s, loss in zip(names, compile_s, medians, losses):
    if label == 'frozen':
      frozen_s[remat] = step_s
    if label == 'dynamic, again':
      again_s[remat] = step_s
    assign = '-' if label == 'frozen' else f'{step_s - frozen_s[remat]:.3f}'
    ratio = f'{step_s / again_s[remat]:.2f}x' if label != 'frozen' else '-'
    print(f'| {remat} | {label} | {first:.1f} | {step_s:.3f} | {assign} | {ratio} | {loss:.6f} |')


if __name__ == '__main__':
  main()
