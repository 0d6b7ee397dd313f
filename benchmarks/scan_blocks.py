r"""Blocks under nn.scan (config.model.scan_blocks) vs unrolled: compile time, step time and XLA peak memory of
the calibration train step and of the sampler step.

  .venv/bin/python -m benchmarks.scan_blocks                          # DiT-S/2: both tables
  .venv/bin/python -m benchmarks.scan_blocks --model DiT-XL/2 --batch 1 --skip-unrolled --skip-fp-step \
      --remat blocks --repeats 0                                      # XL scanned: compile + XLA memory only
  .venv/bin/python -m benchmarks.scan_blocks --skip-sampler --remat none,decoded,blocks --repeats 3

Calibration step (batch --batch): the jitted step of dpq_jax.calibrate.train_step as benchmarks/_calibration.py
builds it: 'fp' a plain DiT training step, 'pq' PQ K=256 d=8 (1 bit/weight) on the 5 layers of every block,
codebooks trained, codes recomputed in every forward (dynamic assignment); codebooks are K random sub-vectors
of each kernel. Unrolled with remat 'none' (today's default) vs scanned with each --remat mode
(config.calibrate.remat: none | decoded | blocks | dots). Step s: the median of --repeats steps, runs interleaved.

Sampler step (batch --sampler-batch, guidance 1.5, so the model runs on twice the batch): one compiled call of
--steps DDPM steps (dpq_jax.diffusion.sampling.scan_steps, what the sampler runs 25 steps at a time) of the
fp model and of the PQ model decoding its kernels on the fly (config.quant.dequantize='on_the_fly'). Run s:
the best of --repeats calls.

Peak MiB is XLA's memory analysis of the compiled call: arguments + outputs + temporaries - aliased, i.e. what
the device holds while it runs. DiT-XL/2 is measured scanned only (an unrolled XL step compiles for
~800 s here): its unrolled figures are the README's (calibration step at batch 1: compile 804 s, 3.33 GiB
arguments + 3.76 GiB temporaries, 25.3 s/step on the loaded machine, 2026-11-25).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _calibration, _common
from dpq_jax import diffusion as diffusion_lib
from dpq_jax.calibrate import train_step as step_lib
from dpq_jax.diffusion import sampling
from dpq_jax.evaluate import sampler as sampler_lib
from dpq_jax.models import dit
from dpq_jax.models import scan as scan_lib
from dpq_jax.quant import layers, surgery

MIB = 2**20


def _peak(compiled) -> tuple[float, float, float]:
  """(arguments, temporaries, peak) MiB of XLA's memory analysis of a compiled call."""
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  return m.argument_size_in_bytes / MIB, m.temp_size_in_bytes / MIB, peak / MIB


def step_table(name: str, batch_size: int, remats: list[str], repeats: int, unrolled: bool, fp: bool) -> list[dict]:
  """Rows of the calibration step: fp (when `fp`) and pq, unrolled (remat none) and scanned (each remat mode)."""
  model = dit.create_model(name, input_size=32)
  params = _common.random_dit_params(model)
  rules = surgery.default_rules('pq', 256, 8)
  batch = _common.latent_batch(batch_size)
  cases = ([('fp', False, 'none')] * unrolled + [('fp', True, 'none')]) * fp
  cases += [('pq dynamic', False, 'none')] * unrolled + [('pq dynamic', True, r) for r in remats]
  rows, runs = [], []
  for variant, scan, remat in cases:
    jstep, state, frozen = _calibration.make_step(model, rules, params, variant, batch_size, remat=remat, scan=scan)
    t0 = time.perf_counter()
    compiled = jstep.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    args, temp, peak = _peak(compiled)
    loss = None
    if repeats:  # --repeats 0: compile and memory analysis only
      state, m = compiled(state, frozen, batch)  # warm-up; the first step's loss
      loss = float(m['loss'])
    row = dict(model=name, batch=batch_size, step=variant.split()[0], layout='scan' if scan else 'unrolled')
    rows.append(dict(row, remat=remat, compile_s=compile_s, args=args, temp=temp, peak=peak, loss=loss))
    runs.append([compiled, state, frozen])
    print(
      f'  compiled {name} {variant} {row["layout"]} remat={remat}: {compile_s:.1f} s, peak {peak:.1f} MiB', flush=True
    )
  if repeats:
    for row, step_s in zip(rows, _calibration.median_step_times(runs, batch, repeats)):
      row['step_s'] = step_s
  return rows


def sampler_table(name: str, batch_size: int, steps: int, repeats: int, unrolled: bool) -> list[dict]:
  """Rows of the sampler step: fp and pq (on-the-fly decoding), unrolled and scanned."""
  model = dit.create_model(name, input_size=32)
  params = _common.random_dit_params(model)
  rules = surgery.default_rules('pq', 256, 8)
  qparams, quant = _calibration.random_pq(params, rules)
  variants = {
    'fp': (model, {'params': params}),
    'pq': (model.clone(dense=layers.dense_factory(rules)), {'params': qparams, 'quant': quant}),
  }
  diffusion = diffusion_lib.create_diffusion(str(steps))
  mesh = sampler_lib.data_mesh(jax.devices()[:1])
  indices, labels = np.arange(batch_size), np.arange(batch_size) % 1000
  rows, calls = [], {}
  for variant, (m, variables) in variants.items():
    for scan in (False, True)[0 if unrolled else 1 :]:
      run_model, run_vars, _ = scan_lib.runnable(m.clone(scan_blocks=scan), variables)
      s = sampler_lib.Sampler(run_model, run_vars, diffusion, 'ddpm', 1.5, 0, mesh)
      keys = sampler_lib.sample_keys(0, indices)
      x = sampler_lib.initial_noise(keys, s.shape)
      args = (s.variables, x, keys, jnp.arange(steps, dtype=jnp.int32)[::-1], {'y': jnp.asarray(labels)}, 0.0)
      t0 = time.perf_counter()
      compiled = sampling.scan_steps.lower(
        s.diffusion, s.apply_fn, 'ddpm', False, True, sampler_lib.own_step_noise, *args
      ).compile()  # fmt: skip
      compile_s = time.perf_counter() - t0
      _, _, peak = _peak(compiled)
      layout = 'scan' if scan else 'unrolled'
      out = np.asarray(compiled(*args)) if repeats else None
      rows.append(dict(model=name, batch=batch_size, step=variant, layout=layout, compile_s=compile_s, peak=peak,
                       out=out))  # fmt: skip
      calls[(variant, layout)] = lambda c=compiled, a=args: c(*a).block_until_ready()
      print(f'  compiled {name} sampler {variant} {layout}: {compile_s:.1f} s, peak {peak:.1f} MiB', flush=True)
  if repeats:
    best = _common.interleaved_best(calls, repeats)
    for row in rows:
      row['run_s'] = best[(row['step'], row['layout'])]
  return rows


def _fmt(v, spec='.2f') -> str:
  return '-' if v is None else format(v, spec)


def print_steps(rows: list[dict]) -> None:
  base = {(r['model'], r['step']): r for r in rows if r['layout'] == 'unrolled'}
  fp_scan = {r['model']: r for r in rows if r['step'] == 'fp' and r['layout'] == 'scan'}
  _common.print_header(['model', 'batch', 'step', 'layout', 'remat', 'compile s', 'compile vs unrolled', 'args MiB',
                        'temp MiB', 'peak MiB (XLA)', 'peak vs unrolled', 'step s', 'step vs unrolled',
                        'step vs fp (scan)', 'loss'])  # fmt: skip
  for r in rows:
    b = base.get((r['model'], r['step']))
    fp = fp_scan.get(r['model'])
    ratio = lambda k: None if b is None or r.get(k) is None or b.get(k) is None else r[k] / b[k]  # noqa: E731
    vs_fp = None if fp is None or r.get('step_s') is None else r['step_s'] / fp['step_s']
    print(f'| {r["model"]} | {r["batch"]} | {r["step"]} | {r["layout"]} | {r["remat"]} | {r["compile_s"]:.1f} | '
          f'{_fmt(ratio("compile_s"))}x | {r["args"]:.1f} | {r["temp"]:.1f} | {r["peak"]:.1f} | {_fmt(ratio("peak"))}x | '
          f'{_fmt(r.get("step_s"), ".3f")} | {_fmt(ratio("step_s"))}x | {_fmt(vs_fp)}x | {_fmt(r["loss"], ".6f")} |')  # fmt: skip


def print_sampler(rows: list[dict]) -> None:
  fp = {r['model']: r for r in rows if r['step'] == 'fp' and r['layout'] == 'unrolled'}
  fp = fp or {r['model']: r for r in rows if r['step'] == 'fp'}
  same = {(r['model'], r['step']): r for r in rows if r['layout'] == 'unrolled'}
  _common.print_header(['model', 'batch', 'model weights', 'layout', 'compile s', 'run s', 'peak MiB (XLA)',
                        'peak vs fp', 'run vs fp', 'max diff vs unrolled'])  # fmt: skip
  for r in rows:
    f, u = fp[r['model']], same.get((r['model'], r['step']))
    diff = (
      '-'
      if u is None or u is r or r['out'] is None
      else f'{np.abs(r["out"] - u["out"]).max() / np.abs(u["out"]).max():.1e}'
    )
    run_vs = None if r.get('run_s') is None else r['run_s'] / f['run_s']
    print(
      f'| {r["model"]} | {r["batch"]} | {r["step"]} | {r["layout"]} | {r["compile_s"]:.1f} | '
      f'{_fmt(r.get("run_s"), ".3f")} | {r["peak"]:.1f} | {r["peak"] / f["peak"]:.2f}x | {_fmt(run_vs)}x | {diff} |'
    )


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--model', type=_common.dit_name, default='DiT-S/2')
  parser.add_argument('--batch', type=_common.integer(1), default=8, help='calibration step batch')
  parser.add_argument('--sampler-batch', type=_common.integer(1), default=8)
  parser.add_argument('--steps', type=_common.integer(1), default=2, help='DDPM steps of the sampler call')
  parser.add_argument('--remat', default=','.join(step_lib.REMAT_MODES), help='remat modes of the scanned step')
  parser.add_argument('--repeats', type=_common.integer(0), default=3, help='0: compile and memory analysis only')
  parser.add_argument('--skip-step', action='store_true')
  parser.add_argument('--skip-sampler', action='store_true')
  parser.add_argument('--skip-unrolled', action='store_true', help='scanned rows only')
  parser.add_argument('--skip-fp-step', action='store_true', help='no fp training step rows')
  args = parser.parse_args(argv)
  remats = [r for r in args.remat.split(',') if r]
  for r in remats:
    if r not in step_lib.REMAT_MODES:
      parser.error(f'argument --remat: {r!r} is not one of {", ".join(step_lib.REMAT_MODES)}')
  print(f'{jax.devices()[0].platform} ({os.cpu_count()} cores), load average {os.getloadavg()[0]:.1f}')
  if not args.skip_step:
    rows = step_table(args.model, args.batch, remats, args.repeats, not args.skip_unrolled, not args.skip_fp_step)
    print(f'\nCalibration train step, 32x32x4 latents, median of {args.repeats} steps\n')
    print_steps(rows)
  if not args.skip_sampler:
    rows = sampler_table(args.model, args.sampler_batch, args.steps, args.repeats, unrolled=not args.skip_unrolled)
    print(f'\nSampler call: {args.steps} DDPM steps, cfg 1.5, best of {args.repeats} calls\n')
    print_sampler(rows)
  print(f'\nload average {os.getloadavg()[0]:.1f}; peak RSS {_common.peak_rss_bytes() / MIB:.0f} MiB')


if __name__ == '__main__':
  main()
