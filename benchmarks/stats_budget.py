r"""How few statistics the output objective needs on DiT-XL/2 shapes: output error vs the statistics' size.

  .venv/bin/python -m benchmarks.stats_budget                 # one block's 5 layers (block 1), then adaLN alone
  .venv/bin/python -m benchmarks.stats_budget --skip layers   # adaLN alone (seconds of statistics)

The heavy-tailed random DiT-XL/2 of benchmarks.quantize_xl (all 28 blocks; the statistics of block B's layers run
blocks 0..B, XLA drops the rest). Part `layers`: 16 data-free samples (2 DDIM steps) of the fp model; a reference
H from 16 batches of 2 x 16 noisy inputs (seed 1, guided rows at 1.5); each candidate H (seed 0: other noise,
timesteps and order) from fewer batches fits output-aware PQ K=256 d=8 (25 iterations) of the block's 5 layers, and
every fit is scored by its relative output error under the reference H (metric.rel_error), the weight objective's
fit too. Part `adaln`: the adaLN layer's input silu(t_emb + y_emb) depends on (t, y) alone, so its reference H
is a conditioning pass of 16384 (t, y) pairs (statistics.conditioning_batch, seed 9); candidates from the
batches alone or with `quant.stats_conditions` pairs.
"""

import time

import jax
import numpy as np

from benchmarks import _common
from dpq_jax.quant import metric, statistics, surgery

PARTS = ('layers', 'adaln')


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--block', type=_common.integer(0, 27), default=1)
  parser.add_argument('--skip', choices=PARTS, action='append', default=[])
  args = parser.parse_args(argv)

  from dpq_jax.calibrate import data as data_lib
  from dpq_jax.models import dit

  params = _common.heavy_tailed_params('DiT-XL/2', 32, 0, device=True)
  model = dit.create_model('DiT-XL/2', input_size=32, num_classes=1000)
  kernels = {'/'.join(path): k for path, k in surgery.module_kernels(params)}
  print(f'\n{_common.platform()}; DiT-XL/2 heavy-tailed, PQ K=256 d=8, 25 iterations, block {args.block}')

  def moments(rules, batches, num, conditions=0, seed=0):
    start = time.perf_counter()
    targets = surgery.subvector_dims(params, rules, 'pq')
    out = statistics.input_moments(
      model, params, targets, batches, num, progress=False, guidance=1.5, conditions=conditions, seed=seed
    )
    return out, time.perf_counter() - start

  def errors(rules, h, ref):
    q = surgery.quantize_params(params, rules, jax.random.key(0), method='pq', iters=25, moments=h, progress=False)
    return {name: metric.rel_error(kernels[name], w.decode(), ref[name]) for name, w in q.pq.items()}

  if 'layers' not in args.skip:
    rules = surgery.default_rules(
      'pq', 256, 8, (), rf'blocks_{args.block}/(attn/(qkv|proj)|mlp/(fc1|fc2)|adaLN_modulation)'
    )
    latents, labels = data_lib.sample_data_free(model, params, 16, 2, 0, batch_size=16, progress=False)

    def batches(nb, bs, seed):
      return statistics.noisy_batches(latents, labels, nb, bs, 1000, seed), nb

    ref, _ = moments(rules, *batches(16, 16, 1))
    names = sorted(ref)
    _common.print_header(['H from', 'stats s', 'mean rel. output error'] + [n.split('/')[-1] for n in names])
    for label, setting in [('reference (16 x 16)', None), ('8 x 16', (8, 16)), ('2 x 16', (2, 16)),
                           ('1 x 16', (1, 16)), ('1 x 8', (1, 8)), ('weight objective', 'weight')]:  # fmt: skip
      h, seconds = (
        (ref, 0.0) if setting is None else (None, 0.0) if setting == 'weight' else moments(rules, *batches(*setting, 0))
      )
      e = errors(rules, h, ref)
      print(
        f'| {label} | {seconds:.1f} | {np.mean(list(e.values())):.4f} | '
        + ' | '.join(f'{e[n]:.4f}' for n in names)
        + ' |'
      )

  if 'adaln' not in args.skip:
    name = f'blocks_{args.block}/adaLN_modulation'
    rules = surgery.default_rules('pq', 256, 8, (), name)
    ref, seconds = moments(rules, iter([]), 0, conditions=16384, seed=9)
    print(f'\nadaLN reference: 16384 conditioning pairs in {seconds:.1f} s')
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((16, 32, 32, 4)).astype(np.float32)  # adaLN never sees them
    labels = rng.integers(0, 1000, 16).astype(np.int32)
    _common.print_header(['H from', 'stats s', 'adaLN rel. output error'])
    for nb, bs, cond in ((8, 16, 0), (2, 16, 0), (1, 16, 0), (1, 8, 0), (1, 16, 1024), (1, 8, 1024), (2, 16, 1024)):
      batches = statistics.noisy_batches(latents, labels, nb, bs, 1000, 0)
      h, seconds = moments(rules, batches, nb, conditions=cond)
      print(f'| {nb} x {bs} + {cond} pairs | {seconds:.1f} | {errors(rules, h, ref)[name]:.4f} |')
    print(f'| reference itself | - | {errors(rules, ref, ref)[name]:.4f} |')


if __name__ == '__main__':
  main()
