"""Fixtures shared by the tests; plain helpers (ROOT, the CLI runner, weight makers) are in helpers.py.

Every fixture here is session-scoped and built on first use: tests must not modify what they receive.
"""

import pytest

from tests import helpers


@pytest.fixture(scope='session')
def torch_dit():
  """(diffusers DiT-S/2 on 8x8 latents, 10 classes, random weights, computing the original DiT; its
  original-format state dict {name: numpy array})."""
  from benchmarks import torch_reference as torch_refs
  from dpq_jax import convert

  ref = torch_refs.random_diffusers_dit('S', patch=2, sample_size=8, num_classes=10)
  return ref, convert.diffusers_to_original(torch_refs.state_dict_numpy(ref))


@pytest.fixture(scope='session')
def tiny_dit():
  """(module, params) of a random DiT-2x64x2/4 (depth 2, width 64) on 8x8 latents, 10 classes: compiles in seconds."""
  return helpers.random_dit('DiT-2x64x2/4', input_size=8)


@pytest.fixture(scope='session')
def small_dit():
  """(module, params) of a random DiT-S/8 on 16x16 latents, 10 classes: the real layer shapes of DiT-S."""
  return helpers.random_dit('DiT-S/8', input_size=16)


@pytest.fixture(scope='session')
def tiny_vae_dir(tmp_path_factory):
  """A converted random VAE (helpers.TINY_VAE, downscale 2: 16x16 latents -> 32x32 images)."""
  return helpers.save_random_vae(tmp_path_factory.mktemp('vae') / 'tiny')
