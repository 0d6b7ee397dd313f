r"""Why a per-output-channel scale: the denoiser error of 1-bit PQ/VQ with each rescaling variant.

  .venv/bin/python -m benchmarks.channel_scale --model runs/digits/train/model

On the demo's trained DiT (a converted model dir from stage `train`), quantize the block layers with
1-bit PQ (K=16, d=4) and VQ (K=256, d=8) without a scale, then rescale the reconstruction W_hat:
  none       W_hat as k-means leaves it;
  codebook   per codebook, codewords stretched about the position's mean to the sub-vectors' spread
             (free: folded into the codewords);
  norm       per output channel, s_r = ||W_r|| / ||W_hat_r|| (quant.channel_scale: what the project uses);
  mean+norm  per output channel, mean and spread of W_r matched (two values per channel);
  lsq        per output channel, the least-squares s_r = <W_r, W_hat_r> / ||W_hat_r||^2.
Columns: the denoiser's relative error vs the fp model on the demo's fixed noisy held-out digits (as the
demo's eps_rel_error), and the mean over layers of <X W_hat, X W> / ||X W||^2 (1: no shrinkage) with X
each layer's fp inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from dpq_jax import convert
from dpq_jax.demo import digits, metrics
from dpq_jax.quant import pq, surgery

VARIANTS = ('none', 'codebook', 'norm', 'mean+norm', 'lsq')


def rescaled(w: np.ndarray, codebooks: np.ndarray, codes: np.ndarray, variant: str) -> np.ndarray:
  """W_hat [in, out] of one layer under a rescaling variant (w: the fp kernel)."""
  d = codebooks.shape[-1]
  w_hat = np.asarray(pq.decode(codebooks, codes))
  if variant == 'none':
    return w_hat
  if variant == 'codebook':
    sub = np.asarray(pq.to_subvectors(w, d))  # [M, out, d]
    cds = np.asarray(codes, np.int64)
    if codebooks.shape[0] == 1:
      sub, cds = sub.reshape(1, -1, d), cds.reshape(1, -1)
    hat = np.take_along_axis(codebooks, cds[..., None], 1)
    mu = sub.mean(1, keepdims=True)
    a = np.sqrt(((sub - mu) ** 2).sum((1, 2)) / np.maximum(((hat - mu) ** 2).sum((1, 2)), 1e-30))
    return np.asarray(pq.decode(mu + a[:, None, None] * (codebooks - mu), codes))
  if variant == 'norm':
    return w_hat * np.asarray(pq.channel_scale(w, w_hat, jnp.float32))
  if variant == 'lsq':
    return w_hat * ((w * w_hat).sum(0) / np.maximum((w_hat**2).sum(0), 1e-30))
  mw, mh = w.mean(0), w_hat.mean(0)  # mean+norm
  s = np.sqrt(((w - mw) ** 2).sum(0) / np.maximum(((w_hat - mh) ** 2).sum(0), 1e-30))
  return (w_hat - mh) * s + mw


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument(
    '--model',
    required=True,
    type=_common.converted_dir,
    help="the demo's converted model dir (runs/digits/train/model)",
  )
  parser.add_argument('--iters', type=_common.integer(0), default=25)
  args = parser.parse_args(argv)
  spec, params = convert.load_converted(args.model)
  if (spec.in_channels, spec.input_size) != (1, 8):
    parser.error(
      f'--model={args.model}: expected the digits demo model (8x8x1), got {spec.input_size}x{spec.in_channels}'
    )
  params = jax.tree.map(np.asarray, params)
  model = spec.create()
  data = digits.load(30, 0)
  x_t, t, y = metrics.fixed_noisy_inputs(data['heldout_images'], data['heldout_labels'], 0)
  eps = jax.jit(lambda p: model.apply({'params': p}, x_t, t, y)[..., :1])
  reference = eps(params)
  inputs = _common.layer_inputs(args.model, params, 0)
  print(f'jax {jax.__version__}, model {spec.name} from {args.model}\n')
  _common.print_header(['quantizer', *(f'{v}: eps err (shrink)' for v in VARIANTS)])
  for label, method, k, d in (('PQ K=16, d=4', 'pq', 16, 4), ('VQ K=256, d=8', 'vq', 256, 8)):
    rules = surgery.default_rules(method, k, d)
    q = surgery.quantize_params(params, rules, jax.random.key(0), method=method, iters=args.iters, progress=False)
    cells = []
    for variant in VARIANTS:
      dense = q.dense_params()
      shrink = []
      for row in q.rows:
        path = row['name'].split('/')
        node, ref_node, qw = dense, params, q.pq[row['name']]
        for part in path:
          node, ref_node = node[part], ref_node[part]
        w = np.asarray(ref_node['kernel'], np.float32)
        node['kernel'] = rescaled(w, np.asarray(qw.codebooks), np.asarray(qw.codes), variant)
        x = inputs[row['name']]
        out, ref = x @ node['kernel'], x @ w
        shrink.append(float((out * ref).sum() / (ref * ref).sum()))
      err = float(jnp.linalg.norm(eps(dense) - reference) / jnp.linalg.norm(reference))
      cells.append(f'{err:.3f} ({np.mean(shrink):.2f})')
    print(f'| {label} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  main()
