"""The tiny quantized DiT of the calibration tests and its train step, shared by the tests of calibrate/ and
the worker scripts they start in subprocesses (`from tests.calibrate import tiny`)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from dpq_jax import diffusion as diffusion_lib
from dpq_jax import tree_utils
from dpq_jax.calibrate import sharding
from dpq_jax.calibrate import train_step as step_lib
from dpq_jax.calibrate import trainable as trainable_lib
from dpq_jax.models import dit
from dpq_jax.models import scan as scan_lib
from dpq_jax.models.load import randomize_zero_init
from dpq_jax.quant import pq, surgery
from tests import helpers

NUM_CLASSES = 10


@functools.lru_cache(maxsize=None)
def tiny_setup(k: int = 16, d: int = 4, seed: int = 0):
  """(fp module, rules, fp params, QuantizedParams) of a 2-block DiT on 8x8 latents.

  Codebooks are K random sub-vectors of each kernel and codes their argmin (numpy): the quantize
  stage's layout without its k-means compilation. Cached: callers must not modify the trees.
  """
  rules = surgery.default_rules('pq', k, d)
  fp = dit.DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=NUM_CLASSES)
  params = randomize_zero_init(dit.init_params(fp, jax.random.key(seed)), jax.random.key(seed + 1), std=0.1)
  params = jax.tree.map(np.asarray, params)
  rng = np.random.default_rng(seed)
  qparams = jax.tree.map(lambda x: x, params)
  quant, rows = {}, []
  for path, kernel in surgery.module_kernels(params):
    name = '/'.join(path)
    if rules.spec_for(name) is None:
      continue
    sub = np.asarray(pq.to_subvectors(kernel, d))  # [M, out, d]
    codebooks = sub[:, rng.choice(sub.shape[1], k, replace=False)]  # [M, K, d]
    codes = ((sub[:, :, None, :] - codebooks[:, None]) ** 2).sum(-1).argmin(-1).astype(np.uint8)  # [M, out]
    node = qparams
    for p in path:
      node = node[p]
    del node['kernel']
    node['codebooks'] = codebooks
    tree_utils.set_path(quant, path + ('codes',), codes)
    rows.append({'name': name})
  return fp, rules, params, surgery.QuantizedParams.from_variables(qparams, quant, rows=rows)


class TinySpec:
  """Stands in for models.spec.ModelSpec: the stage builds its modules with spec.create(...)."""

  name = 'tiny'
  num_classes = NUM_CLASSES

  def __init__(self, module):
    self.module = module
    self.in_channels = module.in_channels

  def create(self, dtype=jnp.float32, dense=None):
    return self.module.clone(dtype=dtype, **({'dense': dense} if dense else {}))


def calib_config(**overrides) -> ml_collections.ConfigDict:
  """config.calibrate for the tiny problem: constant lr 1e-3, no warmup or clipping, a data-parallel mesh."""
  cfg = common.base_config().calibrate
  cfg.update(
    dict(steps=50, warmup=0, schedule='constant', clip=0.0, lr=1e-3, mesh=(('data', -1), ('fsdp', 1)), remat='none')
  )
  cfg.update(overrides)
  return cfg


def tiny_data(n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Structured latents (a per-class pattern plus a little noise): learnable, fixed."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  patterns = rng.standard_normal((NUM_CLASSES, 8, 8, 4)).astype(np.float32)
  return (patterns[labels] + 0.1 * rng.standard_normal((n, 8, 8, 4))).astype(np.float32), labels


def build(cfg, setup=None, assignment: str = 'dynamic', devices=None, scan: bool = False):
  """(jitted step, state, frozen, models) on a mesh over `devices` (default: the first device); scan: the blocks
  under nn.scan, state and frozen trees stacked per block (as calibrate/loop.py runs them)."""
  fp, rules, params, q = setup or tiny_setup()
  dyn, frz = step_lib.calibration_models(fp.clone(scan_blocks=scan), rules, assignment, cfg.remat)
  p, qn = step_lib.attach_latent(q.variables()['params'], q.variables()['quant'], params, assignment)
  mutable, constant = step_lib.split_quant(qn)
  trainable, frozen_params = trainable_lib.split_trainable(p, trainable_lib.trainable_patterns(cfg.trainable))
  if scan:
    trainable, frozen_params, mutable, constant = (
      scan_lib.stack_blocks(tree, fp.depth) for tree in (trainable, frozen_params, mutable, constant)
    )
  tx = trainable_lib.optimizer(cfg)
  state = step_lib.init_state(trainable, mutable, tx, 0)
  frozen = {'params': frozen_params, 'quant': constant, 'fp': params if cfg.distill_weight > 0 else {}}
  fn = step_lib.make_train_step(
    dyn, frz, diffusion_lib.create_diffusion(), tx,
    step_lib.LossConfig(NUM_CLASSES, cfg.label_dropout, cfg.assign_every, cfg.distill_weight), fp,
  )  # fmt: skip
  mesh = sharding.make_mesh(tuple(cfg.mesh), devices or jax.devices()[:1])
  jstep, state_sh, frozen_sh = step_lib.jit_step(fn, mesh, state, frozen)
  return jstep, jax.device_put(state, state_sh, may_alias=False), jax.device_put(frozen, frozen_sh), (fp, dyn, frz)


def runlocal(**overrides) -> ml_collections.ConfigDict:
  """The runlocal PQ job (k=16, d=4) with 'section.name'=value overrides."""
  config = common.quant_job('t', common.parse_arg('runlocal=1', method='pq', k=16, d=4, bits=1, runlocal=False))
  return helpers.set_keys(config, **overrides)


def dense_step_reference(rng: jax.Array, x: np.ndarray, y: np.ndarray, label_dropout: float = 0.5):
  """(loss, dL/dW of every kernel) of the plain DiT on the decoded kernels of tiny_setup(), with the randomness
  of a train step whose step key is `rng` (t, noise, dropped labels): the dense reference of a calibration step."""
  fp, _, _, q = tiny_setup()
  k_t, k_noise, k_drop = jax.random.split(rng, 3)
  diffusion = diffusion_lib.create_diffusion()
  n = len(x)
  t = jax.random.randint(k_t, (n,), 0, diffusion.num_timesteps)
  noise = jax.random.normal(k_noise, x.shape, jnp.float32)
  y_in = jnp.where(jax.random.uniform(k_drop, (n,)) < label_dropout, NUM_CLASSES, y)

  def loss(p):
    terms = diffusion.training_losses(fp.apply, {'params': p}, jnp.asarray(x), t, noise=noise, model_kwargs={'y': y_in})
    return jnp.mean(terms['loss'])

  value, grads = jax.jit(jax.value_and_grad(loss))(q.dense_params())
  return value, jax.device_get(grads)
