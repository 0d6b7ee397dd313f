"""Nested-dict param trees addressed by key paths."""

from __future__ import annotations

from typing import Any, Sequence


def set_path(tree: dict, keys: Sequence[str], value: Any) -> None:
  """tree[k0][k1]...[kn] = value, creating the intermediate dicts."""
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def get_path(tree: dict, keys: Sequence[str]) -> Any:
  """tree[k0][k1]...[kn], or None where a key is missing."""
  for k in keys:
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree
