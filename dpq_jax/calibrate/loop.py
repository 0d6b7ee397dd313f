"""The calibration loop: state setup on the mesh, resume ladder, steps, logging, checkpoints.

Resume ladder (as big_vision's train.py):
  1. DIR/checkpoints has a finished step  -> restore state and the data iterator from it;
  2. otherwise                            -> fresh state from the quantized model.
A checkpoint that cannot be restored raises CheckpointError: it never silently starts over.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dpq_jax import distributed, errors, io_utils
from dpq_jax.calibrate import checkpoint as ckpt_lib
from dpq_jax.calibrate import data as data_lib
from dpq_jax.calibrate import events as events_lib
from dpq_jax.calibrate import sharding
from dpq_jax.calibrate import train_step as step_lib
from dpq_jax.calibrate import trainable as trainable_lib
from dpq_jax.models import scan as scan_lib
from dpq_jax.quant import codebook_values, qweight

CHECKPOINT_DIR = 'checkpoints'
# (steps, fn(step, params, quant)): `calibrate` hands fn the model as it stands after each of those steps.
Probe = tuple[tuple[int, ...], Callable[[int, dict, dict], None]]
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'  # event files (calibrate/events.py, tensorboardX's protos: no TensorFlow needed)


def check_finite_loss(rows: list[dict], lr: float) -> None:
  """NonFiniteError naming the first step of `rows` ({'step', 'loss', ...}) whose loss is not finite."""
  bad = [r['step'] for r in rows if not math.isfinite(r['loss'])]
  if bad:
    raise errors.NonFiniteError(
      f'calibration loss is not finite at step {bad[0]} (steps {rows[0]["step"]}..{rows[-1]["step"]}); '
      f'try a lower config.calibrate.lr than {lr}'
    )


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def check_finite(pending: list[tuple[int, dict]], state: Any, lr: float) -> None:
  """Before a checkpoint: the losses of the steps not yet logged (`pending` (step, metrics)) and the state after
  the last of them are finite (an update can turn the state NaN while its own loss was finite), else
  NonFiniteError; the checkpoints written so far stay the last good ones."""
  if pending:
    check_finite_loss([{'step': s, 'loss': float(jax.device_get(m['loss']))} for s, m in pending], lr)
  if not bool(_all_finite(state)):
    step = pending[-1][0] if pending else '?'
    raise errors.NonFiniteError(
      f'calibration state is not finite after step {step} (its loss was finite); not checkpointed; '
      f'try a lower config.calibrate.lr than {lr}'
    )


def _host(state: dict) -> tuple[dict, dict]:
  """(params, quant) of the train state (trainable params, mutable quant) or of the frozen trees (frozen params,
  latent weights and metrics) on the host, per block."""
  return (
    scan_lib.unstack_blocks(distributed.to_host(state['params'])),
    scan_lib.unstack_blocks(distributed.to_host(state['quant'])),
  )


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _finish(closers: list[Callable[[], None]], failed: bool) -> None:
  """Calls every closer (the progress bar, the checkpointer's wait for the save in flight and its close), each also
  when one before it failed: an unfinished orbax save must not be left to interpreter shutdown. Their first error
  is raised, unless the loop itself `failed`: its own error is the one to show (a full disk fails closers too)."""
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:
      first = first or e
  if first is not None and not failed:
    raise first


def _rewrite_metrics(path: str, upto: int) -> None:
  """Keeps the metric lines of steps <= upto (a resumed run re-logs the steps after its checkpoint)."""
  if not io_utils.exists(path):
    return
  lines = [ln + '\n' for ln in io_utils.read_text(path).splitlines() if ln.strip() and json.loads(ln)['step'] <= upto]
  io_utils.write_text(path, ''.join(lines))


def calibrate(
  *,
  dynamic_model: nn.Module,
  frozen_model: nn.Module,
  params: dict,
  quant: dict,
  fp_params: dict,
  source: data_lib.ArraySource,
  cfg: ml_collections.ConfigDict,
  num_classes: int,
  workdir: str,
  seed: int = 0,
  fp_model: nn.Module | None = None,
  diffusion=None,
  codebook_dtype: Any = jnp.float32,
  progress: bool = True,
  fingerprint: str | None = None,
  metrics: dict | None = None,
  latents: dict | None = None,
  probe: Probe | None = None,
) -> dict[str, Any]:
  """Runs config.calibrate `cfg` on the quantized model (params, quant); resumes from workdir.

  metrics: {module path: whitening factors [num_subvectors, d, d]}: the dynamic assignment's metric
  (train_step.attach_latent), as quantize fitted in; None: Euclidean.
  latents: {module path: [in_features, out_features]} the dynamic assignment's latent weight where it is not taken
  from fp_params: fed-back targets (config.calibrate.assign_target='feedback'), or the fp kernels a caller lends
  the loop so that they are held once (stacked with the blocks) instead of beside the stacked copy. The loop takes
  them over: it empties the dict once they are in its own trees; out['latents'] gives them back per block.

  probe: (steps, fn): fn(step, params, quant) is called with the model as it stands after each of `steps` that this
  run passes through, exactly as it would be returned if calibration stopped there, and for step 0 with the model
  as given (the demo's calibration-budget curves); steps a resumed run starts after are not probed.

  fingerprint: what decided the model being calibrated and how (quant/lineage.py); kept inside each
  checkpoint, and a checkpoint written under another one, or none, is refused (CheckpointError), never resumed.

  Returns:
    {'params': calibrated params (no latent weights), 'quant': the `quant` collection with the
    final codes, 'history': logged metric rows, 'start_step': the step this run started at,
    'step_time_s': mean seconds per step after compilation, 'compile_s', 'num_trainable', 'unrolled_because':
    why a model with scan_blocks ran its blocks unrolled (the blocks' trees differ), or None, 'latents':
    {module path: latent weight [in_features, out_features]} of the dynamic assignment per block on the host, the
    values it was given (on CPU views of the loop's copy: nothing copied)}.

  Models with `scan_blocks` run the step on trees stacked per block (models/scan.py), checkpoints included;
  what goes in and comes out is per block.
  """
  from dpq_jax import diffusion as diffusion_lib

  diffusion = diffusion or diffusion_lib.create_diffusion()
  params_l, quant_l = step_lib.attach_latent(params, quant, fp_params, cfg.assignment, metrics, latents)
  if latents:
    latents.clear()  # taken over (see above): held by the loop's trees from here on
  mutable_q, constant_q = step_lib.split_quant(quant_l)
  trainable, frozen_params = trainable_lib.split_trainable(params_l, trainable_lib.trainable_patterns(cfg.trainable))
  num_trainable = trainable_lib.count(trainable)
  tx = trainable_lib.optimizer(cfg)
  mesh = sharding.make_mesh(tuple(tuple(a) for a in cfg.mesh))
  dp = sharding.data_parallel_size(mesh)
  if cfg.batch_size % dp:
    raise ValueError(f'config.calibrate.batch_size={cfg.batch_size} is not divisible by the data-parallel size {dp}')
  distill = cfg.distill_weight > 0
  parts = {'trainable': trainable, 'frozen': frozen_params, 'quant': mutable_q, 'constant': constant_q}
  if distill:
    parts['fp'] = fp_params
  # Scanned blocks: the jitted step holds every tree stacked (its checkpoints too); all else stays per block.
  unrolled_because = None
  if dynamic_model.scan_blocks:
    try:
      parts = {k: scan_lib.stack_blocks(v, dynamic_model.depth) for k, v in parts.items()}
    except ValueError as e:
      unrolled_because = str(e)
      dynamic_model, frozen_model = dynamic_model.clone(scan_blocks=False), frozen_model.clone(scan_blocks=False)
      fp_model = fp_model.clone(scan_blocks=False) if fp_model is not None else None
  loss_cfg = step_lib.LossConfig(num_classes, cfg.label_dropout, cfg.assign_every, cfg.distill_weight)
  step_fn = step_lib.make_train_step(
    dynamic_model, frozen_model, diffusion, tx, loss_cfg, fp_model if distill else None,
    trainable_lib.learning_rate(cfg),
  )  # fmt: skip
  state = step_lib.init_state(parts['trainable'], parts['quant'], tx, seed)
  frozen = {'params': parts['frozen'], 'quant': parts['constant'], 'fp': parts.get('fp', {})}
  # The per-block trees go: with stacked blocks the latent weights (DiT-XL/2: 2.35 GiB) are held once, in `frozen`;
  # `finish` reads them back from there.
  del parts, params_l, quant_l, mutable_q, constant_q, trainable, frozen_params
  jstep, state_sh, frozen_sh = step_lib.jit_step(step_fn, mesh, state, frozen)
  frozen = jax.device_put(frozen, frozen_sh)

  loader = data_lib.train_loader(source, cfg.batch_size // jax.process_count(), seed)
  iterator = iter(loader)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), cfg.checkpoint_every, cfg.keep)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  writer = distributed.is_writer()
  start = checkpointer.latest_step()
  if start is not None and fingerprint is not None:
    checkpointer.check_fingerprint(start, fingerprint)
  if start is not None:
    state, data_state, start = checkpointer.restore(_abstract(state, state_sh))
    try:
      iterator.set_state(data_state['iterator'].encode())
    except ValueError as e:
      raise errors.CheckpointError(
        f'checkpoint {start} in {checkpointer.directory} was written with other calibration data: {e}'
      ) from None
    if writer:
      _rewrite_metrics(metrics_path, start)
  else:
    state = jax.device_put(state, state_sh, may_alias=False)  # donated: never the caller's buffers
    start = 0
  history: list[dict[str, Any]] = []
  step = start

  def data_state() -> dict:
    return {'iterator': iterator.get_state().decode(), 'fingerprint': fingerprint}

  def finish(params_host: dict, quant_host: dict, frozen_host: tuple[dict, dict]) -> tuple[dict, dict]:
    """(params without latent weights, quant) of the model the state (its host copy `_host`) holds with the
    frozen trees (`_host(frozen)`): codebooks rounded to what the artifact stores and the codes refreshed against
    them."""
    fixed_params, constant = frozen_host
    quant_all = trainable_lib.merge(quant_host, constant)
    trained = _round_codebooks(trainable_lib.merge(params_host, fixed_params), quant_all, codebook_dtype)
    quant_out = step_lib.refresh_codes(trained, quant_all)
    quant_out = trainable_lib.pick(quant_host, jax.device_get(quant_out))
    params_out, _ = trainable_lib.split(trained, lambda path, _: not qweight.is_latent(path))
    return params_out, quant_out

  probe_steps, probe_fn = probe if probe is not None else ((), None)
  if probe_fn is not None and start == 0 and 0 in probe_steps:  # the model as given, before any step
    probe_fn(0, params, quant)
  board = (
    events_lib.EventWriter(os.path.join(workdir, TENSORBOARD_DIR), start + 1 if start else None) if writer else None
  )
  bar = None
  if progress and writer:
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc='calibrate', unit='step')
  # On CPU orbax's host copy of a state being saved is a view of the state's buffers (np.asarray): while that save is
  # in flight the next step cannot donate them and holds two states (DiT-XL/2: +0.8 GiB), so there it finishes first.
  finish_saves = mesh.devices.flat[0].platform == 'cpu'
  compile_s, timed_steps, timed_s = 0.0, 0, 0.0
  tick, tick_step = time.perf_counter(), step
  pending: list[tuple[int, dict]] = []
  failed = True
  try:
    with ckpt_lib.PreemptionGuard() as guard:
      while step < cfg.steps:
        batch = sharding.global_batch(next(iterator), mesh)
        if finish_saves and checkpointer.in_flight():
          checkpointer.wait()
        state, metrics = jstep(state, frozen, batch)
        step += 1
        if step == start + 1:  # the first step of a process includes compilation
          jax.block_until_ready(state)
          compile_s = time.perf_counter() - tick
          tick, tick_step = time.perf_counter(), step
        pending.append((step, metrics))
        if probe_fn is not None and step in probe_steps:
          probe_start = time.perf_counter()
          probe_fn(step, *finish(*_host(state), _host(frozen)))
          tick += time.perf_counter() - probe_start  # the probe's time is not a step's
        if step == cfg.steps or checkpointer.should_save(step):
          check_finite(pending, state, cfg.lr)  # no checkpoint holds a diverged state
        checkpointer.save(step, state, data_state(), force=step == cfg.steps)
        if bar is not None:
          bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
          rows = [{'step': s, **{k: float(v) for k, v in jax.device_get(m).items()}} for s, m in pending]
          now = time.perf_counter()
          if step > tick_step:
            timed_steps, timed_s = timed_steps + step - tick_step, timed_s + now - tick
          for row in rows:
            row['step_time_s'] = (now - tick) / max(step - tick_step, 1)
          tick, tick_step = now, step
          check_finite_loss(rows, cfg.lr)
          history += rows
          pending = []
          if writer:  # (on gs:// an append rewrites the object: it stays small, one line per logged step)
            io_utils.append_text(metrics_path, ''.join(json.dumps(r) + '\n' for r in rows))
            board.scalars(rows)
          if bar is not None:
            bar.set_postfix(loss=f'{rows[-1]["loss"]:.4f}', changed=f'{rows[-1]["changed"]:.3f}')
        if guard.requested():
          checkpointer.wait()
          if checkpointer.latest_step() != step:
            check_finite(pending, state, cfg.lr)
            checkpointer.save(step, state, data_state(), force=True)
            checkpointer.wait()
          name = 'SIGTERM' if guard.signum == 15 else f'signal {guard.signum}'
          print(f'calibrate: {name} at step {step}: checkpoint saved in {checkpointer.directory}; '
                'run the same command to resume', file=sys.stderr)  # fmt: skip
          raise ckpt_lib.Preempted(128 + (guard.signum or 15))
    failed = False
  finally:
    _finish(([bar.close] if bar is not None else []) + [checkpointer.wait, checkpointer.close], failed)

  host, frozen_host = _host(state), _host(frozen)
  del state, frozen
  params_out, quant_out = finish(*host, frozen_host)
  return {
    'params': params_out,
    'quant': quant_out,
    'history': history,
    'start_step': start,
    'steps': step,
    'compile_s': compile_s,
    'step_time_s': timed_s / timed_steps if timed_steps else None,
    'num_trainable': num_trainable,
    'unrolled_because': unrolled_because,
    'latents': _latents(frozen_host[1]),
  }


def _latents(constant_host: dict) -> dict[str, Any]:
  """{module path: latent weight} of the host copy of the constant `quant` tree (per block)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(constant_host):
    keys = [str(k.key) for k in path]
    if keys[-1] == qweight.LATENT:
      out['/'.join(keys[:-1])] = leaf
  return out


def check_checkpoints(workdir: str, fingerprint: str | None) -> None:
  """Before a job rewrites anything: CheckpointError if DIR/checkpoints' latest step is another calibration's."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if fingerprint is None or not io_utils.isdir(directory):
    return
  checkpointer = ckpt_lib.Checkpointer(directory, 1, 0, async_save=False)
  try:
    step = checkpointer.latest_step()
    if step is not None:
      checkpointer.check_fingerprint(step, fingerprint)
  finally:
    checkpointer.close()


def _round_codebooks(params: dict, quant: dict, dtype: Any) -> dict:
  """Codebooks and per-output-channel scales rounded to what the artifact stores (codebook_values:
  float16/bfloat16, or int8 codebooks with a per-codebook scale over the live rows of a compressed layer;
  scales in the side dtype), so the final codes are the argmin of what is stored and the model that goes
  on to sampling is the one on disk."""
  rounded = {
    name: w.replace(
      codebooks=codebook_values.round_codebooks(
        jnp.asarray(w.codebooks), dtype, None if w.alive is None else jnp.asarray(w.alive)
      ),
      scale=None if w.scale is None else codebook_values.round_side(w.scale, dtype),
    )
    for name, w in qweight.gather(params, quant).items()
  }
  return qweight.scatter(rounded, params, quant)[0]
