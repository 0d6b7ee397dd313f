"""The calibration step as the benchmarks measure it (calibrate_step, memory_plan --check).

Codebooks are K random sub-vectors of each kernel: k-means quality does not change the cost.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from benchmarks import _common
from configs import common
from dpq_jax import diffusion as diffusion_lib
from dpq_jax import tree_utils
from dpq_jax.calibrate import sharding
from dpq_jax.calibrate import train_step as step_lib
from dpq_jax.calibrate import trainable as trainable_lib
from dpq_jax.models import dit
from dpq_jax.models import scan as scan_lib
from dpq_jax.quant import layers, pq, surgery


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
    node = tree_utils.get_path(qparams, path)
    del node['kernel']
    node['codebooks'] = codebooks
    tree_utils.set_path(quant, path + ('codes',), pq.encode(jnp.asarray(kernel), codebooks, spec).astype(jnp.uint8))
  return qparams, quant


def make_step(model, rules, params, variant: str, batch_size: int, remat: str = 'none', scan: bool = False):
  """(jitted step, state, frozen) for 'fp', 'pq dynamic' or 'pq frozen' with a config.calibrate.remat mode;
  scan: the blocks under nn.scan, state and frozen trees stacked per block (as calibrate/loop.py runs them)."""
  model = model.clone(scan_blocks=scan)
  cfg = common.base_config().calibrate
  cfg.update(dict(warmup=0, schedule='constant', lr=1e-4, clip=1.0))
  diffusion = diffusion_lib.create_diffusion()
  if variant == 'fp':
    cfg.trainable = 'all'
    trainable, frozen_params = trainable_lib.split_trainable(params, ['.*'])
    mutable, constant, every = {}, {}, 0
    policy = step_lib.REMAT_POLICIES.get(remat)
    dyn = frz = model.clone(remat=remat in ('blocks', 'dots'), remat_policy=policy)
  else:
    qparams, quant = random_pq(params, rules)
    p, qn = step_lib.attach_latent(qparams, quant, params, 'dynamic')
    mutable, constant = step_lib.split_quant(qn)
    trainable, frozen_params = trainable_lib.split_trainable(p, trainable_lib.trainable_patterns('codebooks'))
    dyn, frz = step_lib.calibration_models(model, rules, 'dynamic', remat)
    every = 1 if variant == 'pq dynamic' else 0
  if scan:
    stack = functools.partial(scan_lib.stack_blocks, depth=model.depth)
    trainable, frozen_params, mutable, constant = map(stack, (trainable, frozen_params, mutable, constant))
  tx = trainable_lib.optimizer(cfg)
  fn = step_lib.make_train_step(dyn, frz, diffusion, tx, step_lib.LossConfig(model.num_classes, 0.1, every))
  state = step_lib.init_state(trainable, mutable, tx, 0)
  frozen = {'params': frozen_params, 'quant': constant, 'fp': {}}
  mesh = sharding.make_mesh((('data', 1), ('fsdp', 1)), jax.devices()[:1])
  jstep, state_sh, frozen_sh = step_lib.jit_step(fn, mesh, state, frozen)
  return jstep, jax.device_put(state, state_sh, may_alias=False), jax.device_put(frozen, frozen_sh)


def median_step_times(runs: list[list], batch: dict, repeats: int, progress: bool = False) -> list[float]:
  """Median seconds of `repeats` steps per run [step, state, frozen], runs interleaved; each run's state advances."""
  times = [[] for _ in runs]
  for _ in tqdm(range(repeats), desc='steps', leave=False, disable=not progress):
    for run, run_times in zip(runs, times):
      step, state, frozen = run
      t0 = time.perf_counter()
      state, m = step(state, frozen, batch)
      jax.block_until_ready((state, m))
      run_times.append(time.perf_counter() - t0)
      run[1] = state
  return [statistics.median(t) for t in times]


def measure_remat(model_name: str, batch_size: int, repeats: int, modes=('none', 'decoded', 'blocks')) -> list[dict]:
  """One row per remat mode of the unrolled 'pq dynamic' step: compile s, XLA memory analysis (bytes), median step s.
  The modes memory_plan.py models ('dots' and the scanned steps: benchmarks/scan_blocks.py)."""
  model = dit.create_model(model_name, input_size=32)
  params = _common.random_dit_params(model)
  rules = surgery.default_rules('pq', 256, 8)
  batch = _common.latent_batch(batch_size)
  rows, runs = [], []
  for mode in tqdm(modes, desc=f'compile {model_name} batch {batch_size}', leave=False):
    jstep, state, frozen = make_step(model, rules, params, 'pq dynamic', batch_size, remat=mode)
    t0 = time.perf_counter()
    compiled = jstep.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state, m = compiled(state, frozen, batch)  # warm-up
    rows.append(dict(model=model_name, batch=batch_size, remat=mode, compile_s=compile_s, loss=float(m['loss']),
                     temp=mem.temp_size_in_bytes, args=mem.argument_size_in_bytes, out=mem.output_size_in_bytes))  # fmt: skip
    runs.append([compiled, state, frozen])
  for row, step_s in zip(rows, median_step_times(runs, batch, repeats, progress=True)):
    row['step_s'] = step_s
  return rows
