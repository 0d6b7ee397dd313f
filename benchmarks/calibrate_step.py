r"""Calibration step cost: quantized DiT-S/2 calibration step vs a plain fp DiT-S/2 training step,
the remat modes of the step (config.calibrate.remat), and the peak memory of one DiT-XL/2
calibration step at batch 1.

  .venv/bin/python -m benchmarks.calibrate_step                     # all three tables
  .venv/bin/python -m benchmarks.calibrate_step --skip-xl --skip-remat --batch 8 --repeats 5
  .venv/bin/python -m benchmarks.calibrate_step --skip-s --skip-xl --remat-models DiT-4x1152x16/2:2

Step time: the same jitted train step (dpq_jax.calibrate.train_step, DDPM loss mse + vb, Adam,
global-norm clip, label dropout), the same batch of 32x32x4 latents, in this process:
  fp          plain DiT-S/2, every parameter trained (a DiT training step)
  pq dynamic  PQ K=256 d=8 (1 bit/weight) on the 60 block layers, codebooks trained, codes
              recomputed (argmin over the codebooks) in every forward: the calibration step
  pq frozen   the same with fixed codes (assign_every=0): what the assignment costs
Codebooks are K random sub-vectors of each kernel (k-means quality does not change the cost).
Times are medians of --repeats steps after compilation, runs interleaved.

Remat: the 'pq dynamic' step with config.calibrate.remat = none (every decoded kernel and activation
kept for the backward pass), decoded (each quantized layer's decoded kernel re-gathered from codebooks
+ codes in the backward) and blocks (whole DiT blocks rematerialised), per --remat-models entry
MODEL:BATCH; XLA's compiled memory analysis (temporaries: the buffers the step allocates besides its
arguments and outputs) and the median step time, with ratios to 'none'.

XL memory: a fresh subprocess builds DiT-XL/2 (random weights) with PQ K=256 d=8 and runs one
calibration step at batch 1 on one device; it prints XLA's compiled memory analysis and the
process's peak RSS (ru_maxrss) before and after the step. The latent weights of the dynamic
assignment are the fp kernels themselves (no copy).
"""

import os
import time

import jax
import numpy as np

from benchmarks import _calibration, _common
from dpq_jax.calibrate import train_step as step_lib
from dpq_jax.calibrate import trainable as trainable_lib
from dpq_jax.models import dit
from dpq_jax.quant import surgery


def step_times(args) -> None:
  model = dit.create_model('DiT-S/2', input_size=32)
  params = _common.random_dit_params(model)
  rules = surgery.default_rules('pq', 256, 8)
  batch = _common.latent_batch(args.batch)
  variants = ['fp', 'pq dynamic', 'pq frozen']
  runs, compile_s = [], {}
  for v in variants:
    jstep, state, frozen = _calibration.make_step(model, rules, params, v, args.batch)
    t0 = time.perf_counter()
    state, m = jstep(state, frozen, batch)
    jax.block_until_ready(m)
    compile_s[v] = time.perf_counter() - t0
    runs.append([jstep, state, frozen])
  medians = dict(zip(variants, _calibration.median_step_times(runs, batch, args.repeats)))
  print(f'\nDiT-S/2, 32x32x4 latents, batch {args.batch}, {jax.devices()[0].platform} '
        f'({os.cpu_count()} cores), median of {args.repeats} steps\n')  # fmt: skip
  _common.print_header(['step', 'trained params', 'first call (compile) s', 'step s', 'vs fp'])
  for v, run in zip(variants, runs):
    n = trainable_lib.count(run[1]['params'])
    print(f'| {v} | {n:,} | {compile_s[v]:.1f} | {medians[v]:.3f} | {medians[v] / medians["fp"]:.2f}x |')


def remat_table(args) -> None:
  rows = []
  for name, batch in args.remat_models:
    rows += _calibration.measure_remat(name, batch, args.repeats)
  gib = 2**30
  print(f'\nRemat modes of the PQ K=256 d=8 dynamic calibration step, {jax.devices()[0].platform} '
        f'({os.cpu_count()} cores), one device, median of {args.repeats} steps\n')  # fmt: skip
  _common.print_header(['model', 'batch', 'remat', 'XLA temporaries GiB', 'vs none', 'XLA arguments GiB', 'compile s',
                        'step s', 'vs none', 'loss'])  # fmt: skip
  base = {}
  for r in rows:
    key = (r['model'], r['batch'])
    base.setdefault(key, r)
    b = base[key]
    print(f'| {r["model"]} | {r["batch"]} | {r["remat"]} | {r["temp"] / gib:.3f} | {r["temp"] / b["temp"]:.2f}x '
          f'| {r["args"] / gib:.3f} | {r["compile_s"]:.1f} | {r["step_s"]:.3f} | {r["step_s"] / b["step_s"]:.2f}x '
          f'| {r["loss"]:.6f} |')  # fmt: skip


def xl_step(remat: str) -> dict:
  """One DiT-XL/2 'pq dynamic' step at batch 1 (run in a child process): memory analysis in GiB, peak RSS, times."""
  rss = lambda: _common.peak_rss_bytes() / 2**30
  model = dit.create_model('DiT-XL/2', input_size=32)
  params = _common.random_dit_params(model)
  n = sum(x.size for x in jax.tree.leaves(params))
  rules = surgery.default_rules('pq', 256, 8)
  jstep, state, frozen = _calibration.make_step(model, rules, params, 'pq dynamic', 1, remat)
  batch = dict(_common.latent_batch(1), labels=np.zeros((1,), np.int32))
  before = rss()
  t0 = time.perf_counter()
  compiled = jstep.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  t0 = time.perf_counter()
  state, m = compiled(state, frozen, batch)
  jax.block_until_ready(m)
  step_s = time.perf_counter() - t0
  return dict(params=int(n), fp32_gib=4 * n / 2**30, rss_before=before, rss_after=rss(), compile_s=compile_s,
              step_s=step_s, loss=float(m['loss']), args=mem.argument_size_in_bytes / 2**30,
              temp=mem.temp_size_in_bytes / 2**30, out=mem.output_size_in_bytes / 2**30,
              alias=mem.alias_size_in_bytes / 2**30)  # fmt: skip


def xl_memory(remat: str = 'none') -> None:
  try:
    d = _common.in_child(xl_step, remat)
  except Exception as e:  # the child's own traceback is the cause; the other tables still print
    print(f'XL memory run failed:\n{e.__cause__ or repr(e)}')
    return
  print(f'\nDiT-XL/2 calibration step, PQ K=256 d=8 on the 140 block layers, batch 1, remat={remat}, one CPU device\n')
  _common.print_header(['quantity', 'GiB'])
  print(f'| fp32 weights of the model ({d["params"]:,} params) | {d["fp32_gib"]:.2f} |')
  print(f'| XLA: step arguments (state + frozen + batch) | {d["args"]:.2f} |')
  print(f'| XLA: step temporaries (activations, gradients, assignment) | {d["temp"]:.2f} |')
  print(f'| XLA: step outputs (new state, aliased to the donated one: {d["alias"]:.2f}) | {d["out"]:.2f} |')
  print(f'| process peak RSS after setup (before compiling the step) | {d["rss_before"]:.2f} |')
  print(f'| process peak RSS after one step | {d["rss_after"]:.2f} |')
  print(f'\ncompile {d["compile_s"]:.1f} s, step {d["step_s"]:.1f} s, loss {d["loss"]:.4f}')


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--batch', type=_common.integer(1), default=8)
  parser.add_argument('--repeats', type=_common.integer(1), default=5)
  parser.add_argument('--skip-xl', action='store_true')
  parser.add_argument('--skip-s', action='store_true')
  parser.add_argument('--skip-remat', action='store_true')
  parser.add_argument(
    '--remat-models',
    type=_common.model_batches,
    default='DiT-S/2:8,DiT-4x1152x16/2:2',
    help='MODEL:BATCH,... for the remat table (custom names DiT-<depth>x<hidden>x<heads>/<patch>)',
  )
  parser.add_argument('--xl-remat', default='none', choices=step_lib.REMAT_MODES)
  args = parser.parse_args(argv)
  if not args.skip_s:
    step_times(args)
  if not args.skip_remat:
    remat_table(args)
  if not args.skip_xl:
    xl_memory(args.xl_remat)


if __name__ == '__main__':
  main()
