"""Stage `train`: a small class-conditional DiT trained on the digits with the project's diffusion loss.

The trained model is cached in DIR/train/ (a converted-checkpoint directory, loadable anywhere as
`config.model.checkpoint`), with the classifier the metrics use and a fingerprint of the settings
that made them: a rerun with the same config.model/config.train reuses both and skips training.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpq_jax import convert, diffusion, io_utils, tree_utils
from dpq_jax.demo import classifier, digits
from dpq_jax.evaluate import report as report_lib
from dpq_jax.models import dit
from dpq_jax.models.spec import ModelSpec

TRAIN_DIR = 'train'


def check_config(config: ml_collections.ConfigDict) -> list[str]:
  cfg, errors = config.train, []
  if config.train.dataset != 'digits':
    errors.append(f"config.train.dataset={cfg.dataset!r}: expected 'digits' (the only embedded dataset)")
  for key in ('steps', 'batch_size', 'classifier_steps'):
    if cfg[key] < 1:
      errors.append(f'config.train.{key}={cfg[key]}: expected >= 1')
  if not cfg.lr > 0:
    errors.append(f'config.train.lr={cfg.lr}: expected > 0')
  if not 0 <= cfg.warmup_steps < cfg.steps:
    errors.append(f'config.train.warmup_steps={cfg.warmup_steps}: expected 0 <= warmup < steps ({cfg.steps})')
  if config.model.input_size != digits.IMAGE_SIZE or config.model.num_classes != digits.NUM_CLASSES:
    errors.append(
      f'config.model.input_size={config.model.input_size}, num_classes={config.model.num_classes}: '
      f'the digits are {digits.IMAGE_SIZE}x{digits.IMAGE_SIZE} with {digits.NUM_CLASSES} classes'
    )
  return errors


def spec_of(config: ml_collections.ConfigDict) -> ModelSpec:
  m = config.model
  return ModelSpec(m.name, m.input_size, m.num_classes, m.learn_sigma, in_channels=1)


def _fingerprint(config: ml_collections.ConfigDict) -> dict:
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


def run(config: ml_collections.ConfigDict, workdir: str, state: dict) -> dict:
  cfg = config.train
  data = digits.load(cfg.heldout_per_class, config.seed)
  spec = spec_of(config)
  model = spec.create(class_dropout_prob=0.1)
  cache_dir = os.path.join(workdir, TRAIN_DIR)
  model_dir = os.path.join(cache_dir, 'model')
  cache_file = os.path.join(cache_dir, 'cache.json')
  classifier_file = os.path.join(cache_dir, 'classifier.npz')
  fingerprint = _fingerprint(config)
  cached = io_utils.exists(cache_file) and io_utils.read_json(cache_file).get('fingerprint') == fingerprint
  if cached:
    spec, params = convert.load_converted(model_dir)
    with io_utils.load_npz(classifier_file) as f:
      clf_params = _unflatten(dict(f))
    log = io_utils.read_json(cache_file)
    state['report_notes'].append(f'train: reused the cached model in {model_dir} (same config.model/config.train)')
  else:
    start = time.perf_counter()
    params, losses = train_dit(model, data['train_images'], data['train_labels'], cfg, config.seed)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    clf_params = classifier.train(data['train_images'], data['train_labels'], cfg.classifier_steps, config.seed)
    log = {'fingerprint': fingerprint, 'train_seconds': round(train_s, 2), 'losses': losses}
    log['classifier_seconds'] = round(time.perf_counter() - start, 2)
    convert.save_converted(model_dir, spec, params, source='dpq_jax digits demo (stage train)')
    io_utils.write_npz(classifier_file, **_flatten(clf_params))
    io_utils.write_json(cache_file, log)  # last: it marks the cache complete
  _, logits = classifier.apply(clf_params, data['heldout_images'])
  heldout_acc = float(np.mean(np.argmax(logits, -1) == data['heldout_labels']))
  state.update(
    spec=spec,
    model=spec.create(dtype=jnp.dtype(config.model.dtype)),
    variables={'params': jax.tree.map(jnp.asarray, params)},
    data=data,
    classifier=clf_params,
  )
  state['report'].update(report_lib.full_precision_summary(spec, params))
  state['report']['train'] = {
    'cached': cached,
    'seconds': log['train_seconds'],
    'final_loss': log['losses'][-1][1],
    'classifier_heldout_accuracy': heldout_acc,
  }
  return state


def _flatten(tree: dict, prefix: str = '') -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = np.asarray(v)
  return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    tree_utils.set_path(out, path.split('/'), jnp.asarray(v))
  return out
