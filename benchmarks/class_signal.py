"""Where a quantized digits model loses the class: the guidance signal and the cross-position output error.

  python -m benchmarks.class_signal --workdir DIR [--rows a,b,...]

DIR is a finished demo workdir (`python -m dpq_jax.main --workdir=DIR`): its cached trained model (DIR/train)
and the rows' artifacts (DIR/rows/<name>/quantized). Two tables:

1. The class signal guided sampling amplifies, delta = eps(x_t, t, y) - eps(x_t, t, null), on the demo's fixed
   noisy held-out digits (t spread over 0..999): relative error of each row's delta against fp's and its gain
   <delta_q, delta_fp> / |delta_fp|^2, over all t and at t >= 750 (where the digit's class is decided).
2. Per adaLN layer, the relative output error on the class difference x_c - x_u of its inputs (silu of the
   timestep + class embedding with the label and with the null label), with every cross term between sub-vector
   positions (E^T H E with the full H) and as the per-position metric sees it (H's diagonal d x d blocks only).
"""

from __future__ import annotations

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from dpq_jax import diffusion, tree_utils
from dpq_jax.configs import digits
from dpq_jax.demo import metrics as demo_metrics
from dpq_jax.quant import storage
from dpq_jax.stages import REGISTRY, Job

ADALN = r'blocks_\d+/adaLN_modulation$'
LATE_T = 750


def _adaln_inputs(model, params: dict, x, t, y) -> dict[str, jax.Array]:
  found = {}

  def record(next_fun, args, kwargs, context):
    name = '/'.join(context.module.path)
    if context.method_name == '__call__' and re.search(ADALN, name):
      found[name] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({'params': params}, x, t, y)
  return found


def main() -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--workdir', required=True, help='a finished demo workdir')
  parser.add_argument('--rows', default='', help='comma-separated rows (default: every row with an artifact)')
  parser.add_argument('--d', type=_common.integer(1), default=8, help='sub-vector length of the per-position blocks')
  args = parser.parse_args()
  rows_dir = os.path.join(args.workdir, 'rows')
  rows = [r for r in args.rows.split(',') if r] or sorted(os.listdir(rows_dir))
  rows = [r for r in rows if os.path.isdir(os.path.join(rows_dir, r, storage.ARTIFACT_DIR))]
  config = digits.get_config()
  config.stages = ('train',)
  job = REGISTRY['train'].run(config, args.workdir, Job.start(config))  # the cached model (never retrains it)
  model = job.runtime(config)[0].clone(scan_blocks=False)
  data, fp = job.data, job.fp_params
  x, t, y = demo_metrics.fixed_noisy_inputs(data['heldout_images'], data['heldout_labels'], config.seed)
  null = jnp.full_like(y, config.model.num_classes)
  eps = jax.jit(lambda p, labels: model.apply({'params': p}, x, t, labels)[..., : x.shape[-1]])
  late = np.asarray(t) >= LATE_T

  def delta(params):
    return np.asarray(eps(params, y), np.float64) - np.asarray(eps(params, null), np.float64)

  def err_gain(dq, dfp):
    return np.sqrt(np.sum((dq - dfp) ** 2) / np.sum(dfp**2)), np.sum(dq * dfp) / np.sum(dfp**2)

  # adaLN inputs for the stats' kind of (t, y): 200 training digits at random timesteps, label and null
  rng = np.random.default_rng(0)
  pick = rng.choice(len(data['train_labels']), 200, replace=False)
  ts = jnp.asarray(rng.integers(0, 1000, 200), jnp.int32)
  xs = diffusion.create_diffusion('').q_sample(jnp.asarray(data['train_images'][pick]), ts,
                                               jax.random.normal(jax.random.key(1), data['train_images'][pick].shape))  # fmt: skip
  inputs = jax.jit(lambda labels: _adaln_inputs(model, fp, xs, ts, labels))
  cond, uncond = inputs(jnp.asarray(data['train_labels'][pick], jnp.int32)), inputs(jnp.full((200,), 10, jnp.int32))

  dfp = delta(fp)
  table1, table2 = [], []
  for name in rows:
    _, q = storage.load(os.path.join(rows_dir, name, storage.ARTIFACT_DIR))
    dense = q.dense_params()
    dq = delta(dense)
    (e_all, g_all), (e_late, g_late) = err_gain(dq, dfp), err_gain(dq[late], dfp[late])
    table1.append([name, f'{e_all:.3f}', f'{g_all:.3f}', f'{e_late:.3f}', f'{g_late:.3f}'])
    for layer in sorted(cond):
      keys = layer.split('/') + ['kernel']
      w = np.asarray(tree_utils.get_path(fp, keys), np.float64)
      e = np.asarray(tree_utils.get_path(dense, keys), np.float64) - w
      diff = np.asarray(cond[layer] - uncond[layer], np.float64)  # [n, in]
      signal = np.sum((diff @ w) ** 2)
      full = np.sum((diff @ e) ** 2) / signal
      per_position = np.sum(np.einsum('nmd,mdo->mno', diff.reshape(len(diff), -1, args.d),
                                      e.reshape(-1, args.d, e.shape[1])) ** 2) / signal  # fmt: skip
      table2.append([name, layer, f'{full:.3f}', f'{per_position:.3f}', f'{full / max(per_position, 1e-30):.1f}'])
  _common.print_header(['row', 'delta rel. error', 'delta gain', f'rel. error t>={LATE_T}', f'gain t>={LATE_T}'])
  print('\n'.join('| ' + ' | '.join(r) + ' |' for r in table1) + '\n')
  _common.print_header(['row', 'layer', 'class-difference error (full H)', 'per-position blocks', 'ratio'])
  print('\n'.join('| ' + ' | '.join(r) + ' |' for r in table2))


if __name__ == '__main__':
  main()
