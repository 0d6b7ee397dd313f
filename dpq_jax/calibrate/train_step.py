"""The calibration train step: DDPM loss of the quantized DiT, optax update of the trainable set.

One function, jitted with explicit in/out shardings over a mesh of any size (1 device or a
pod): `state` (donated) holds what changes and is checkpointed, `frozen` what does not.

  state = {'step': int32[], 'rng': uint32[2] (raw key data), 'params': trainable params,
           'opt_state': optax state of those, 'quant': the mutable `quant` collection (codes
           and whatever else the layers keep there, except the latent weights)}
  frozen = {'params': frozen params, 'quant': latent weights, 'fp': fp params (distillation)}

Randomness of step s is fold_in(rng, s), so a resumed run draws what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dpq_jax import tree_utils
from dpq_jax.calibrate import sharding
from dpq_jax.calibrate import trainable as trainable_lib
from dpq_jax.models import scan as scan_lib
from dpq_jax.quant import layers, qweight
from dpq_jax.quant import pq as pq_lib

# What the backward pass recomputes instead of keeping (config.calibrate.remat):
#   'none'     nothing: every decoded kernel W_hat [C_in, C_out] and every activation is kept;
#   'decoded'  each quantized layer's W_hat is re-gathered from codebooks + codes (PQDense.remat);
#   'blocks'   each DiT block is rematerialised whole (DiT.remat, nn.remat): only block inputs are kept.
#              Unrolled, XLA:CPU drops jax.checkpoint's ordering and gains nothing (benchmarks/calibrate_step.py);
#              under scan (config.model.scan_blocks) the recomputation stays in the backward loop;
#   'dots'     per block, only the outputs of the linear layers' matmuls are kept (DiT.remat with the policy
#              dots_with_no_batch_dims_saveable): decoded kernels, attention and elementwise work are recomputed.
REMAT_MODES = ('none', 'decoded', 'blocks', 'dots')
REMAT_POLICIES = {'dots': 'dots_with_no_batch_dims_saveable'}


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static settings of the calibration loss."""

  num_classes: int
  label_dropout: float = 0.1  # DiT training's class dropout; the null label is num_classes
  assign_every: int = 1  # recompute assignments every n steps (1: every step, 0: never)
  distill_weight: float = 0.0  # weight of ||eps_q - eps_fp||^2 on the same noisy input


def calibration_models(
  model: nn.Module, rules: layers.QuantRules, assignment: str, remat: str = 'none'
) -> tuple[nn.Module, nn.Module]:
  """(dynamic, frozen) quantized clones of the DiT `model` for `make_train_step`, with the remat mode.

  dynamic recomputes the assignments in its forward (`assignment` 'dynamic' or 'ste'); frozen
  decodes the stored codes. The remat mode changes what the backward pass keeps, never a value or a
  parameter name.
  """
  if remat not in REMAT_MODES:
    raise ValueError(f'remat={remat!r}: expected one of {", ".join(REMAT_MODES)}')
  decoded, blocks, policy = remat == 'decoded', remat in ('blocks', 'dots'), REMAT_POLICIES.get(remat)
  dynamic = model.clone(dense=layers.dense_factory(rules, assignment, remat=decoded), remat=blocks, remat_policy=policy)
  frozen = model.clone(dense=layers.dense_factory(rules, 'frozen', remat=decoded), remat=blocks, remat_policy=policy)
  return dynamic, frozen


def attach_latent(
  params: dict, quant: dict, fp_params: dict, assignment: str, metrics: dict | None = None,
  latents: dict | None = None,
) -> tuple[dict, dict]:  # fmt: skip
  """Adds every quantized layer's full-precision kernel (or its entry in `latents` {module path: [in, out]}) as
  its latent weight, and its assignment metric.

  Dynamic assignment keeps it in the `quant` collection (argmin target, never trained); 'ste'
  puts it in params (a straight-through weight that may be trained). metrics {module path: whitening
  factors [num_subvectors, d, d]} (quant/metric.py) go to `quant` as `metric`: the argmin is then taken in
  the layer-output metric that quantize fitted in.
  """
  params = jax.tree.map(lambda x: x, params)
  quant = jax.tree.map(lambda x: x, quant)
  for name in qweight.modules(params):
    keys = name.split('/')
    fp = fp_params
    for k in keys:
      fp = fp[k]
    target = params if assignment == 'ste' else quant
    latent = fp[qweight.KERNEL] if not latents or name not in latents else latents[name]
    tree_utils.set_path(target, keys + [qweight.LATENT], jnp.asarray(latent, jnp.float32))
    if metrics and name in metrics:
      tree_utils.set_path(quant, keys + [qweight.METRIC], jnp.asarray(metrics[name], jnp.float32))
  return params, quant


def split_quant(quant: dict) -> tuple[dict, dict]:
  """(mutable, constant) parts of the `quant` collection: latent weights and metrics are constant."""
  constant, mutable = trainable_lib.split(quant, lambda path, _: qweight.is_assignment_input(path))
  return mutable, constant


def init_state(trainable: dict, quant: dict, tx: optax.GradientTransformation, seed: int) -> dict:
  return {
    'step': jnp.zeros((), jnp.int32),
    'rng': jax.random.key_data(jax.random.key(seed)),
    'params': trainable,
    'opt_state': tx.init(trainable),
    'quant': quant,
  }


def _changed_fraction(old: dict, new: dict) -> jax.Array:
  changed, total = jnp.zeros((), jnp.float32), 0
  for a, b in zip(qweight.codes(old), qweight.codes(new)):
    changed += jnp.sum(a != b).astype(jnp.float32)
    total += a.size
  return changed / max(total, 1)


def make_train_step(
  dynamic_model: nn.Module,
  frozen_model: nn.Module,
  diffusion,
  tx: optax.GradientTransformation,
  loss_cfg: LossConfig,
  fp_model: nn.Module | None = None,
  lr_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[dict, dict, dict], tuple[dict, dict]]:
  """train_step(state, frozen, batch) -> (state, metrics); batch = {'latents' (B,H,W,C), 'labels' (B,)}.

  dynamic_model recomputes the assignments in its forward (PQDense 'dynamic' or 'ste') and
  writes them to `quant`; frozen_model decodes the stored codes.
  """

  def losses(trainable: dict, state: dict, frozen: dict, batch: dict, keys, dynamic: bool):
    k_t, k_noise, k_drop = keys
    x = batch['latents'].astype(jnp.float32)
    b = x.shape[0]
    t = jax.random.randint(k_t, (b,), 0, diffusion.num_timesteps)
    noise = jax.random.normal(k_noise, x.shape, jnp.float32)
    drop = jax.random.uniform(k_drop, (b,)) < loss_cfg.label_dropout
    y = jnp.where(drop, loss_cfg.num_classes, batch['labels'].astype(jnp.int32))
    variables = {
      'params': trainable_lib.merge(trainable, frozen['params']),
      'quant': trainable_lib.merge(state['quant'], frozen['quant']),
    }
    seen = {}

    def apply_fn(v, x_t, t_model, y):
      if dynamic:
        out, updates = dynamic_model.apply(v, x_t, t_model, y, mutable=['quant'])
        seen['quant'] = updates['quant']
      else:
        out = frozen_model.apply(v, x_t, t_model, y)
      seen.update(out=out, x_t=x_t, t=t_model)
      return out

    terms = diffusion.training_losses(apply_fn, variables, x, t, noise=noise, model_kwargs={'y': y})
    loss = jnp.mean(terms['loss'])
    metrics = {'mse': jnp.mean(terms['mse']), 'vb': jnp.mean(terms.get('vb', jnp.zeros_like(terms['mse'])))}
    if loss_cfg.distill_weight > 0:
      target = jax.lax.stop_gradient(fp_model.apply({'params': frozen['fp']}, seen['x_t'], seen['t'], y))
      metrics['distill'] = jnp.mean(jnp.square(seen['out'] - target))
      loss = loss + loss_cfg.distill_weight * metrics['distill']
    new_quant = trainable_lib.pick(state['quant'], seen['quant']) if dynamic else state['quant']
    return loss, (metrics, new_quant)

  def train_step(state: dict, frozen: dict, batch: dict) -> tuple[dict, dict]:
    step = state['step']
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), step)
    keys = tuple(jax.random.split(rng, 3))

    def grads(dynamic: bool):
      fn = jax.value_and_grad(functools.partial(losses, dynamic=dynamic), has_aux=True)
      return fn(state['params'], state, frozen, batch, keys)

    if loss_cfg.assign_every == 1:
      (loss, (metrics, quant)), g = grads(True)
    elif loss_cfg.assign_every == 0:
      (loss, (metrics, quant)), g = grads(False)
    else:
      (loss, (metrics, quant)), g = jax.lax.cond(
        step % loss_cfg.assign_every == 0, lambda: grads(True), lambda: grads(False)
      )
    updates, opt_state = tx.update(g, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = dict(
      metrics,
      loss=loss,
      grad_norm=optax.global_norm(g),
      changed=_changed_fraction(state['quant'], quant),
      lr=lr_fn(step) if lr_fn is not None else jnp.zeros(()),
    )
    new_state = {'step': step + 1, 'rng': state['rng'], 'params': params, 'opt_state': opt_state, 'quant': quant}
    return new_state, metrics

  return train_step


def jit_step(step_fn: Callable, mesh: jax.sharding.Mesh, state: Any, frozen: Any) -> tuple[Callable, Any, Any]:
  """(jitted step, state shardings, frozen shardings); the state argument is donated."""
  state_sh = sharding.tree_shardings(mesh, state)
  frozen_sh = sharding.tree_shardings(mesh, frozen)
  jitted = jax.jit(
    step_fn,
    in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
    out_shardings=(state_sh, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  return jitted, state_sh, frozen_sh


def refresh_codes(params: dict, quant: dict) -> dict:
  """The `quant` collection with every PQ/VQ layer's codes recomputed as a dynamic forward recomputes them.

  PQDense's dynamic assignment (`pq.encode`) depends on the layer's latent weight (`quant/latent`, or
  `params/latent` for 'ste'), scale, codebooks, alive mask and metric only, not on the input: each layer is
  assigned alone, by one small program per layer shape, instead of stacking the model and compiling its
  forward. Trees per block or stacked (models/scan.py: leaves [depth, ...] under `blocks`, assigned block by
  block, as the scanned forward does); the codes keep their dtype and the rest of `quant` is returned as is."""
  quant = _copy_dicts(quant)
  for name in qweight.modules(params):
    keys = name.split('/')
    p, q = tree_utils.get_path(params, keys), tree_utils.get_path(quant, keys)
    if q is None or qweight.CODES not in q:
      continue
    latent = q.get(qweight.LATENT, p.get(qweight.LATENT))
    if latent is None:
      raise ValueError(f'refresh_codes: layer {name} has no latent weight (train_step.attach_latent)')
    operands = (latent, p[qweight.CODEBOOKS], q.get(qweight.METRIC), q.get(qweight.ALIVE), p.get(qweight.SCALE))
    if keys[0] == scan_lib.STACKED:  # [depth, ...]: one block at a time, the scanned forward's per-block program
      codes = jnp.stack([_assign(*(None if x is None else x[i] for x in operands)) for i in range(len(latent))])
    else:
      codes = _assign(*operands)
    q[qweight.CODES] = codes.astype(q[qweight.CODES].dtype)
  return quant


@jax.jit
def _assign(latent, codebooks, u, alive, scale) -> jax.Array:
  """PQDense's dynamic codes [num_subvectors, out_features] of one layer (compiled once per layer shape)."""
  num_codebooks, codebook_size, subvector_dim = codebooks.shape
  spec = pq_lib.CodebookSpec(codebook_size, subvector_dim, shared=num_codebooks == 1)  # (one position: the same)
  return pq_lib.encode(latent, codebooks, spec, u, alive, scale)


def _copy_dicts(tree: dict) -> dict:
  """The nested dicts copied, the leaves shared."""
  return {k: _copy_dicts(v) if isinstance(v, dict) else v for k, v in tree.items()}
