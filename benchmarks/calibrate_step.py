r"""Calibration step cost: quantized DiT-S/2 calibration step vs a plain fp DiT-S/2 training step,
the remat modes of the step (config.calibrate.remat), and the peak memory of one DiT-XL/2
calibration step at batch 1.

  .venv/bin/python benchmarks/calibrate_step.py                     # all three tables
  .venv/bin/python benchmarks/calibrate_step.py --skip-xl --skip-remat --batch 8 --repeats 5
  .venv/bin/python benchmarks/calibrate_step.py --skip-s --skip-xl --remat-models DiT-4x1152x16/2:2

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

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from configs import common  # noqa: E402
from dpq_jax import diffusion as diffusion_lib  # noqa: E402
from dpq_jax import tree_utils  # noqa: E402
from dpq_jax.calibrate import sharding  # noqa: E402
from dpq_jax.calibrate import train_step as step_lib  # noqa: E402
from dpq_jax.calibrate import trainable as trainable_lib  # noqa: E402
from dpq_jax.models import dit  # noqa: E402
from dpq_jax.models.load import randomize_zero_init  # noqa: E402
from dpq_jax.quant import layers, pq, surgery  # noqa: E402


def random_pq(params: dict, rules: layers.QuantRules, seed: int = 0) -> tuple[dict, dict]:
  """(params with codebooks [M, K, d] instead of kernels, quant with codes [M, out]) of random sub-vectors."""
  rng = np.random.default_rng(seed)
  qparams = jax.tree.map(lambda x: x, params)
  quant: dict = {}
  for path, kernel in surgery.module_kernels(params):
    spec = rules.spec_for('/'.join(path))
    if spec is None:
      continue
    sub = pq.to_subvectors(jnp.asarray(kernel), spec.subvector_dim)  # [M, out, d]
    pick = rng.choice(sub.shape[1], spec.codebook_size, replace=False)
    codebooks = sub[:, pick]  # [M, K, d]
    node = qparams
    for p in path:
      node = node[p]
    del node['kernel']
    node['codebooks'] = codebooks
    tree_utils.set_path(quant, path + ('codes',), pq.encode(jnp.asarray(kernel), codebooks, spec).astype(jnp.uint8))
  return qparams, quant


def make_step(model, rules, params, variant: str, batch_size: int, remat: str = 'none'):
  """(jitted step, state, frozen) for 'fp', 'pq dynamic' or 'pq frozen' with a config.calibrate.remat mode."""
  cfg = common.base_config().calibrate
  cfg.update(dict(warmup=0, schedule='constant', lr=1e-4, clip=1.0))
  diffusion = diffusion_lib.create_diffusion()
  if variant == 'fp':
    cfg.trainable = 'all'
    trainable, frozen_params = trainable_lib.split_trainable(params, ['.*'])
    mutable, constant, every = {}, {}, 0
    dyn = frz = model.clone(remat=remat == 'blocks')
  else:
    qparams, quant = random_pq(params, rules)
    p, qn = step_lib.attach_latent(qparams, quant, params, 'dynamic')
    mutable, constant = step_lib.split_quant(qn)
    trainable, frozen_params = trainable_lib.split_trainable(p, trainable_lib.trainable_patterns('codebooks'))
    dyn, frz = step_lib.calibration_models(model, rules, 'dynamic', remat)
    every = 1 if variant == 'pq dynamic' else 0
  tx = trainable_lib.optimizer(cfg)
  fn = step_lib.make_train_step(dyn, frz, diffusion, tx, step_lib.LossConfig(model.num_classes, 0.1, every))
  state = step_lib.init_state(trainable, mutable, tx, 0)
  frozen = {'params': frozen_params, 'quant': constant, 'fp': {}}
  mesh = sharding.make_mesh((('data', 1), ('fsdp', 1)), jax.devices()[:1])
  jstep, state_sh, frozen_sh = step_lib.jit_step(fn, mesh, state, frozen)
  return jstep, jax.device_put(state, state_sh, may_alias=False), jax.device_put(frozen, frozen_sh)


def step_times(args) -> None:
  model = dit.create_model('DiT-S/2', input_size=32)
  params = randomize_zero_init(jax.jit(lambda k: dit.init_params(model, k))(jax.random.key(0)), jax.random.key(1))
  rules = surgery.default_rules('pq', 256, 8)
  rng = np.random.default_rng(0)
  batch = {'latents': rng.standard_normal((args.batch, 32, 32, 4)).astype(np.float32),
           'labels': rng.integers(0, 1000, args.batch).astype(np.int32)}  # fmt: skip
  variants = ['fp', 'pq dynamic', 'pq frozen']
  runs, compile_s, times = {}, {}, {v: [] for v in variants}
  for v in variants:
    jstep, state, frozen = make_step(model, rules, params, v, args.batch)
    t0 = time.perf_counter()
    state, m = jstep(state, frozen, batch)
    jax.block_until_ready(m)
    compile_s[v] = time.perf_counter() - t0
    runs[v] = [jstep, state, frozen]
  for _ in range(args.repeats):
    for v in variants:
      jstep, state, frozen = runs[v]
      t0 = time.perf_counter()
      state, m = jstep(state, frozen, batch)
      jax.block_until_ready((state, m))
      times[v].append(time.perf_counter() - t0)
      runs[v][1] = state
  base = statistics.median(times['fp'])
  print(f'\nDiT-S/2, 32x32x4 latents, batch {args.batch}, {jax.devices()[0].platform} '
        f'({os.cpu_count()} cores), median of {args.repeats} steps\n')  # fmt: skip
  print('| step | trained params | first call (compile) s | step s | vs fp |')
  print('|---|---|---|---|---|')
  for v in variants:
    n = trainable_lib.count(runs[v][1]['params'])
    med = statistics.median(times[v])
    print(f'| {v} | {n:,} | {compile_s[v]:.1f} | {med:.3f} | {med / base:.2f}x |')


def measure_remat(model_name: str, batch_size: int, repeats: int, modes=step_lib.REMAT_MODES) -> list[dict]:
  """One row per remat mode of the 'pq dynamic' step: compile s, XLA memory analysis (bytes), median step s."""
  model = dit.create_model(model_name, input_size=32)
  params = randomize_zero_init(jax.jit(lambda k: dit.init_params(model, k))(jax.random.key(0)), jax.random.key(1))
  rules = surgery.default_rules('pq', 256, 8)
  rng = np.random.default_rng(0)
  batch = {'latents': rng.standard_normal((batch_size, 32, 32, 4)).astype(np.float32),
           'labels': rng.integers(0, 1000, batch_size).astype(np.int32)}  # fmt: skip
  rows, runs = [], []
  for mode in tqdm(modes, desc=f'compile {model_name} batch {batch_size}', leave=False):
    jstep, state, frozen = make_step(model, rules, params, 'pq dynamic', batch_size, remat=mode)
    t0 = time.perf_counter()
    compiled = jstep.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state, m = compiled(state, frozen, batch)  # warm-up
    rows.append(dict(model=model_name, batch=batch_size, remat=mode, compile_s=compile_s, loss=float(m['loss']),
                     temp=mem.temp_size_in_bytes, args=mem.argument_size_in_bytes, out=mem.output_size_in_bytes,
                     times=[]))  # fmt: skip
    runs.append([compiled, state, frozen])
  for _ in tqdm(range(repeats), desc='steps', leave=False):
    for row, run in zip(rows, runs):
      compiled, state, frozen = run
      t0 = time.perf_counter()
      state, m = compiled(state, frozen, batch)
      jax.block_until_ready((state, m))
      row['times'].append(time.perf_counter() - t0)
      run[1] = state
  for row in rows:
    row['step_s'] = statistics.median(row['times'])
  return rows


def remat_table(args) -> None:
  rows = []
  for item in args.remat_models.split(','):
    name, _, batch = item.rpartition(':')
    rows += measure_remat(name, int(batch), args.repeats)
  gib = 2**30
  print(f'\nRemat modes of the PQ K=256 d=8 dynamic calibration step, {jax.devices()[0].platform} '
        f'({os.cpu_count()} cores), one device, median of {args.repeats} steps\n')  # fmt: skip
  print('| model | batch | remat | XLA temporaries GiB | vs none | XLA arguments GiB | compile s | step s | vs none '
        '| loss |')  # fmt: skip
  print('|---|---|---|---|---|---|---|---|---|---|')
  base = {}
  for r in rows:
    key = (r['model'], r['batch'])
    base.setdefault(key, r)
    b = base[key]
    print(f'| {r["model"]} | {r["batch"]} | {r["remat"]} | {r["temp"] / gib:.3f} | {r["temp"] / b["temp"]:.2f}x '
          f'| {r["args"] / gib:.3f} | {r["compile_s"]:.1f} | {r["step_s"]:.3f} | {r["step_s"] / b["step_s"]:.2f}x '
          f'| {r["loss"]:.6f} |')  # fmt: skip


XL_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {root!r} + '/benchmarks')
import jax, numpy as np
import calibrate_step as b
from dpq_jax.models import dit
from dpq_jax.models.load import randomize_zero_init
from dpq_jax.quant import surgery
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB on Linux)
model = dit.create_model('DiT-XL/2', input_size=32)
params = randomize_zero_init(jax.jit(lambda k: dit.init_params(model, k))(jax.random.key(0)), jax.random.key(1))
n = sum(x.size for x in jax.tree.leaves(params))
jstep, state, frozen = b.make_step(model, surgery.default_rules('pq', 256, 8), params, 'pq dynamic', 1, {remat!r})
rng = np.random.default_rng(0)
batch = {{'latents': rng.standard_normal((1, 32, 32, 4)).astype(np.float32), 'labels': np.zeros((1,), np.int32)}}
before = rss()
t0 = time.perf_counter()
compiled = jstep.lower(state, frozen, batch).compile()
compile_s = time.perf_counter() - t0
mem = compiled.memory_analysis()
t0 = time.perf_counter()
state, m = compiled(state, frozen, batch)
jax.block_until_ready(m)
step_s = time.perf_counter() - t0
print(json.dumps(dict(params=int(n), fp32_gib=4 * n / 2**30, rss_before=before, rss_after=rss(), compile_s=compile_s,
  step_s=step_s, loss=float(m['loss']), args=mem.argument_size_in_bytes / 2**30, temp=mem.temp_size_in_bytes / 2**30,
  out=mem.output_size_in_bytes / 2**30, alias=mem.alias_size_in_bytes / 2**30)))
"""


def xl_memory(remat: str = 'none') -> None:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  child = XL_CHILD.format(root=root, remat=remat)
  r = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, cwd=root)
  if r.returncode:
    print(f'XL memory run failed:\n{r.stderr[-3000:]}')
    return
  import json

  d = json.loads(r.stdout.strip().splitlines()[-1])
  print(f'\nDiT-XL/2 calibration step, PQ K=256 d=8 on the 140 block layers, batch 1, remat={remat}, one CPU device\n')
  print('| quantity | GiB |')
  print('|---|---|')
  print(f'| fp32 weights of the model ({d["params"]:,} params) | {d["fp32_gib"]:.2f} |')
  print(f'| XLA: step arguments (state + frozen + batch) | {d["args"]:.2f} |')
  print(f'| XLA: step temporaries (activations, gradients, assignment) | {d["temp"]:.2f} |')
  print(f'| XLA: step outputs (new state, aliased to the donated one: {d["alias"]:.2f}) | {d["out"]:.2f} |')
  print(f'| process peak RSS after setup (before compiling the step) | {d["rss_before"]:.2f} |')
  print(f'| process peak RSS after one step | {d["rss_after"]:.2f} |')
  print(f'\ncompile {d["compile_s"]:.1f} s, step {d["step_s"]:.1f} s, loss {d["loss"]:.4f}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--skip-xl', action='store_true')
  parser.add_argument('--skip-s', action='store_true')
  parser.add_argument('--skip-remat', action='store_true')
  parser.add_argument(
    '--remat-models',
    default='DiT-S/2:8,DiT-4x1152x16/2:2',
    help='MODEL:BATCH,... for the remat table (custom names DiT-<depth>x<hidden>x<heads>/<patch>)',
  )
  parser.add_argument('--xl-remat', default='none', choices=step_lib.REMAT_MODES)
  args = parser.parse_args()
  for item in args.remat_models.split(','):
    name, _, batch = item.rpartition(':')
    try:
      dit.parse_name(name)
      if int(batch) < 1:
        raise ValueError
    except ValueError:
      parser.error(f'--remat-models entry {item!r}: expected MODEL:BATCH with a DiT name and a batch >= 1')
  if not args.skip_s:
    step_times(args)
  if not args.skip_remat:
    remat_table(args)
  if not args.skip_xl:
    xl_memory(args.xl_remat)


if __name__ == '__main__':
  main()
