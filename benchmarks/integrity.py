r"""What verifying an artifact's digests costs: loading DIR/quantized/ of a DiT-XL/2 with and without the check.

  .venv/bin/python -m benchmarks.integrity                 # 1-bit PQ (K=256, d=8), all 28 blocks
  .venv/bin/python -m benchmarks.integrity --blocks 4      # a quicker look
  .venv/bin/python -m benchmarks.integrity --converted     # + the converted fp checkpoint (2.7 GB on disk)

`load` is storage.load; `load + decode` adds what a run that samples from the artifact does next (every PQ
kernel decoded once, config.quant.dequantize='load'). Wall and CPU seconds: storage.load hashes on other threads while it unpacks (hashlib and xxhash release the GIL), so
the wall-clock cost is what the hashing adds past the unpacking, and the CPU cost is the hashing itself.

The artifact has DiT-XL/2's shapes (every block's 5 linear layers as PQ codes + float16 codebooks + channel
scales; biases, embedders and the final layer in float32) with random values: no k-means runs, so building it
takes seconds. Both loads read the same files from the page cache (warm: the best of --repeats interleaved
rounds), which makes the digest's share as large as it gets; a cold read from disk only adds to the load.
The last rows time a hash alone over the files' bytes: XXH3-128 (what storage uses), sha256 (hardware-accelerated
on x86 with SHA extensions; what artifacts written before XXH3 record) and blake2b-128, the other candidate.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import time
from typing import Callable

import jax
import numpy as np
import xxhash

from benchmarks import _common
from dpq_jax import convert, integrity, io_utils, tree_utils
from dpq_jax.models.spec import ModelSpec
from dpq_jax.quant import storage
from dpq_jax.quant.qweight import PQWeight
from dpq_jax.quant.surgery import QuantizedParams

HIDDEN, PATCH, CHANNELS, CLASSES, FREQ = 1152, 2, 4, 1000, 256


def xl_artifact(blocks: int, k: int, d: int, seed: int = 0) -> QuantizedParams:
  """A QuantizedParams with DiT-XL/2's shapes: `blocks` PQ-quantized blocks and the full-precision rest."""
  rng = np.random.default_rng(seed)
  fp: dict = {}
  pq = {}
  for b in range(blocks):
    for name, (c_out, c_in) in _common.DIT_XL_BLOCK_LAYERS.items():
      module = f'blocks_{b}/{name}'
      codebooks = _common.heavy_tailed(rng, (c_in // d, k, d))  # [num_subvectors, K, d]
      codes = rng.integers(0, k, (c_in // d, c_out)).astype(np.uint8 if k <= 256 else np.uint16)
      pq[module] = PQWeight(codebooks, codes, None, np.ones(c_out, np.float32))
      tree_utils.set_path(fp, module.split('/') + ['bias'], np.zeros(c_out, np.float32))
  leftovers = {
    'x_embedder/proj/kernel': (PATCH, PATCH, CHANNELS, HIDDEN),
    't_embedder/mlp_0/kernel': (FREQ, HIDDEN),
    't_embedder/mlp_2/kernel': (HIDDEN, HIDDEN),
    'y_embedder/embedding_table/embedding': (CLASSES + 1, HIDDEN),
    'final_layer/adaLN_modulation/kernel': (HIDDEN, 2 * HIDDEN),
    'final_layer/linear/kernel': (HIDDEN, PATCH * PATCH * 2 * CHANNELS),
  }
  for path, shape in leftovers.items():
    tree_utils.set_path(fp, path.split('/'), _common.heavy_tailed(rng, shape))
  return QuantizedParams(fp, pq, {}, [])


def _without(name: str, stub: Callable, fn: Callable) -> Callable:
  """fn run with integrity.<name> replaced by `stub`: the same load without its verification."""

  def call():
    real = getattr(integrity, name)
    setattr(integrity, name, stub)
    try:
      return fn()
    finally:
      setattr(integrity, name, real)

  return call


def _best(calls: dict[str, Callable], repeats: int) -> dict[str, tuple[float, float]]:
  """{name: (best wall s, its CPU s over all threads)}, the calls interleaved so machine noise hits all alike."""
  best = {name: (float('inf'), float('inf')) for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      wall, cpu = time.perf_counter(), time.process_time()
      fn()
      best[name] = min(best[name], (time.perf_counter() - wall, time.process_time() - cpu))
  return best


def artifact_rows(blocks: int, k: int, d: int, repeats: int) -> tuple[str, dict]:
  with tempfile.TemporaryDirectory(prefix='dpq_jax-integrity-') as tmp:
    artifact = os.path.join(tmp, storage.ARTIFACT_DIR)
    sizes = storage.save(artifact, xl_artifact(blocks, k, d), {'name': 'DiT-XL/2'}, commit=True)
    blobs = [np.fromfile(os.path.join(artifact, f), np.uint8) for f in storage.FILES.values()]
    verified = functools.partial(storage.load, artifact)
    unverified = _without('check', lambda *a, **k: None, verified)

    def decoded(load):  # what a run that samples from the loaded artifact does next (dequantize='load')
      return lambda: jax.block_until_ready(load()[1].dense_params())

    best = _best({
      'load, verified': verified,
      'load, unverified': unverified,
      'load + decode, verified': decoded(verified),
      'load + decode, unverified': decoded(unverified),
      'xxh3_128 alone': lambda: [xxhash.xxh3_128(memoryview(b)).hexdigest() for b in blobs],
      'sha256 alone': lambda: [hashlib.sha256(memoryview(b)).hexdigest() for b in blobs],
      'blake2b alone': lambda: [hashlib.blake2b(memoryview(b), digest_size=16).hexdigest() for b in blobs],
    }, repeats)  # fmt: skip
  return f'{blocks} blocks, PQ K={k} d={d}: {sizes["total"] / 2**20:.1f} MiB', best


def converted_rows(repeats: int) -> tuple[str, dict]:
  """convert.load_converted of DiT-XL/2's full-precision params (what the load stage reads), verified or not."""
  spec = ModelSpec(name='DiT-XL/2', input_size=32, num_classes=1000, learn_sigma=True)
  with tempfile.TemporaryDirectory(prefix='dpq_jax-integrity-') as tmp:
    path = os.path.join(tmp, 'dit_xl_2')
    convert.save_converted(path, spec, _common.heavy_tailed_params(spec.name, spec.input_size, 0))  # (then freed)
    size = sum(os.path.getsize(f) for f in io_utils.walk_files(path))
    verified = functools.partial(convert.load_converted, path)
    best = _best({
      'converted load, verified': verified,
      'converted load, unverified': _without('tree_checks', lambda *a: [], verified),
    }, repeats)  # fmt: skip
  return f'converted fp32 params: {size / 2**20:.1f} MiB', best


def main() -> None:
  parser = _common.parser(__doc__)
  parser.add_argument('--blocks', type=_common.integer(1, 28), default=28, help='DiT-XL/2 blocks (default 28)')
  parser.add_argument('--k', type=_common.integer(2, 65536), default=256)
  parser.add_argument('--d', type=_common.integer(1), default=8)
  parser.add_argument('--repeats', type=_common.integer(1), default=3)
  parser.add_argument('--converted', action='store_true', help='also the converted DiT-XL/2 checkpoint (2.7 GB)')
  args = parser.parse_args()

  parts = [artifact_rows(args.blocks, args.k, args.d, args.repeats)]
  if args.converted:  # in a child process of its own: its 2.7 GB (times the copies orbax makes) go with it
    parts.append(_common.in_child(converted_rows, args.repeats))
  print(f'DiT-XL/2 ({"; ".join(p[0] for p in parts)}); {_common.platform()}, best of {args.repeats}, warm page '
        'cache\n')  # fmt: skip
  best = {name: t for _, rows in parts for name, t in rows.items()}
  _common.print_header(['measure', 'wall s', 'CPU s (all threads)'])
  for name, (wall, cpu) in best.items():
    print(f'| {name} | {wall:.3f} | {cpu:.3f} |')
  print()
  for what in ('load', 'load + decode', 'converted load'):
    if f'{what}, verified' in best:
      (wall, cpu), (wall0, cpu0) = best[f'{what}, verified'], best[f'{what}, unverified']
      print(f'verification: {(wall - wall0) / wall0:+.1%} wall, {(cpu - cpu0) / cpu0:+.1%} CPU of the {what}')


if __name__ == '__main__':
  main()
