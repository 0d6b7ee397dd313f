"""What the benchmarks share: DiT-XL/2 layer shapes, random weights, argument checks, tables, timing.

Benchmarks run from the repository root as modules, `python -m benchmarks.NAME [flags]`; each
prints markdown tables. Random weights are heavy-tailed like trained ones (student-t, df=4, x 0.02).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
from concurrent import futures
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpq_jax import tree_utils

# The linear layers of one DiT-XL/2 block: module path in the block -> (C_out, C_in) as in PyTorch
# (the Flax kernel is [C_in, C_out]).
DIT_XL_BLOCK_LAYERS = {
  'attn/qkv': (3456, 1152),
  'attn/proj': (1152, 1152),
  'mlp/fc1': (4608, 1152),
  'mlp/fc2': (1152, 4608),
  'adaLN_modulation': (6912, 1152),
}
DIT_XL_BLOCKS = 28


# Random weights and inputs.


def heavy_tailed(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """float32 student-t (df=4) x 0.02: the heavy tails of trained DiT weights."""
  return (rng.standard_t(4, shape) * 0.02).astype(np.float32)


def block_params(num_blocks: int, seed: int) -> dict:
  """Flax-layout params {'blocks_i': {...: {'kernel': [C_in, C_out], 'bias': [C_out]}}} of the first
  `num_blocks` DiT-XL/2 blocks' linear layers: heavy-tailed kernels, zero biases."""
  rng = np.random.default_rng(seed)
  params: dict = {}
  for b in range(num_blocks):
    for name, (c_out, c_in) in DIT_XL_BLOCK_LAYERS.items():
      path = (f'blocks_{b}', *name.split('/'))
      tree_utils.set_path(params, path + ('kernel',), heavy_tailed(rng, (c_in, c_out)))
      tree_utils.set_path(params, path + ('bias',), np.zeros(c_out, np.float32))
  return params


def heavy_tailed_params(name: str, input_size: int, seed: int, device: bool = False) -> dict:
  """Every leaf of the DiT's param tree; 2-D kernels heavy-tailed, the rest normal x 0.02. numpy arrays, or with
  `device` jax arrays (the same values), each leaf converted as it is made: converting a whole numpy tree would hold
  both copies at once, and the process keeps the freed numpy heap (2.7 GB more peak RSS for DiT-XL/2)."""
  from dpq_jax.models import dit

  model = dit.create_model(name, input_size=input_size)
  shapes = jax.eval_shape(lambda k: dit.init_params(model, k), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    if path[-1].key == 'kernel' and len(s.shape) == 2:
      value = heavy_tailed(rng, s.shape)
    else:
      value = (rng.standard_normal(s.shape) * 0.02).astype(np.float32)
    return jnp.asarray(value) if device else value

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def random_dit_params(model) -> dict:
  """The DiT module's initial params with its zero-initialised layers made random (nothing trivially zero)."""
  from dpq_jax.models import dit
  from dpq_jax.models.load import randomize_zero_init

  params = jax.jit(lambda k: dit.init_params(model, k))(jax.random.key(0))
  return randomize_zero_init(params, jax.random.key(1))


def latent_batch(batch_size: int, input_size: int = 32) -> dict[str, np.ndarray]:
  """{'latents': [B, H, W, 4] unit normal, 'labels': [B] of 1000 classes}, seed 0."""
  rng = np.random.default_rng(0)
  return {
    'latents': rng.standard_normal((batch_size, input_size, input_size, 4)).astype(np.float32),
    'labels': rng.integers(0, 1000, batch_size).astype(np.int32),
  }


def layer_inputs(model_dir: str, params: dict, seed: int) -> dict[str, np.ndarray]:
  """Inputs [tokens, C_in] of every Dense layer (by module path) of a converted model on noisy inputs:
  the digits demo's 300 held-out digits at t spread over 0..999 for its model, unit-normal latents otherwise."""
  from flax import linen as nn

  from dpq_jax import convert, diffusion

  spec, _ = convert.load_converted(model_dir)
  model = spec.create()
  process = diffusion.create_diffusion('')
  if spec.in_channels == 1 and spec.input_size == 8:  # the digits demo's model
    from dpq_jax.demo import digits, metrics

    data = digits.load(30, seed)
    x_t, t, y = metrics.fixed_noisy_inputs(data['heldout_images'], data['heldout_labels'], seed)
  else:
    n = 16
    x0 = jax.random.normal(jax.random.key(seed), (n, spec.input_size, spec.input_size, spec.in_channels))
    t = jnp.linspace(0, process.num_timesteps - 1, n).round().astype(jnp.int32)
    x_t = process.q_sample(x0, t, jax.random.normal(jax.random.key(seed + 1), x0.shape))
    y = jax.random.randint(jax.random.key(seed + 2), (n,), 0, spec.num_classes)
  inputs = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense):
      inputs['/'.join(context.module.path)] = np.asarray(args[0]).reshape(-1, args[0].shape[-1])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({'params': params}, x_t, t, y)
  return inputs


# Command line: a bad value fails with one line naming it and what was expected, exit status 2. The
# checks are argparse types, so argparse names the flag: "error: argument --batch: expected ...".


class ArgumentParser(argparse.ArgumentParser):
  """argparse with one-line errors (no usage block)."""

  def error(self, message: str):
    self.exit(2, f'{self.prog}: error: {message}\n')


def parser(doc: str) -> ArgumentParser:
  """A parser whose --help shows the benchmark's docstring as written."""
  return ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
  """argparse type: an integer >= low (and <= high)."""
  expected = f'>= {low}' if high is None else f'in {low}..{high}'

  def convert(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = None
    if value is None or value < low or (high is not None and value > high):
      raise argparse.ArgumentTypeError(f'expected an integer {expected}, got {text!r}')
    return value

  return convert


def dit_name(text: str) -> str:
  """argparse type: a DiT model name (the registry's, or DiT-<depth>x<hidden>x<heads>/<patch>)."""
  from dpq_jax.models import dit

  try:
    dit.parse_name(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return text


def model_batches(text: str) -> list[tuple[str, int]]:
  """argparse type: 'MODEL:BATCH,...' -> [(DiT name, batch >= 1), ...]."""
  from dpq_jax.models import dit

  out = []
  for item in text.split(','):
    name, _, batch = item.rpartition(':')
    try:
      dit.parse_name(name)
      if int(batch) < 1:
        raise ValueError
    except ValueError:
      raise argparse.ArgumentTypeError(f'{item!r}: expected MODEL:BATCH with a DiT name and a batch >= 1') from None
    out.append((name, int(batch)))
  return out


def subset(known) -> Callable[[str], list[str]]:
  """argparse type: a comma-separated, non-empty subset of `known`, as a list."""

  def convert(text: str) -> list[str]:
    chosen = [s for s in text.split(',') if s]
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
      raise argparse.ArgumentTypeError(f'{text!r}: unknown {unknown}; expected a subset of {list(known)}')
    return chosen

  return convert


def converted_dir(text: str) -> str:
  """argparse type: a converted model directory (dpq_jax.convert.save_converted: model.json + params)."""
  if not os.path.isfile(os.path.join(text, 'model.json')):
    raise argparse.ArgumentTypeError(f'{text!r}: expected a converted model directory (with model.json)')
  return text


# Output, timing and memory.


def platform() -> str:
  """'jax 0.4.35 (cpu), 2 CPUs'."""
  return f'jax {jax.__version__} ({jax.devices()[0].platform}), {os.cpu_count()} CPUs'


def print_header(columns: list[str]) -> None:
  """The header and separator lines of a markdown table."""
  print('| ' + ' | '.join(columns) + ' |')
  print('|' + '---|' * len(columns))


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
  """(fn's last result, its best wall seconds over `repeats` calls); warm fn up first."""
  result, best = None, float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - start)
  return result, best


def interleaved_best(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Best wall seconds of each call over `repeats` rounds that run every call once, so machine
  noise hits all alike."""
  best = dict.fromkeys(calls, float('inf'))
  for _ in range(repeats):
    for name, fn in calls.items():
      best[name] = min(best[name], best_of(fn, 1)[1])
  return best


def peak_rss_bytes() -> int:
  """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def in_child(fn: Callable, *args) -> Any:
  """fn(*args) in a fresh (spawned) process, so that its peak memory is its own. Raises what fn raised,
  or BrokenProcessPool when the child died."""
  with futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
    return pool.submit(fn, *args).result()
