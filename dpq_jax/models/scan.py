"""The DiT's blocks stacked for `nn.scan`: per-block trees <-> one tree with a leading block axis.

Everything stored or reported (converted checkpoints, DIR/quantized, report.json, statistics, surgery,
allocation, sizes) names the blocks `blocks_0` ... `blocks_{depth-1}`. A scanned DiT (`DiT.scan_blocks`)
runs one block program `depth` times over variables stacked under `blocks`: leaf [depth, ...] = the
per-block leaves. `stack_blocks` and `unstack_blocks` translate between the two where a jitted program
starts and ends (the sampler's variables, the calibration state); both are pure and apply to one collection
or to a variables dict {'params': ..., 'quant': ...}. Blocks that differ (a layer quantized in some blocks
only, another K) cannot stack: `runnable` then runs the model unrolled and says why.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

STACKED = 'blocks'  # the scanned blocks' module name: params['blocks'][...] is [depth, ...]
_BLOCK = re.compile(r'blocks_(\d+)')


def block_keys(tree: dict) -> list[str]:
  """The per-block keys of a dict ('blocks_0', 'blocks_1', ...) in block order."""
  found = sorted((int(m.group(1)), k) for k in tree if (m := _BLOCK.fullmatch(k)))
  return [k for _, k in found]


def _structure(tree: Any) -> list[tuple[str, tuple, Any]]:
  return [
    (jax.tree_util.keystr(p), tuple(jnp.shape(x)), jnp.result_type(x))
    for p, x in jax.tree_util.tree_leaves_with_path(tree)
  ]


def check_stackable(tree: dict, depth: int | None = None) -> str | None:
  """None when `tree`'s per-block subtrees can stack (blocks_0..blocks_{depth-1}, equal paths, shapes and
  dtypes), else a line naming the first difference; a tree without blocks is stackable as it is."""
  keys = block_keys(tree)
  if not keys:
    return None
  depth = len(keys) if depth is None else depth
  if keys != [f'blocks_{i}' for i in range(depth)]:
    return f'the tree holds {", ".join(keys)}: expected blocks_0..blocks_{depth - 1}'
  if STACKED in tree:
    return f'the tree holds both {STACKED!r} and per-block keys'
  first = _structure(tree[keys[0]])
  for k in keys[1:]:
    other = _structure(tree[k])
    if other != first:
      diff = sorted(set(other) ^ set(first))
      return f'{k} differs from blocks_0 at {diff[0][0] or "its root"} (shape, dtype or presence)'
  return None


def stack_blocks(tree: dict, depth: int | None = None) -> dict:
  """{'blocks_0': t0, ..., 'blocks_{n-1}': t_{n-1}, **rest} -> {'blocks': stacked, **rest}, recursively into
  the top-level collections ({'params': {...}, 'quant': {...}} stacks each). Leaves [depth, ...].

  Raises ValueError (check_stackable's line) where the blocks differ or are not blocks_0..blocks_{depth-1}."""
  if not isinstance(tree, dict):
    return tree
  keys = block_keys(tree)
  if not keys:  # a variables dict: stack each collection
    return {k: stack_blocks(v, depth) if isinstance(v, dict) and _has_blocks_below(v) else v for k, v in tree.items()}
  problem = check_stackable(tree, depth)
  if problem:
    raise ValueError(f'cannot stack the DiT blocks: {problem}')
  out = {k: v for k, v in tree.items() if k not in keys}
  out[STACKED] = jax.tree.map(lambda *xs: jnp.stack(xs), *(tree[k] for k in keys))
  return out


def unstack_blocks(tree: dict) -> dict:
  """The inverse of `stack_blocks`: {'blocks': stacked, **rest} -> {'blocks_0': ..., **rest} (recursively into
  the top-level collections)."""
  if not isinstance(tree, dict):
    return tree
  if STACKED not in tree:
    return {k: unstack_blocks(v) if isinstance(v, dict) and _has_stacked_below(v) else v for k, v in tree.items()}
  stacked = tree[STACKED]
  leaves = jax.tree.leaves(stacked)
  depth = leaves[0].shape[0] if leaves else 0
  out = {k: v for k, v in tree.items() if k != STACKED}
  for i in range(depth):
    out[f'blocks_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out


def runnable(model: Any, variables: dict) -> tuple[Any, dict, str | None]:
  """(model, variables, why unrolled): a DiT with `scan_blocks` and its variables stacked; where they cannot
  stack, the unrolled clone, the per-block variables and the reason (None when nothing was given up)."""
  if not getattr(model, 'scan_blocks', False):
    return model, variables, None
  try:
    return model, stack_blocks(variables, model.depth), None
  except ValueError as e:
    return model.clone(scan_blocks=False), variables, str(e)


def _has_blocks_below(tree: dict) -> bool:
  return bool(block_keys(tree)) or any(isinstance(v, dict) and _has_blocks_below(v) for v in tree.values())


def _has_stacked_below(tree: dict) -> bool:
  return STACKED in tree or any(isinstance(v, dict) and _has_stacked_below(v) for v in tree.values())


def rule_path(path: str) -> str:
  """A scanned layer's module path as the quantization rules name it: 'blocks/attn/qkv' -> 'blocks_0/attn/qkv'
  (stacked blocks share one spec: stacking checked their shapes agree)."""
  head, sep, rest = path.partition('/')
  return f'blocks_0{sep}{rest}' if head == STACKED else path
