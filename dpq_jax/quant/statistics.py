"""Input statistics of the quantized layers, recorded from forward passes of the model.

`input_moments`: for every quantized layer, the d x d second moments H_j = mean over tokens of x_j x_j^T of
its inputs at each sub-vector position j (metric.py says what they are for), from forward passes of the
full-precision model on `noisy_batches`: calibration latents noised at timesteps that tile the whole
schedule, each run with its class label and with the null label (as classifier-free guided sampling runs
the model). Streaming (one batch in memory), sharded over a data mesh like calibration, deterministic.
`load_or_collect` keeps them in DIR/stats/ keyed by everything that decides them, so a rerun reuses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dpq_jax.quant import layers as layers_lib


def activation_energy(model, variables: dict, spec, num_batches: int, seed: int, batch_size: int = 4) -> dict:
  """Mean squared input per input channel {module path: [in_features]} of every PQ/VQ layer, from
  `num_batches` forward passes on random latents, timesteps and labels."""
  import flax.linen as nn

  def energies(variables: dict, x: jax.Array, t: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    found: dict[str, jax.Array] = {}

    def record(next_fun, args, kwargs, context):
      module = context.module
      if isinstance(module, layers_lib.PQDense) and context.method_name == '__call__':
        inputs = args[0].reshape(-1, args[0].shape[-1]).astype(jnp.float32)
        found['/'.join(module.path)] = jnp.mean(jnp.square(inputs), axis=0)  # [in_features]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):  # runs while tracing: the energies leave the jit as outputs
      model.apply(variables, x, t, y)
    return found

  energies = jax.jit(energies)
  sums: dict[str, Any] = {}
  key = jax.random.key(seed)
  size = spec.input_size
  for i in range(num_batches):
    kx, kt, ky = jax.random.split(jax.random.fold_in(key, i), 3)
    x = jax.random.normal(kx, (batch_size, size, size, spec.in_channels))
    t = jax.random.randint(kt, (batch_size,), 0, 1000)
    y = jax.random.randint(ky, (batch_size,), 0, spec.num_classes + 1)
    for name, energy in energies(variables, x, t, y).items():
      sums[name] = sums.get(name, 0.0) + energy / num_batches
  return {k: np.asarray(v) for k, v in sums.items()}


STATS_DIR = 'stats'
MOMENTS_FILE = 'input_moments.npz'


def noisy_batches(
  latents: np.ndarray, labels: np.ndarray, num_batches: int, batch_size: int, num_classes: int, seed: int,
  num_timesteps: int = 1000,
) -> Iterator[dict[str, np.ndarray]]:  # fmt: skip
  """`num_batches` model inputs {'x' [2B, H, W, C], 't' [2B], 'y' [2B], 'noise' [2B, H, W, C]} (B = batch_size): B latents drawn
  without replacement (cycling when there are fewer), noised by q_sample at jittered stratified timesteps (batch b,
  row i: stratum i * num_batches + b of num_batches * B equal strata of [0, num_timesteps), so every batch
  spans the schedule and all of them tile it), then the same B noisy inputs with their labels and with the null
  label num_classes."""
  from dpq_jax import diffusion as diffusion_lib

  diffusion = diffusion_lib.create_diffusion('')
  rng = np.random.default_rng(seed)
  total = num_batches * batch_size
  order = np.concatenate([rng.permutation(len(labels)) for _ in range(-(-total // len(labels)))])[:total]
  strata = np.arange(batch_size)[None, :] * num_batches + np.arange(num_batches)[:, None]  # [num_batches, B]
  t_all = np.floor((strata + rng.random(strata.shape)) * num_timesteps / total).astype(np.int32)
  noise_key = jax.random.key(seed)
  for b in range(num_batches):
    rows = order[b * batch_size : (b + 1) * batch_size]
    x0 = jnp.asarray(latents[rows], jnp.float32)
    t = jnp.asarray(t_all[b])
    noise = jax.random.normal(jax.random.fold_in(noise_key, b), x0.shape)
    x = np.asarray(diffusion.q_sample(x0, t, noise), np.float32)
    y = np.asarray(labels[rows], np.int32)
    noise = np.asarray(noise, np.float32)
    yield {
      'x': np.concatenate([x, x]),
      't': np.concatenate([t_all[b], t_all[b]]),
      'y': np.concatenate([y, np.full_like(y, num_classes)]),
      'noise': np.concatenate([noise, noise]),  # what the model's eps output should predict
    }


GRAD_PREFIX = 'grad2:'  # the flat stats dict's keys of the output-gradient energies ('grad2:' + layer)
_SOWN = 'intermediates'  # the collection the target layers sow their sums into
_PERTURBED = 'perturbations'  # each target layer's probe [out_features] (zeros): its gradient is the layer's g2


@jax.custom_vjp
def _tap(out: jax.Array, probe: jax.Array) -> jax.Array:
  """out, unchanged; the backward pass gives `probe` [out_features] the cotangent sum over tokens of g^2 (g the
  cotangent of out), so jax.grad w.r.t. the probes is every layer's squared output gradient already summed. A
  zero perturbation of out's own shape would do the same through its full gradient, but the zeros and the
  gradients of every layer's whole output then stack over the scanned blocks ([depth, rows, tokens, out]): the
  scanned DiT-XL/2 program's XLA temporaries were 1.60 GiB at 4 rows (the smoke) and 12.82 GiB at 32 rows (the
  config's stats batch), 0.37 and 2.58 GiB with the probes (0.12 and 0.77 GiB without gradients)."""
  del probe
  return out


def _tap_fwd(out: jax.Array, probe: jax.Array) -> tuple[jax.Array, None]:
  del probe
  return out, None


def _tap_bwd(_, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  g32 = g.astype(jnp.float32)
  return g, jnp.sum(jnp.square(g32).reshape(-1, g.shape[-1]), axis=0)  # [out_features]


_tap.defvjp(_tap_fwd, _tap_bwd)


def scannable(model, targets: dict[str, int]) -> bool:
  """Whether the statistics of `targets` can run on the scanned DiT (`model.scan_blocks`): its one compiled block
  program records every block, so the block layers among the targets must be the same in every block (same d).
  Otherwise the unrolled model runs, where XLA also drops the blocks after the last target."""
  depth = getattr(model, 'depth', 0)
  if not getattr(model, 'scan_blocks', False) or depth < 1:
    return False
  per_block: dict[str, set[tuple[int, int]]] = {}
  for name, d in targets.items():
    head, _, rest = name.partition('/')
    if head.startswith('blocks_'):
      per_block.setdefault(rest, set()).add((int(head[len('blocks_') :]), d))
  return all(
    {b for b, _ in found} == set(range(depth)) and len({d for _, d in found}) == 1 for found in per_block.values()
  )


def _per_layer(tree: dict, leaf_name: str) -> dict[str, Any]:
  """{module path: value} of a sown or perturbed collection; a scanned model's [depth, ...] leaves under
  `blocks` become blocks_0 ... blocks_{depth-1} (models/scan.py)."""
  from dpq_jax.models import scan as scan_lib

  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(scan_lib.unstack_blocks(tree)):
    keys = [getattr(k, 'key', getattr(k, 'idx', None)) for k in path]
    i = keys.index(leaf_name)
    out['/'.join(keys[:i])] = leaf
  return out


def _moment_sums(
  model, targets: dict[str, int], gradients: bool, guidance: float = 0.0, conditioning_only: bool = False
) -> Callable:
  """fn(params, x, t, y, noise) -> ({name: (sum over tokens of x_j x_j^T [M, d, d], tokens)}, {name: sum over
  tokens of (dL/dy_r)^2 [out_features]} or {}) of the target layers, L the summed squared error of the predicted
  noise (the DDPM loss's mse term). One program for all layers; on the scanned DiT (`scannable`; params stacked)
  one compiled block records every block, its sums leaving the scan stacked.

  guidance s > 0: the batch is [conditional; null-label] halves on the same noisy inputs (noisy_batches), and
  the guided input x_u + s (x_c - x_u) of every token pair joins x_c and x_u in the sums. A weight error dW
  changes the guided output by dW^T (x_u + s (x_c - x_u)): the class signal of guided sampling lies in the
  small difference x_c - x_u, which the moments of x_c and x_u alone weigh by its own (small) energy.

  conditioning_only: record only the layers fed one row per sample ([batch, features] inputs: adaLN_modulation,
  the embedders' MLPs), whose inputs depend on (t, y) alone; on the unrolled model XLA then drops the image path."""
  import flax.linen as nn

  from dpq_jax.models import scan as scan_lib

  tokens: dict[str, float] = {}  # static per layer (shapes), the same in every block: keyed by `in_block`

  def in_block(name: str) -> str:  # 'blocks_3/attn/qkv' -> 'blocks/attn/qkv'
    head, sep, rest = name.partition('/')
    return f'{scan_lib.STACKED}{sep}{rest}' if head.startswith('blocks_') else name

  def record(next_fun, args, kwargs, context):
    key = scan_lib.rule_path('/'.join(context.module.path))  # a scanned block's layers as blocks_0's
    if context.method_name != '__call__' or key not in targets or (conditioning_only and args[0].ndim != 2):
      return next_fun(*args, **kwargs)
    inputs = args[0].astype(jnp.float32)  # [batch, ..., in_features]
    if guidance:
      cond, null = jnp.split(inputs, 2, axis=0)
      inputs = jnp.concatenate([inputs, null + guidance * (cond - null)], axis=0)
    inputs = inputs.reshape(-1, inputs.shape[-1])  # [tokens, in_features]
    xs = inputs.reshape(inputs.shape[0], -1, targets[key])  # [tokens, M, d]
    context.module.sow(_SOWN, 'moments', jnp.einsum('tmd,tme->mde', xs, xs, precision=jax.lax.Precision.HIGHEST))
    tokens[in_block(key)] = float(inputs.shape[0])
    out = next_fun(*args, **kwargs)
    if not gradients:
      return out
    probe = context.module.perturb('outputs', jnp.zeros(out.shape[-1:], jnp.float32))  # the variable, or zeros
    return _tap(out, probe)

  def forward(params, perturbations, x, t, y):
    variables = {'params': params} if perturbations is None else {'params': params, _PERTURBED: perturbations}
    with nn.intercept_methods(record):  # runs while tracing: the sums leave the jit as outputs
      out, state = model.apply(variables, x, t, y, mutable=[_SOWN])
    sums = _per_layer(state[_SOWN], 'moments')  # {name: sum [M, d, d]}
    return out, {name: (value, jnp.float32(tokens[in_block(name)])) for name, value in sums.items()}

  def fn(params: dict, x: jax.Array, t: jax.Array, y: jax.Array, noise: jax.Array):
    if not gradients:
      return forward(params, None, x, t, y)[1], {}

    def shapes():
      with nn.intercept_methods(record):
        return model.apply({'params': params}, x, t, y, mutable=[_SOWN, _PERTURBED])[1][_PERTURBED]

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(shapes))

    def loss(perturbations):
      out, found = forward(params, perturbations, x, t, y)
      eps = out[..., : noise.shape[-1]].astype(jnp.float32)
      return jnp.sum(jnp.square(eps - noise)), found

    grads, found = jax.grad(loss, has_aux=True)(zeros)  # each probe's gradient: sum over tokens of g^2 (_tap)
    return found, _per_layer(grads, 'outputs')

  return fn


def conditioning_batch(num: int, input_shape: tuple[int, ...], num_classes: int, seed: int, num_timesteps: int = 1000):
  """A batch for the layers fed by (t, y) alone (`_moment_sums`' conditioning_only): `num` pairs of a timestep
  (jittered strata tiling [0, num_timesteps)) and a uniform class, then the same timesteps with the null label
  num_classes, as noisy_batches orders them; x and noise are zeros (the image path does not reach these layers)."""
  rng = np.random.default_rng([seed, 1])
  t = np.floor((np.arange(num) + rng.random(num)) * num_timesteps / num).astype(np.int32)
  y = rng.integers(0, num_classes, num).astype(np.int32)
  zeros = np.zeros((2 * num,) + tuple(input_shape), np.float32)
  return {
    'x': zeros,
    't': np.concatenate([t, t]),
    'y': np.concatenate([y, np.full_like(y, num_classes)]),
    'noise': zeros,
  }


def input_moments(
  model, params: dict, targets: dict[str, int], batches: Iterator[dict[str, np.ndarray]], num_batches: int,
  mesh: jax.sharding.Mesh | None = None, progress: bool = True, gradients: bool = False, guidance: float = 0.0,
  conditions: int = 0, seed: int = 0,
) -> dict[str, np.ndarray]:  # fmt: skip
  """Mean input second moments {name: [num_subvectors, d, d] float32} of the target layers {module path: d}; with
  `gradients` also {GRAD_PREFIX + name: [out_features]}: the squared gradient of the noise-prediction error with
  respect to each output channel, summed over the layer's tokens and averaged over batches (a diagonal Fisher
  of the layer's outputs: how much the loss cares about each channel; `split` separates the two). guidance > 0:
  the moments include each token pair's guided input (`_moment_sums`; batches from noisy_batches).

  Sums of one batch are float32 on device (HIGHEST matmul precision), accumulated over batches in float64 on
  the host. With a mesh the batch is split over its devices and XLA sums across them; the result does not
  depend on the device count beyond float32 summation order. A DiT with `scan_blocks` runs scanned where
  `scannable` (one compiled block instead of depth; params stacked here; rematerialised blocks with `gradients`),
  else unrolled.

  conditions > 0: the layers fed one row per sample (adaLN_modulation: silu of the timestep + class embedding)
  see only stats_batches x 2B rows in the batches, while their inputs cost nothing without the image path: their
  moments also sum `conditions` (t, y) pairs of `conditioning_batch` (seed `seed`), each with the null label and
  the guided row, in one extra pass of the unrolled model from which XLA drops everything else.
  """
  unrolled_model, per_block_params = model.clone(scan_blocks=False) if hasattr(model, 'scan_blocks') else model, params
  if scannable(model, targets):
    from dpq_jax.models import scan as scan_lib

    params = scan_lib.stack_blocks(params, model.depth)
    if gradients:  # the backward pass keeps one block's activations at a time (DiT-XL/2 at 32 inputs: ~25 GB all)
      model = model.clone(remat=True)
  elif getattr(model, 'scan_blocks', False):
    model = model.clone(scan_blocks=False)
  fn = _moment_sums(model, targets, gradients, guidance)
  if mesh is None:
    jitted = jax.jit(fn)
    place = jnp.asarray
  else:
    from dpq_jax.calibrate import sharding

    batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    jitted = jax.jit(fn, in_shardings=(rep,) + (batch_sh,) * 4, out_shardings=rep)

    def place(x):
      return jax.make_array_from_callback(x.shape, batch_sh, lambda index: x[index])

    params = jax.device_put(params, rep)
  sums: dict[str, np.ndarray] = {}
  tokens: dict[str, float] = {}
  grad2: dict[str, np.ndarray] = {}
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=num_batches, desc='input statistics', unit='batch')
  batches_seen = 0
  for batch in batches:
    out, g2 = jitted(params, *(place(batch[k]) for k in ('x', 't', 'y', 'noise')))
    for name, (total, count) in out.items():
      sums[name] = sums.get(name, 0.0) + np.asarray(total, np.float64)
      tokens[name] = tokens.get(name, 0.0) + float(count)
    for name, g in g2.items():
      grad2[name] = grad2.get(name, 0.0) + np.asarray(g, np.float64)
    batches_seen += 1
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  if conditions:
    shape = (unrolled_model.input_size, unrolled_model.input_size, unrolled_model.in_channels)
    batch = conditioning_batch(conditions, shape, unrolled_model.num_classes, seed)
    cond_fn = jax.jit(_moment_sums(unrolled_model, targets, False, guidance, conditioning_only=True))
    out, _ = cond_fn(per_block_params, *(jnp.asarray(batch[k]) for k in ('x', 't', 'y', 'noise')))
    for name, (total, count) in out.items():
      sums[name] = sums.get(name, 0.0) + np.asarray(total, np.float64)
      tokens[name] = tokens.get(name, 0.0) + float(count)
  missing = sorted(set(targets) - set(sums))
  if missing:
    raise ValueError(f'input_moments: layers {missing[:3]} never ran in the model')
  out = {name: (sums[name] / tokens[name]).astype(np.float32) for name in sorted(sums)}
  out.update({GRAD_PREFIX + name: (g / batches_seen).astype(np.float32) for name, g in sorted(grad2.items())})
  return out


def split(stats: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(moments {layer: [M, d, d]}, output-gradient energies {layer: [out_features]}) of `input_moments`' dict."""
  moments = {k: v for k, v in stats.items() if not k.startswith(GRAD_PREFIX)}
  grad2 = {k[len(GRAD_PREFIX) :]: v for k, v in stats.items() if k.startswith(GRAD_PREFIX)}
  return moments, grad2


@dataclasses.dataclass
class _Shared:
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
  digest: str = ''  # the key `stats` was collected under
  stats: dict[str, np.ndarray] | None = None


_shared: dict[str, _Shared] | None = None  # by the digest of the key asked for, while `shared()` is entered
_shared_lock = threading.Lock()


@contextlib.contextmanager
def shared() -> Iterator[None]:
  """Within it, the statistics `load_or_collect` collects or reads stay in memory and serve every later call for
  the same key in this process, from any workdir and any thread; a thread asking for a key another thread is
  collecting waits for it. The compare stage's rows quantize one model on one data set, so the rows with the same
  statistics settings (the demo: every row with error feedback) collect them once. Each workdir still gets its
  DIR/stats/ file. The arrays are read-only."""
  global _shared
  with _shared_lock:
    outer = _shared
    if outer is None:
      _shared = {}
  try:
    yield
  finally:
    with _shared_lock:
      _shared = outer


def load_or_collect(
  workdir: str, keys: list[dict[str, Any]], collect: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
  """DIR/stats/input_moments.npz when it was written for one of `keys` (JSON-able dicts of everything that
  decides the statistics; any of them serves), else `collect()` (what the last key describes), written there
  under the last key (process 0, atomically) and returned; within `shared()` first what this process already
  holds for one of the keys."""
  digests = [hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24] for key in keys]
  path = os.path.join(workdir, STATS_DIR, MOMENTS_FILE)
  share = _shared
  if share is None:
    return _load_or_collect(path, digests, collect)[1]
  with _shared_lock:
    entry = share.setdefault(digests[-1], _Shared())
  with entry.lock:
    held = next((share[d] for d in digests if d in share and share[d].stats is not None), None)
    if held is None:
      entry.digest, stats = _load_or_collect(path, digests, collect)
      for value in stats.values():
        value.setflags(write=False)
      entry.stats, held = stats, entry
    elif _key_of(path) != held.digest:
      _write(path, held.digest, held.stats)
  return dict(held.stats)


def _key_of(path: str) -> str | None:
  """The key digest DIR/stats/input_moments.npz was written under, or None where there is none."""
  from dpq_jax import io_utils

  if not io_utils.exists(path):
    return None
  with io_utils.load_npz(path) as f:
    return str(f['__key__'])


def _write(path: str, digest: str, stats: dict[str, np.ndarray]) -> None:
  from dpq_jax import distributed, io_utils

  if distributed.is_writer():
    io_utils.makedirs(os.path.dirname(path))
    io_utils.write_npz(path, __key__=np.asarray(digest), **stats)


def _load_or_collect(
  path: str, digests: list[str], collect: Callable[[], dict[str, np.ndarray]]
) -> tuple[str, dict[str, np.ndarray]]:
  """(the digest the statistics are kept under, the statistics) of `load_or_collect` without `shared()`."""
  from dpq_jax import io_utils

  key = _key_of(path)
  if key in digests:
    with io_utils.load_npz(path) as f:
      return key, {name: np.asarray(f[name]) for name in f.files if name != '__key__'}
  stats = collect()
  _write(path, digests[-1], stats)
  return digests[-1], stats
