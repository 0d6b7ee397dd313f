"""Which params calibration trains (regex rules over param paths) and the optax optimizer.

Nested-dict helpers split a variable tree into two disjoint nested dicts and merge them back,
so the optimizer state mirrors only the trainable leaves: optax never sees an integer or a
frozen array.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpq_jax import tree_utils

# Named trainable sets; anything else in config.calibrate.trainable is a regex over param paths.
PRESETS = {
  'codebooks': r'.*/(codebooks|scale)',  # a quantized layer's codewords and its per-channel scale
  'biases': r'.*/bias',
  'latent': r'.*/latent',  # straight-through latent weights (assignment='ste')
  'embedders': r'(x|t|y)_embedder/.*',
  'final_layer': r'final_layer/.*',
  'all': r'.*',
}
OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('constant', 'cosine', 'linear')
_WORD = re.compile(r'[A-Za-z_]+')


def trainable_patterns(spec: str) -> list[str]:
  """'codebooks,biases' or 'codebooks,blocks_0/.*/bias' -> regexes.

  Raises:
    ValueError naming an unknown set name or an invalid regex.
  """
  items = [s.strip() for s in str(spec).split(',') if s.strip()]
  if not items:
    raise ValueError(f'config.calibrate.trainable={spec!r}: expected a comma-separated list of sets or regexes')
  out = []
  for item in items:
    if _WORD.fullmatch(item):
      if item not in PRESETS:
        raise ValueError(
          f'config.calibrate.trainable: unknown trainable set {item!r}; expected one of {", ".join(PRESETS)} '
          'or a regex over param paths'
        )
      out.append(PRESETS[item])
      continue
    try:
      re.compile(item)
    except re.error as e:
      raise ValueError(f'config.calibrate.trainable: {item!r} is not a valid regex ({e})') from None
    out.append(item)
  return out


def path_str(path: tuple) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def split(tree: dict, predicate: Callable[[str, Any], bool]) -> tuple[dict, dict]:
  """(selected, rest): two disjoint nested dicts holding the leaves where predicate(path, leaf)."""
  selected: dict = {}
  rest: dict = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    keys = [str(k.key) for k in path]
    tree_utils.set_path(selected if predicate('/'.join(keys), leaf) else rest, keys, leaf)
  return selected, rest


def merge(a: dict, b: dict) -> dict:
  """Union of two nested dicts with disjoint leaves."""
  out = dict(a)
  for k, v in b.items():
    if k in out:
      if not (isinstance(out[k], dict) and isinstance(v, dict)):
        raise ValueError(f'merge: key {k!r} is a leaf in both trees')
      out[k] = merge(out[k], v)
    else:
      out[k] = v
  return out


def pick(like: dict, source: dict) -> dict:
  """The leaves of `source` at the paths of `like` (same structure as `like`)."""
  return {k: pick(v, source[k]) if isinstance(v, dict) else source[k] for k, v in like.items()}


def split_trainable(params: dict, patterns: list[str]) -> tuple[dict, dict]:
  """(trainable, frozen) params; only floating leaves matching a pattern are trainable.

  Raises:
    ValueError when the patterns select nothing.
  """
  compiled = [re.compile(p) for p in patterns]

  def is_trainable(path: str, leaf: Any) -> bool:
    return jnp.issubdtype(leaf.dtype, jnp.floating) and any(c.fullmatch(path) for c in compiled)

  trainable, frozen = split(params, is_trainable)
  if not trainable:
    raise ValueError(f'config.calibrate.trainable patterns {patterns} match no floating parameter of the model')
  return trainable, frozen


def count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def learning_rate(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to cfg.lr, then constant, cosine or linear decay to 0 at cfg.steps."""
  warmup = max(int(cfg.warmup), 0)
  decay_steps = max(int(cfg.steps) - warmup, 1)
  if cfg.schedule == 'constant':
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == 'cosine':
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps)
  elif cfg.schedule == 'linear':
    after = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
  else:
    raise ValueError(f'config.calibrate.schedule={cfg.schedule!r}: expected one of {", ".join(SCHEDULES)}')
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """optax chain from config.calibrate: global-norm clipping (clip > 0), then the optimizer."""
  lr = learning_rate(cfg)
  if cfg.optimizer == 'adam':
    opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
  elif cfg.optimizer == 'adamw':
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  elif cfg.optimizer == 'sgd':
    opt = optax.sgd(lr, momentum=cfg.b1 or None)
  else:
    raise ValueError(f'config.calibrate.optimizer={cfg.optimizer!r}: expected one of {", ".join(OPTIMIZERS)}')
  return optax.chain(optax.clip_by_global_norm(cfg.clip), opt) if cfg.clip > 0 else opt
