"""Training of the demo's small class-conditional DiT on the digits with the project's diffusion loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpq_jax import diffusion, tree_utils
from dpq_jax.models import dit
from dpq_jax.models.spec import ModelSpec


def spec_of(config: ml_collections.ConfigDict) -> ModelSpec:
  m = config.model
  return ModelSpec(m.name, m.input_size, m.num_classes, m.learn_sigma, in_channels=1)


def fingerprint(config: ml_collections.ConfigDict) -> dict:
  """What decides the trained model: config.model, config.train and the seed."""
  return {'model': config.model.to_dict(), 'train': config.train.to_dict(), 'seed': config.seed}


def train_dit(model: dit.DiT, images: np.ndarray, labels: np.ndarray, cfg: ml_collections.ConfigDict, seed: int):
  """AdamW with linear warm-up and cosine decay on the DiT training loss (mse + vb, label dropout)."""
  params = dit.init_params(model, jax.random.key(seed))
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr * cfg.final_lr_fraction
  )
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))
  opt_state = opt.init(params)
  process = diffusion.create_diffusion('')

  @jax.jit
  def step(params, opt_state, x, y, key):
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (x.shape[0],), 0, process.num_timesteps)

    def loss_fn(p):
      apply = lambda v, x_t, tt, y: model.apply(v, x_t, tt, y, train=True, rngs={'dropout': k_drop})
      noise = jax.random.normal(k_noise, x.shape)
      return process.training_losses(apply, {'params': p}, x, t, noise=noise, model_kwargs={'y': y})['loss'].mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  from tqdm.auto import tqdm

  rng = np.random.default_rng(seed)
  losses = []
  with tqdm(range(cfg.steps), desc='train DiT (digits)', unit='step') as bar:
    for i in bar:
      idx = rng.integers(0, len(images), cfg.batch_size)
      key = jax.random.fold_in(jax.random.key(seed + 1), i)
      params, opt_state, loss = step(params, opt_state, images[idx], labels[idx], key)
      if i % 25 == 0 or i == cfg.steps - 1:
        losses.append((i, float(loss)))
        if not np.isfinite(losses[-1][1]):
          raise FloatingPointError(f'train: loss is {losses[-1][1]} at step {i}')
        bar.set_postfix(loss=f'{losses[-1][1]:.4f}')
  return params, losses


def flatten(tree: dict, prefix: str = '') -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = np.asarray(v)
  return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    tree_utils.set_path(out, path.split('/'), jnp.asarray(v))
  return out
