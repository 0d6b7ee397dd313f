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

from dpq_jax import convert, io_utils
from dpq_jax.demo import classifier, digits
from dpq_jax.demo import train as train_lib
from dpq_jax.evaluate import report as report_lib
from dpq_jax.stages.job import Job

TRAIN_DIR = 'train'


def check(config: ml_collections.ConfigDict) -> list[str]:
  """Problems with config.train (and the model size the digits need)."""
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


def run(config: ml_collections.ConfigDict, workdir: str, job: Job) -> Job:
  cfg = config.train
  data = digits.load(cfg.heldout_per_class, config.seed)
  spec = train_lib.spec_of(config)
  model = spec.create(class_dropout_prob=0.1)
  cache_dir = os.path.join(workdir, TRAIN_DIR)
  model_dir = os.path.join(cache_dir, 'model')
  cache_file = os.path.join(cache_dir, 'cache.json')
  classifier_file = os.path.join(cache_dir, 'classifier.npz')
  fingerprint = train_lib.fingerprint(config)
  cached = io_utils.exists(cache_file) and io_utils.read_json(cache_file).get('fingerprint') == fingerprint
  if cached:
    spec, params = convert.load_converted(model_dir)
    with io_utils.load_npz(classifier_file) as f:
      clf_params = train_lib.unflatten(dict(f))
    log = io_utils.read_json(cache_file)
    job.notes.append(f'train: reused the cached model in {model_dir} (same config.model/config.train)')
  else:
    start = time.perf_counter()
    params, losses = train_lib.train_dit(model, data['train_images'], data['train_labels'], cfg, config.seed)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    clf_params = classifier.train(data['train_images'], data['train_labels'], cfg.classifier_steps, config.seed)
    log = {'fingerprint': fingerprint, 'train_seconds': round(train_s, 2), 'losses': losses}
    log['classifier_seconds'] = round(time.perf_counter() - start, 2)
    convert.save_converted(model_dir, spec, params, source='dpq_jax digits demo (stage train)')
    io_utils.write_npz(classifier_file, **train_lib.flatten(clf_params))
    io_utils.write_json(cache_file, log)  # last: it marks the cache complete
  _, logits = classifier.apply(clf_params, data['heldout_images'])
  heldout_acc = float(np.mean(np.argmax(logits, -1) == data['heldout_labels']))
  job.spec, job.fp_params = spec, jax.tree.map(jnp.asarray, params)
  job.data, job.classifier = data, clf_params
  job.report.update(report_lib.full_precision_summary(spec, params))
  job.report['train'] = {
    'cached': cached,
    'seconds': log['train_seconds'],
    'final_loss': log['losses'][-1][1],
    'classifier_heldout_accuracy': heldout_acc,
  }
  return job
