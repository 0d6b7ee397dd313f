"""Stage `load`: the model of config.model as (spec, module, float32 params)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpq_jax import convert, io_utils
from dpq_jax.models import dit
from dpq_jax.models.spec import ModelSpec

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def check_config(cfg: ml_collections.ConfigDict) -> list[str]:
  """Problems with config.model, each a line naming the value and what was expected."""
  errors = []
  if cfg.init not in ('checkpoint', 'random'):
    errors.append(f"config.model.init={cfg.init!r}: expected 'checkpoint' or 'random'")
  if cfg.name:
    try:
      patch = dit.parse_name(cfg.name)[1]
      if cfg.input_size > 0 and cfg.input_size % patch:
        errors.append(
          f'config.model.input_size={cfg.input_size}: expected a multiple of the patch size {patch} of {cfg.name}'
        )
    except ValueError as e:
      errors.append(f'config.model.name={cfg.name!r}: {str(e).partition("; ")[2]}')
  if cfg.init == 'checkpoint':
    if not cfg.checkpoint:
      errors.append("config.model.checkpoint is empty: give a checkpoint path or set config.model.init='random'")
    elif not io_utils.exists(cfg.checkpoint):
      errors.append(f'config.model.checkpoint={cfg.checkpoint!r}: no such file or directory')
  if cfg.dtype not in DTYPES:
    errors.append(f'config.model.dtype={cfg.dtype!r}: expected one of {", ".join(DTYPES)}')
  if cfg.input_size <= 0:
    errors.append(f'config.model.input_size={cfg.input_size}: expected a positive latent size (32 for 256px)')
  return errors


def load_model(cfg: ml_collections.ConfigDict, seed: int = 0) -> tuple[ModelSpec, dit.DiT, dict]:
  """Builds the module and its params from config.model (random init or a checkpoint)."""
  if cfg.init == 'random':
    spec = ModelSpec(name=cfg.name, input_size=cfg.input_size, num_classes=cfg.num_classes, learn_sigma=cfg.learn_sigma)
    params = jax.jit(lambda key: dit.init_params(spec.create(), key))(jax.random.key(seed))
    params = randomize_zero_init(params, jax.random.key(seed + 1))
  else:
    spec, params = convert.load_any(cfg.checkpoint, name=cfg.name or None, input_size=cfg.input_size or None)
  model = spec.create(dtype=DTYPES[cfg.dtype])
  return spec, model, jax.tree.map(jnp.asarray, params)


def randomize_zero_init(params: dict, key: jax.Array, std: float = 0.02) -> dict:
  """A random-init DiT is the identity map with zero output: adaLN-Zero and the final layer start
  at 0. For smoke runs on real shapes, give those zero kernels small random values instead."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    names = [p.key for p in path]
    zero_init = 'adaLN_modulation' in names or names[:2] == ['final_layer', 'linear']
    out.append(
      leaf + std * jax.random.normal(k, leaf.shape, leaf.dtype) if zero_init and names[-1] == 'kernel' else leaf
    )
  return jax.tree_util.tree_unflatten(treedef, out)


def param_count(params: dict) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
