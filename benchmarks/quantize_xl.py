r"""Quantize the whole DiT-XL/2 (the 140 block layers) as the `quantize` stage does: time and memory.

  .venv/bin/python -m benchmarks.quantize_xl                      # PQ K=256 d=8 (1-bit indices)
  .venv/bin/python -m benchmarks.quantize_xl --method pq --k 16 --d 4 --iters 25
  .venv/bin/python -m benchmarks.quantize_xl --method vq --k 256 --d 8
  .venv/bin/python -m benchmarks.quantize_xl --blocks 2          # a quick look at the first blocks
  .venv/bin/python -m benchmarks.quantize_xl --objective output   # output-aware: statistics, then quantize
  .venv/bin/python -m benchmarks.quantize_xl --objective both     # weight, then output: one table, their ratio
  .venv/bin/python -m benchmarks.quantize_xl --objective output --stats-only [--stats-gradients]  # statistics alone

Weights are random with realistic heavy tails (student-t df=4 x 0.02, benchmarks/_common.py)
in every Dense kernel of DiT-XL/2 (675M parameters); the quantizer is `surgery.quantize_params`,
the function the stage calls, with the default layer rules (all five linear layers per block).
Prints wall time (compiles included: one per distinct layer shape), the process's peak
resident memory (ru_maxrss; it includes the 2.7 GB fp32 model itself), the CPU seconds of all
threads (on a busy machine wall time stretches; CPU time barely does), and the mean weight
relative MSE. Targets from the PQ engine issue: < 10 minutes and < 8 GiB on a 2-core CPU.

--objective output is config.quant.objective='output' with the data-free source, as the stage runs it
(stages/quantize.py, calibrate/source.py): DDIM samples of the fp model (--data-free-samples, --data-free-steps,
calibrate/data.sample_data_free), their input second moments at every quantized layer (quant/statistics.py:
--stats-batches forward passes of 2 x --stats-batch-size inputs, label and null label, the guided inputs at
--stats-guidance, and --stats-conditions (t, y) pairs for the adaLN layers; --stats-gradients adds the output-gradient energies of compress.distortion='loss'), then
quantize_params with those moments. Both run with scanned blocks as the stage does (config.model.scan_blocks): the
sampler always, the statistics where every block is a target (--blocks 0 or 28; with fewer blocks they run unrolled
and XLA drops the blocks after the last target). The three phases are timed apart; the peak RSS after each shows where memory goes. The rows of the
output objective carry `rel_out_err` (metric.rel_error: the layer's output error under its moments). With
--objective both each objective runs in a fresh process (its own peak RSS and its own compilations: the whitened
k-means has the shapes of the plain one, and a shared process would reuse its compiles), weight first, and the
weight objective's quantization is also scored in the output metric (rel_out_err of the same layers and moments,
computed after the timed part), so the two error columns compare like with like. --stats-only stops after the
statistics (no quantize: its columns read 0 and nan), e.g. to price --stats-gradients, run once with and once without. Target of the output-aware issue:
statistics + output-aware quantization within 1.5x the weight objective's quantize time and 8 GiB.

The random model: the heavy-tailed weights replace DiT's zero-initialised adaLN-Zero and final layers too (the
weight benchmark wants every block layer non-trivial), so the fp forward is a random network, not the identity. Its
activations stay finite in float32 (the benchmark checks the latents and every moment and stops, naming the
layers, if not): the adaLN gates are ~0.1 (silu(c) is small), so the residual stream grows slowly over 28 blocks.
"""

import os
import resource
import tempfile
import time

import jax
import numpy as np

from benchmarks import _common
from dpq_jax.quant import surgery

OBJECTIVES = ('weight', 'output', 'both')


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def gib(nbytes: float) -> float:
  return nbytes / 2**30


def layer_rules(args):
  pattern = r'blocks_\d+/(attn/(qkv|proj)|mlp/(fc1|fc2)|adaLN_modulation)'
  if args.blocks:
    pattern = rf'blocks_({"|".join(map(str, range(args.blocks)))})/(attn/(qkv|proj)|mlp/(fc1|fc2)|adaLN_modulation)'
  return surgery.default_rules(args.method, args.k, args.d, (), pattern)


def output_moments(args, params: dict, targets: dict[str, int], result: dict) -> dict[str, np.ndarray]:
  """Data-free latents of the fp model, then the input moments of `targets`; fills result's phase times and RSS."""
  from dpq_jax.calibrate import data as data_lib
  from dpq_jax.models import dit
  from dpq_jax.models import scan as scan_lib
  from dpq_jax.quant import statistics

  # scanned blocks as the stage runs them (config.model.scan_blocks): the sampler on stacked params, the statistics
  # scanned where every block is a target (statistics.scannable), else unrolled
  model = dit.create_model(args.model, input_size=32, num_classes=1000, scan_blocks=True)
  start, cpu_start = time.perf_counter(), cpu_seconds()
  sampler, variables, _ = scan_lib.runnable(model, {'params': params})
  latents, labels = data_lib.sample_data_free(
    sampler, variables['params'], args.data_free_samples, args.data_free_steps, args.seed, batch_size=16
  )  # config.data.sample_batch_size's default
  del variables
  result['data_free_s'], result['data_free_cpu_s'] = time.perf_counter() - start, cpu_seconds() - cpu_start
  result['rss_data_free'] = gib(_common.peak_rss_bytes())
  result['load']['data-free'] = os.getloadavg()[0]
  if not np.all(np.isfinite(latents)):
    raise FloatingPointError(f'data-free latents: {np.sum(~np.isfinite(latents))} non-finite values')
  result['latent_std'] = float(np.std(latents))
  start, cpu_start = time.perf_counter(), cpu_seconds()
  batches = statistics.noisy_batches(latents, labels, args.stats_batches, args.stats_batch_size, 1000, args.seed)
  stats = statistics.input_moments(
    model, params, targets, batches, args.stats_batches, gradients=args.stats_gradients, guidance=args.stats_guidance,
    conditions=args.stats_conditions, seed=args.seed,
  )  # fmt: skip
  moments, _ = statistics.split(stats)
  result['scanned_stats'] = statistics.scannable(model, targets)
  result['stats_s'], result['stats_cpu_s'] = time.perf_counter() - start, cpu_seconds() - cpu_start
  result['rss_stats'] = gib(_common.peak_rss_bytes())
  result['load']['stats'] = os.getloadavg()[0]
  bad = [name for name, h in moments.items() if not np.all(np.isfinite(h))]
  if bad:
    raise FloatingPointError(f'input moments not finite at {len(bad)} of {len(moments)} layers: {bad[:4]}')
  # the inputs' mean square per layer (mean of diag H_j over positions): how large the activations run
  energy = {name: float(np.mean(np.trace(h, axis1=-2, axis2=-1)) / h.shape[-1]) for name, h in moments.items()}
  result['input_ms'] = {kind: (min(v), max(v)) for kind in ('adaLN_modulation', 'qkv', 'proj', 'fc1', 'fc2')
                        if (v := [e for name, e in energy.items() if name.endswith(kind)])}  # fmt: skip
  return moments


def run_objective(args, objective: str, weight_codes: str | None = None) -> dict:
  """One objective, timed; returns its table row's values. `weight_codes`: an npz path; 'weight' writes its PQ
  layers' codebooks and codes there, 'output' scores them in its metric after the timed part."""
  from dpq_jax.quant import metric, pq

  start = time.perf_counter()
  # output: jax arrays, as the stage's fp params (numpy ones would be copied by every forward); weight: as before
  params = _common.heavy_tailed_params(args.model, 32, args.seed, device=objective == 'output')
  result = {'objective': objective, 'make_s': time.perf_counter() - start, 'rss_before': gib(_common.peak_rss_bytes())}
  result['load'] = {'start': os.getloadavg()[0]}  # the machine's 1-min load average at each phase's end
  rules = layer_rules(args)
  moments = None
  if objective == 'output':
    moments = output_moments(args, params, surgery.subvector_dims(params, rules, args.method), result)
    if args.stats_only:
      result.update(quantize_s=0.0, quantize_cpu_s=0.0, rss_peak=gib(_common.peak_rss_bytes()), layers=len(moments))
      result.update(weights=sum(h.shape[0] * h.shape[1] * params_out(params, name) for name, h in moments.items()))
      result['rel_mse'] = float('nan')
      return result
  start, cpu_start = time.perf_counter(), cpu_seconds()
  q = surgery.quantize_params(
    params, rules, jax.random.key(args.seed), method=args.method, iters=args.iters, rtn_bits=args.bits,
    moments=moments, damping=args.damping,
  )  # fmt: skip
  jax.block_until_ready(q)
  result['quantize_s'], result['quantize_cpu_s'] = time.perf_counter() - start, cpu_seconds() - cpu_start
  result['rss_peak'] = gib(_common.peak_rss_bytes())
  result['load']['quantize'] = os.getloadavg()[0]
  rows = q.rows
  result['layers'] = len(rows)
  result['weights'] = sum(r['shape'][0] * r['shape'][1] for r in rows)
  result['rel_mse'] = float(np.mean([r['rel_mse'] for r in rows]))
  if moments is not None and all('rel_out_err' in r for r in rows):
    result['rel_out_err'] = float(np.mean([r['rel_out_err'] for r in rows]))
  if weight_codes and objective == 'weight':
    arrays = {}
    for name, w in q.pq.items():
      arrays[f'{name}:codebooks'], arrays[f'{name}:codes'] = np.asarray(w.codebooks), np.asarray(w.codes)
    np.savez(weight_codes, **arrays)
  if weight_codes and moments is not None:  # the weight objective's layers in this metric (not timed)
    del q
    with np.load(weight_codes) as f:
      errs = [
        metric.rel_error(params_kernel(params, name), pq.decode(f[f'{name}:codebooks'], f[f'{name}:codes']), h)
        for name, h in moments.items()
      ]
    result['weight_rel_out_err'] = float(np.mean(errs))
  return result


def params_out(params: dict, name: str) -> int:
  return int(params_kernel(params, name).shape[1])


def params_kernel(params: dict, name: str):
  node = params
  for key in name.split('/'):
    node = node[key]
  return node['kernel']


def print_table(args, results: list[dict]) -> None:
  setting = f'rtn {args.bits} bit' if args.method == 'rtn' else f'{args.method} K={args.k} d={args.d}'
  weight = next((r for r in results if r['objective'] == 'weight'), None)
  print(f'\n{_common.platform()}; {args.model}, {setting}, {args.iters} k-means iters')
  if any(r['objective'] == 'output' for r in results):
    print(f'output objective: {args.data_free_samples} data-free samples x {args.data_free_steps} DDIM steps; '
          f'statistics {args.stats_batches} batches of 2 x {args.stats_batch_size}, guidance {args.stats_guidance}, '
          f'{args.stats_conditions} conditioning pairs'
          f'{", with output gradients" if args.stats_gradients else ""}; damping {args.damping}; statistics on the '
          f'{"scanned" if any(r.get("scanned_stats") for r in results) else "unrolled"} model')  # fmt: skip
  _common.print_header(['objective', 'layers', 'weights', 'data-free s', 'stats s', 'quantize s', 'wall s',
                        'wall / weight', '(stats + quantize) / weight', 'CPU s data-free / stats / quantize',
                        'CPU s (all threads)', 'CPU / weight', 'peak RSS GiB', 'RSS after data-free / stats GiB',
                        'RSS before GiB', 'mean rel MSE', 'mean rel_out_err'])  # fmt: skip
  for r in results:
    data_free, stats = r.get('data_free_s', 0.0), r.get('stats_s', 0.0)
    wall = data_free + stats + r['quantize_s']
    cpu_phases = (r.get('data_free_cpu_s', 0.0), r.get('stats_cpu_s', 0.0), r['quantize_cpu_s'])
    cpu = sum(cpu_phases)
    ratio = ratio_sq = ratio_cpu = '-'
    if weight is not None:
      ratio = f'{wall / weight["quantize_s"]:.2f}'
      ratio_sq = f'{(stats + r["quantize_s"]) / weight["quantize_s"]:.2f}'
      ratio_cpu = f'{cpu / weight["quantize_cpu_s"]:.2f}'
    out_err = r.get('rel_out_err', r.get('weight_rel_out_err'))
    if r['objective'] == 'weight':
      out_err = next((o['weight_rel_out_err'] for o in results if 'weight_rel_out_err' in o), None)
    rss_mid = f'{r["rss_data_free"]:.2f} / {r["rss_stats"]:.2f}' if 'rss_stats' in r else '-'
    print(f'| {r["objective"]} | {r["layers"]} | {r["weights"] / 1e6:.0f}M | {data_free:.1f} | {stats:.1f} | '
          f'{r["quantize_s"]:.1f} | {wall:.1f} | {ratio} | {ratio_sq} | {" / ".join(f"{c:.0f}" for c in cpu_phases)} | '
          f'{cpu:.0f} | {ratio_cpu} | {r["rss_peak"]:.2f} | {rss_mid} | '
          f'{r["rss_before"]:.2f} | {r["rel_mse"]:.4f} | {"-" if out_err is None else f"{out_err:.4f}"} |')  # fmt: skip
  print('1-min load average at the start and after each phase (wall times stretch with it): '
        + '; '.join(f'{r["objective"]} ' + ', '.join(f'{k} {v:.1f}' for k, v in r['load'].items()) for r in results))  # fmt: skip
  if any('latent_std' in r for r in results):
    out = next(r for r in results if 'latent_std' in r)
    print(
      f'data-free latents std {out["latent_std"]:.3g}; mean square of the layer inputs (min..max over blocks): '
      + ', '.join(f'{kind} {lo:.3g}..{hi:.3g}' for kind, (lo, hi) in out['input_ms'].items())
    )
    if weight is not None:
      print("the weight row's rel_out_err: its quantization scored under the output run's moments (not timed)")


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--model', type=_common.dit_name, default='DiT-XL/2')
  parser.add_argument('--method', default='pq', choices=surgery.METHODS)
  parser.add_argument('--k', type=_common.integer(1), default=256)
  parser.add_argument('--d', type=_common.integer(1), default=8)
  parser.add_argument('--bits', type=_common.integer(1, 16), default=1, help='rtn only')
  parser.add_argument('--iters', type=_common.integer(0), default=25)
  parser.add_argument('--blocks', type=_common.integer(0), default=0, help='quantize only the first N blocks (0 = all)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--objective', default='weight', choices=OBJECTIVES,
                      help="'both': weight then output, each in a fresh process, one table")  # fmt: skip
  parser.add_argument('--stats-batches', type=_common.integer(1), default=8)
  parser.add_argument('--stats-batch-size', type=_common.integer(1), default=16,
                      help='latents per statistics batch (the forward runs 2x: label and null label)')  # fmt: skip
  parser.add_argument('--data-free-samples', type=_common.integer(1), default=16)
  parser.add_argument('--data-free-steps', type=_common.integer(1), default=2)
  parser.add_argument('--stats-guidance', type=float, default=1.5, help='config.quant.stats_guidance (guided inputs)')
  parser.add_argument('--stats-conditions', type=_common.integer(0), default=0,
                      help='config.quant.stats_conditions: (t, y) pairs of the conditioning pass (adaLN layers)')  # fmt: skip
  parser.add_argument('--stats-gradients', action='store_true',
                      help="also the output-gradient energies (compress.distortion='loss': a backward pass per batch)")  # fmt: skip
  parser.add_argument('--stats-only', action='store_true',
                      help='--objective output: stop after the statistics (time, CPU and memory of that phase alone)')  # fmt: skip
  parser.add_argument('--damping', type=float, default=0.01, help='config.quant.damping (output objective)')
  args = parser.parse_args(argv)
  if args.stats_only and args.objective != 'output':
    parser.error(f'--stats-only: expected --objective output (got {args.objective!r})')

  if args.objective == 'both':
    with tempfile.TemporaryDirectory() as tmp:
      codes = os.path.join(tmp, 'weight_codes.npz')
      results = [_common.in_child(run_objective, args, objective, codes) for objective in ('weight', 'output')]
  else:
    results = [run_objective(args, args.objective)]
  print_table(args, results)


if __name__ == '__main__':
  main()
