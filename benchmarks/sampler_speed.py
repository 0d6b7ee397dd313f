r"""Sampler throughput and memory: full-precision vs quantized DiT, same batch, steps and guidance.

  .venv/bin/python -m benchmarks.sampler_speed                       # DiT-S/2 256px, batch 8, DDPM 10 steps, cfg 1.5
  .venv/bin/python -m benchmarks.sampler_speed --steps 25 --batch 16 --k 16 --d 4

Three models run through the project's sampler (dpq_jax.evaluate.sampler.Sampler, sharded over
all devices) on the same sample indices and labels:
  fp          the full-precision DiT,
  pq load     the quantized DiT dequantized once at load (config.quant.dequantize='load'),
  pq on-fly   PQDense decoding codebooks[codes] inside every forward ('on_the_fly').
Images/s is the batch over the best wall time of --repeats full sampling runs (after a compile
run), interleaved so machine noise hits all alike. Peak memory is XLA's own accounting of the
compiled sampling call (arguments + outputs + temporaries, aliasing subtracted), i.e. what the
device must hold while sampling; weights are the model variables' bytes among the arguments.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import _common
from dpq_jax import diffusion as diffusion_lib
from dpq_jax.diffusion import sampling
from dpq_jax.evaluate import sampler as sampler_lib
from dpq_jax.models import load as load_lib
from dpq_jax.models import scan as scan_lib
from dpq_jax.models.spec import ModelSpec
from dpq_jax.quant import surgery


def _nbytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _peak_bytes(s: sampler_lib.Sampler, indices, labels) -> int:
  """XLA's memory accounting of one compiled sampling call of `s`."""
  keys = jax.device_put(sampler_lib.sample_keys(s.seed, indices), s.batch_sharding)
  y = jax.device_put(jnp.asarray(labels, jnp.int32), s.batch_sharding)
  x = jax.device_put(sampler_lib.initial_noise(keys, s.shape), s.batch_sharding)
  steps = jnp.arange(min(sampler_lib.STEPS_PER_CALL, s.diffusion.num_timesteps), dtype=jnp.int32)[::-1]
  lowered = sampling.scan_steps.lower(  # the call Sampler.__call__ makes through sampling.run_steps
    s.diffusion, s.apply_fn, s.kind, False, True, sampler_lib.own_step_noise, s.variables, x, keys, steps,
    {'y': y}, jnp.float32(s.eta),
  )  # fmt: skip
  m = lowered.compile().memory_analysis()
  if m is None:
    return -1
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--model', type=_common.dit_name, default='DiT-S/2')
  parser.add_argument('--input-size', type=_common.integer(1), default=32, help='latent size (32 = 256px images)')
  parser.add_argument('--batch', type=_common.integer(1), default=8)
  parser.add_argument('--steps', type=_common.integer(1), default=10)
  parser.add_argument('--sampler', default='ddpm', choices=sampler_lib.KINDS)
  parser.add_argument('--cfg-scale', type=float, default=1.5)
  parser.add_argument('--k', type=_common.integer(1), default=256)
  parser.add_argument('--d', type=_common.integer(1), default=8)
  parser.add_argument(
    '--iters', type=_common.integer(0), default=5, help='k-means iterations (speed does not depend on them)'
  )
  parser.add_argument('--repeats', type=_common.integer(1), default=3)
  parser.add_argument('--unrolled', action='store_true', help='blocks unrolled (config.model.scan_blocks=False)')
  parser.add_argument('--dtype', default='float32', choices=sorted(load_lib.DTYPES), help='compute dtype')
  args = parser.parse_args(argv)
  if args.batch % jax.device_count():
    parser.error(f'argument --batch: expected a multiple of the {jax.device_count()} devices, got {args.batch}')

  spec = ModelSpec(args.model, input_size=args.input_size)
  dtype = load_lib.DTYPES[args.dtype]
  fp_model = spec.create(dtype=dtype)
  params = _common.random_dit_params(fp_model)
  rules = surgery.default_rules('pq', args.k, args.d)
  q = surgery.quantize_params(params, rules, jax.random.key(2), method='pq', iters=args.iters)
  variants = {'fp': ({'params': params}, fp_model)}
  for name, mode in (('pq load', 'load'), ('pq on-fly', 'on_the_fly')):
    cfg = ml_collections.ConfigDict({'method': 'pq', 'dequantize': mode})
    variants[name] = surgery.runtime_model(spec, q, rules, cfg, dtype)
  for name, (variables, model) in variants.items():  # as the job runs them (stages/job.py: Job.runtime)
    model, variables, why = scan_lib.runnable(model.clone(scan_blocks=not args.unrolled), variables)
    if why:
      print(f'{name}: the blocks run unrolled: {why}')
    variants[name] = (variables, model)

  respacing = f'ddim{args.steps}' if args.sampler == 'ddim' else str(args.steps)
  diffusion = diffusion_lib.create_diffusion(respacing)
  mesh = sampler_lib.data_mesh()
  indices = np.arange(args.batch)
  labels = np.random.RandomState(0).randint(0, 1000, args.batch)
  samplers, outputs = {}, {}
  for name, (variables, model) in variants.items():
    s = sampler_lib.Sampler(model, variables, diffusion, args.sampler, args.cfg_scale, 0, mesh)
    samplers[name] = s
    outputs[name] = np.asarray(s(indices, labels))  # compile + warm-up
  calls = {name: lambda s=s: s(indices, labels).block_until_ready() for name, s in samplers.items()}
  best = _common.interleaved_best(calls, args.repeats)

  print(
    f'{args.model} {args.input_size * 8}px, {"unrolled" if args.unrolled else "scanned"} blocks, {args.dtype}, '
    f'{args.sampler} {args.steps} steps, cfg {args.cfg_scale}, batch {args.batch}, '
    f'PQ K={args.k} d={args.d} ({np.log2(args.k) / args.d:g} index bits/weight), {jax.device_count()} '
    f'{jax.devices()[0].platform} device(s), best of {args.repeats}'
  )
  print()
  _common.print_header(['model', 'images/s', 's/image', 'speed vs fp', 'weights MiB', 'peak MiB (XLA)', 'peak vs fp',
                        'max diff vs pq load'])  # fmt: skip
  fp_peak = None
  for name, s in samplers.items():
    ips = args.batch / best[name]
    peak = _peak_bytes(s, indices, labels)
    fp_peak = fp_peak or peak
    diff = np.abs(outputs[name] - outputs['pq load']).max() / np.abs(outputs['pq load']).max()
    print(
      f'| {name} | {ips:.3f} | {best[name] / args.batch:.3f} | {best["fp"] / best[name]:.2f}x | '
      f'{_nbytes(variants[name][0]) / 2**20:.1f} | {peak / 2**20:.1f} | {peak / fp_peak:.2f}x | '
      f'{"-" if name == "fp" else f"{diff:.1e}"} |'
    )


if __name__ == '__main__':
  main()
