r"""Codebook compression on DiT-XL/2 block shapes: equal-bytes quality, and the cost of the full model.

  .venv/bin/python -m benchmarks.compress_budget                      # (a) on 1 block, (b) on 4 blocks
  .venv/bin/python -m benchmarks.compress_budget --blocks 2 --iters 10 --xl-blocks 28
  .venv/bin/python -m benchmarks.compress_budget --model runs/digits/train/model --skip b   # trained weights
  .venv/bin/python -m benchmarks.compress_budget --model runs/digits/train/model --skip b --codebook-dtype int8

(a) Weights: random with realistic heavy tails (student-t df=4 x 0.02, benchmarks/_common.py),
the 5 linear layers of --blocks DiT-XL/2 blocks. At EQUAL bytes of codes + codebooks (fp16 unless
--codebook-dtype, packed as on disk): PQ K=256/d=8 compressed (dpq_jax.quant.compress, usage importance, merge, 2 Lloyd steps) to the
bytes of PQ K=16/d=4, and to the bytes of VQ K=256/d=8 (one codebook per layer), against those two. All
k-means: ours, --iters Lloyd iterations. The MSE ratio column is each row's error over the compressed
row's error at the same bytes.
With --model DIR (a converted model, e.g. the demo's trained DiT in runs/digits/train/model), (a) runs on
that model's trained weights instead, adds VQ K=1024/d=8 (the bytes of the 24x budget) as a baseline, and
adds the layer output error: sum over layers of ||X (W - W_hat)||^2 / ||X W||^2, X each layer's inputs in
the full-precision model on noisy inputs (the 300 held-out digits at t spread over 0..999 for the digits
model; unit-normal latents otherwise): what the weights' error does to the activations the layer sees.
--codebook-dtype stores every row's codebook values (baselines included) as float16 (default), bfloat16,
float32 or int8 (one float16 scale per codebook; channel scales stay float16), as config.quant.codebook_dtype.
(b) Time and peak memory of compressing --xl-blocks blocks of DiT-XL/2 (K=256/d=8 codebooks from one
assignment to random sub-vectors, which costs what k-means would not: only the compression is timed) to
24.1x vs fp32 of the blocks' kernels + biases, in a child process so its peak RSS is its own. When
--xl-blocks < 28 the 28-block figures are extrapolated linearly and labelled so.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from dpq_jax import convert, tree_utils
from dpq_jax.quant import allocation, codebook_values, equal_bytes, kmeans, surgery


def output_error(params: dict, q: surgery.QuantizedParams, inputs: dict[str, np.ndarray]) -> float:
  """sum_l ||X_l (W_l - W_hat_l)||^2 / sum_l ||X_l W_l||^2 over the quantized layers."""
  decoded = q.dense_params()
  num = den = 0.0
  for row in q.rows:
    path = row['name'].split('/')
    w, w_hat = tree_utils.get_path(params, path), tree_utils.get_path(decoded, path)
    x = jnp.asarray(inputs[row['name']])
    ref = x @ jnp.asarray(w['kernel'])
    num += float(jnp.sum(jnp.square(ref - x @ jnp.asarray(w_hat['kernel']))))
    den += float(jnp.sum(jnp.square(ref)))
  return num / den


def part_a(args) -> None:
  baselines = equal_bytes.BASELINES
  inputs = None
  if args.model:
    _, params = convert.load_converted(args.model)
    params = jax.tree.map(np.asarray, params)
    baselines += (('vq-k1024-d8', 'vq', 1024, 8),)
    inputs = _common.layer_inputs(args.model, params, args.seed)
    what = f'the trained model in {args.model}'
  else:
    params = _common.block_params(args.blocks, args.seed)
    what = f'{args.blocks} DiT-XL/2 block(s)'
  rows, models = equal_bytes.equal_bytes_rows(
    params,
    jax.random.key(args.seed),
    baselines=baselines,
    iters=args.iters,
    codebook_dtype=args.codebook_dtype,
    progress=False,
  )
  by_name = {r['name']: r for r in rows}
  weights = sum(int(np.prod(r['shape'])) for r in models[rows[0]['name']].rows)
  print(
    f'## (a) Equal bytes: {what}, {weights} quantized weights, {args.iters} Lloyd iterations, '
    f'{args.codebook_dtype} codebooks\n'
  )
  out_col = inputs is not None
  _common.print_header(['method', 'bytes (codes+codebooks)', 'eff. bits/weight', 'index bits/weight', 'x vs fp32',
                        'weight rel MSE', 'MSE / compressed@same bytes', *(['layer output rel error'] if out_col else []),
                        'seconds'])  # fmt: skip
  pairs = {name: f'pq-k256-d8-compressed@{name}' for name, *_ in baselines}
  for r in rows:
    if out_col:
      r['output_rel_error'] = output_error(params, models[r['name']], inputs)
    same_bytes = pairs.get(r['name'], r['name'] if '@' in r['name'] else None)
    ratio = f'{r["weight_rel_mse"] / by_name[same_bytes]["weight_rel_mse"]:.3f}' if same_bytes else '-'
    out = f' {r["output_rel_error"]:.4f} |' if out_col else ''
    print(f'| {r["name"]} | {r["bytes"]} | {r["effective_bits_per_weight"]:.4f} | {r["index_bits_per_weight"]:.4f} | '
          f'{r["compression_ratio"]:.2f} | {r["weight_rel_mse"]:.4f} | {ratio} |{out} {r["seconds"]:.1f} |')  # fmt: skip
  for base, comp in pairs.items():
    b, c = by_name[base], by_name[comp]
    winner = comp if c['weight_rel_mse'] < b['weight_rel_mse'] else base
    line = (
      f'\nAt {c["bytes"]} <= {b["bytes"]} bytes: {winner} wins on weights; {base} rel MSE '
      f'{b["weight_rel_mse"]:.4f} vs {comp} {c["weight_rel_mse"]:.4f} ({b["weight_rel_mse"] / c["weight_rel_mse"]:.2f}x)'
    )
    if out_col:
      winner = comp if c['output_rel_error'] < b['output_rel_error'] else base
      line += (
        f'; {winner} wins on layer outputs ({b["output_rel_error"]:.4f} vs {c["output_rel_error"]:.4f}, '
        f'{b["output_rel_error"] / c["output_rel_error"]:.2f}x)'
      )
    print(line + '.')


def compress_blocks(num_blocks: int, seed: int, codebook_dtype: str) -> tuple[int, int, float, int, int]:
  """(fp32 bytes, compressed bytes, seconds, peak RSS before, peak RSS after) of compressing the blocks to 24.1x."""
  params = _common.block_params(num_blocks, seed)
  lays = []
  key = jax.random.key(seed)
  for b in range(num_blocks):
    for i, name in enumerate(_common.DIT_XL_BLOCK_LAYERS):
      kernel = tree_utils.get_path(params, (f'blocks_{b}', *name.split('/'), 'kernel'))
      sub = jnp.asarray(kernel).reshape(kernel.shape[0] // 8, 8, -1).transpose(0, 2, 1)  # [M, C_out, 8]
      pick = jax.random.randint(jax.random.fold_in(key, 5 * b + i), (sub.shape[0], 256), 0, sub.shape[1])
      codebooks = codebook_values.round_codebooks(jnp.take_along_axis(sub, pick[..., None], axis=1), codebook_dtype)
      codes = kmeans.assign(sub, codebooks).astype(jnp.uint8)
      lays.append(allocation.Layer(f'blocks_{b}/{name}', np.asarray(codebooks), np.asarray(codes), kernel,
                                       bias_bytes=4 * kernel.shape[1]))  # fmt: skip
  del params
  fp32 = sum(4 * lay.reference.size + lay.bias_bytes for lay in lays)
  rss_before = _common.peak_rss_bytes()
  start = time.perf_counter()
  _, info = allocation.compress_layers(lays, int(fp32 / 24.1), lloyd_steps=2, codebook_dtype=codebook_dtype,
                                          progress=False)  # fmt: skip
  seconds = time.perf_counter() - start
  return fp32, info['predicted_bytes'], seconds, rss_before, _common.peak_rss_bytes()


def part_b(args) -> None:
  fp32, nbytes, seconds, rss_before, rss_peak = _common.in_child(
    compress_blocks, args.xl_blocks, args.seed, args.codebook_dtype
  )
  mib = 2**20
  print(
    f'\n## (b) Compressing {args.xl_blocks} DiT-XL/2 block(s) (K=256, d=8, {args.codebook_dtype} codebooks) to '
    f'24.1x, {os.cpu_count()} CPUs\n'
  )
  _common.print_header(['blocks', 'fp32 kernels+biases MiB', 'compressed MiB', 'x vs fp32', 'seconds',
                        'peak RSS MiB (before compress)'])  # fmt: skip
  print(f'| {args.xl_blocks} (measured) | {fp32 / mib:.1f} | {nbytes / mib:.2f} | {fp32 / nbytes:.2f} | {seconds:.1f} | '
        f'{rss_peak / mib:.0f} ({rss_before / mib:.0f}) |')  # fmt: skip
  if args.xl_blocks < 28:
    f = 28 / args.xl_blocks
    print(f'| 28 (extrapolated x{f:.1f}, linear) | {fp32 * f / mib:.1f} | {nbytes * f / mib:.2f} | {fp32 / nbytes:.2f} | '
          f'{seconds * f:.0f} | {rss_before / mib + (rss_peak - rss_before) * f / mib:.0f} |')  # fmt: skip


def main(argv=None) -> None:
  parser = _common.parser(__doc__)
  parser.add_argument(
    '--blocks', type=_common.integer(1, _common.DIT_XL_BLOCKS), default=1, help='DiT-XL/2 blocks for (a)'
  )
  parser.add_argument('--iters', type=_common.integer(0), default=25, help='Lloyd iterations of every k-means in (a)')
  parser.add_argument(
    '--xl-blocks',
    type=_common.integer(1, _common.DIT_XL_BLOCKS),
    default=4,
    help='blocks compressed in (b) (28: the whole model)',
  )
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--model', type=_common.converted_dir, help='converted model dir: (a) on its trained weights')
  parser.add_argument('--skip', default='', choices=('', 'a', 'b', 'ab'), help="'a' or 'b' to skip that part")
  parser.add_argument(
    '--codebook-dtype',
    default='float16',
    choices=codebook_values.DTYPES,
    help='how codebook values are stored (config.quant.codebook_dtype)',
  )
  args = parser.parse_args(argv)
  print(f'{_common.platform()}\n')
  if 'a' not in args.skip:
    part_a(args)
  if 'b' not in args.skip:
    part_b(args)


if __name__ == '__main__':
  main()
