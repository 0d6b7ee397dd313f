r"""Codebook compression on DiT-XL/2 block shapes: equal-bytes quality, and the cost of the full model.

  .venv/bin/python benchmarks/compress_budget.py                      # (a) on 1 block, (b) on 4 blocks
  .venv/bin/python benchmarks/compress_budget.py --blocks 2 --iters 10 --xl-blocks 28
  .venv/bin/python benchmarks/compress_budget.py --model runs/digits/train/model --skip b   # trained weights
  .venv/bin/python benchmarks/compress_budget.py --model runs/digits/train/model --skip b --codebook-dtype int8

(a) Weights: random with realistic heavy tails (student-t df=4 x 0.02, as benchmarks/pq_vs_faiss.py),
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

import argparse
import multiprocessing
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dpq_jax import convert, diffusion  # noqa: E402
from dpq_jax.quant import allocation, codebook_values, equal_bytes, kmeans, surgery  # noqa: E402

LAYERS = {  # DiT-XL/2 block linear layers, (C_out, C_in) as in PyTorch
  'attn/qkv': (3456, 1152),
  'attn/proj': (1152, 1152),
  'mlp/fc1': (4608, 1152),
  'mlp/fc2': (1152, 4608),
  'adaLN_modulation': (6912, 1152),
}


def block_params(num_blocks: int, seed: int) -> dict:
  """Flax-layout params {'blocks_i': {...: {'kernel': [C_in, C_out], 'bias': [C_out]}}}, heavy-tailed."""
  rng = np.random.default_rng(seed)
  params: dict = {}
  for b in range(num_blocks):
    for name, (c_out, c_in) in LAYERS.items():
      node = params.setdefault(f'blocks_{b}', {})
      for part in name.split('/'):
        node = node.setdefault(part, {})
      node['kernel'] = (rng.standard_t(4, (c_in, c_out)) * 0.02).astype(np.float32)
      node['bias'] = np.zeros(c_out, np.float32)
  return params


def layer_inputs(model_dir: str, params: dict, seed: int) -> dict[str, np.ndarray]:
  """Inputs [tokens, C_in] of every Dense layer (by module path) in the fp model on noisy inputs."""
  from flax import linen as nn

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


def output_error(params: dict, q: surgery.QuantizedParams, inputs: dict[str, np.ndarray]) -> float:
  """sum_l ||X_l (W_l - W_hat_l)||^2 / sum_l ||X_l W_l||^2 over the quantized layers."""
  decoded = q.dense_params()
  num = den = 0.0
  for row in q.rows:
    path = row['name'].split('/')
    w, w_hat = params, decoded
    for part in path:
      w, w_hat = w[part], w_hat[part]
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
    inputs = layer_inputs(args.model, params, args.seed)
    what = f'the trained model in {args.model}'
  else:
    params = block_params(args.blocks, args.seed)
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
  print('| method | bytes (codes+codebooks) | eff. bits/weight | index bits/weight | x vs fp32 | weight rel MSE | '
        'MSE / compressed@same bytes |' + (' layer output rel error |' if out_col else '') + ' seconds |')  # fmt: skip
  print('|---|---|---|---|---|---|---|' + ('---|' if out_col else '') + '---|')
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


def _compress_child(num_blocks: int, seed: int, codebook_dtype: str, queue) -> None:
  params = block_params(num_blocks, seed)
  lays = []
  key = jax.random.key(seed)
  for b in range(num_blocks):
    for i, name in enumerate(LAYERS):
      node = params[f'blocks_{b}']
      for part in name.split('/'):
        node = node[part]
      kernel = node['kernel']
      sub = jnp.asarray(kernel).reshape(kernel.shape[0] // 8, 8, -1).transpose(0, 2, 1)  # [M, C_out, 8]
      pick = jax.random.randint(jax.random.fold_in(key, 5 * b + i), (sub.shape[0], 256), 0, sub.shape[1])
      codebooks = codebook_values.round_codebooks(jnp.take_along_axis(sub, pick[..., None], axis=1), codebook_dtype)
      codes = kmeans.assign(sub, codebooks).astype(jnp.uint8)
      lays.append(allocation.Layer(f'blocks_{b}/{name}', np.asarray(codebooks), np.asarray(codes), kernel,
                                       bias_bytes=4 * kernel.shape[1]))  # fmt: skip
  del params
  fp32 = sum(4 * lay.reference.size + lay.bias_bytes for lay in lays)
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  start = time.perf_counter()
  _, info = allocation.compress_layers(lays, int(fp32 / 24.1), lloyd_steps=2, codebook_dtype=codebook_dtype,
                                          progress=False)  # fmt: skip
  seconds = time.perf_counter() - start
  rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  queue.put((fp32, info['predicted_bytes'], seconds, rss_before, rss_peak))


def part_b(args) -> None:
  ctx = multiprocessing.get_context('spawn')
  queue = ctx.Queue()
  proc = ctx.Process(target=_compress_child, args=(args.xl_blocks, args.seed, args.codebook_dtype, queue))
  proc.start()
  fp32, nbytes, seconds, rss_before, rss_peak = queue.get()
  proc.join()
  mib = 2**20
  print(
    f'\n## (b) Compressing {args.xl_blocks} DiT-XL/2 block(s) (K=256, d=8, {args.codebook_dtype} codebooks) to '
    f'24.1x, {os.cpu_count()} CPUs\n'
  )
  print('| blocks | fp32 kernels+biases MiB | compressed MiB | x vs fp32 | seconds | peak RSS MiB (before compress) |')
  print('|---|---|---|---|---|---|')
  print(f'| {args.xl_blocks} (measured) | {fp32 / mib:.1f} | {nbytes / mib:.2f} | {fp32 / nbytes:.2f} | {seconds:.1f} | '
        f'{rss_peak / mib:.0f} ({rss_before / mib:.0f}) |')  # fmt: skip
  if args.xl_blocks < 28:
    f = 28 / args.xl_blocks
    print(f'| 28 (extrapolated x{f:.1f}, linear) | {fp32 * f / mib:.1f} | {nbytes * f / mib:.2f} | {fp32 / nbytes:.2f} | '
          f'{seconds * f:.0f} | {rss_before / mib + (rss_peak - rss_before) * f / mib:.0f} |')  # fmt: skip


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--blocks', type=int, default=1, help='DiT-XL/2 blocks for (a)')
  parser.add_argument('--iters', type=int, default=25, help='Lloyd iterations of every k-means in (a)')
  parser.add_argument('--xl-blocks', type=int, default=4, help='blocks compressed in (b) (28: the whole model)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--model', default='', help='converted model dir: (a) on its trained weights')
  parser.add_argument('--skip', default='', help="'a' or 'b' to skip that part")
  parser.add_argument(
    '--codebook-dtype',
    default='float16',
    choices=codebook_values.DTYPES,
    help='how codebook values are stored (config.quant.codebook_dtype)',
  )
  args = parser.parse_args(argv)
  for flag, value, low, high in (('--blocks', args.blocks, 1, 28), ('--xl-blocks', args.xl_blocks, 1, 28)):
    if not low <= value <= high:
      parser.error(f'{flag}={value}: expected {low}..{high}')
  if args.iters < 0:
    parser.error(f'--iters={args.iters}: expected >= 0')
  print(f'jax {jax.__version__} ({jax.devices()[0].platform}), {os.cpu_count()} CPUs\n')
  if 'a' not in args.skip:
    part_a(args)
  if 'b' not in args.skip:
    part_b(args)


if __name__ == '__main__':
  main()
