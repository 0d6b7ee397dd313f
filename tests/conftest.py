"""Fixtures shared by the tests; plain helpers (ROOT, the CLI runner, weight makers) are in helpers.py.

Every fixture here is session-scoped and built on first use: tests must not modify what they receive (but
faults_copy, each test's own copy of faults_workdir).

One persistent XLA compilation cache serves the whole session: this process and every subprocess it starts
(the CLI runs, the 8-device reruns, the multi-process workers) inherit JAX_COMPILATION_CACHE_DIR, so a program
that several tests compile (the DiT-S/8 job's k-means, train step, sampler) is compiled once. The cache holds
the same executables XLA would build again, so every result is bit-identical with or without it. It lives in a
fresh temporary folder removed at the end, so each session starts cold; set JAX_COMPILATION_CACHE_DIR yourself
to keep one across sessions.
"""

import os
import shutil
import tempfile

import pytest

from tests import helpers

_OWN_CACHE = None


def pytest_configure(config):
  global _OWN_CACHE
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    _OWN_CACHE = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='dpq_jax_xla_cache_')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
  import jax  # read the variables now too: helpers imported jax before this hook ran

  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))  # fmt: skip


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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


@pytest.fixture(scope='session')
def faults_workdir(tmp_path_factory):
  """A workdir holding the finished artifact and lineage of tests/pipeline/faults.config()'s tiny job (the fault
  tests damage copies of it: see faults_copy)."""
  from dpq_jax import pipeline
  from tests.pipeline import faults

  base = str(tmp_path_factory.mktemp('faults') / 'base')
  pipeline.run(faults.config(), base)
  return base


@pytest.fixture
def faults_copy(faults_workdir, tmp_path):
  """A copy of faults_workdir of this test's own, to damage."""
  out = str(tmp_path / 'w')
  shutil.copytree(faults_workdir, out)
  return out


@pytest.fixture(scope='session')
def tiny_converted(tmp_path_factory):
  """(spec, params, path) of faults.config()'s model converted (model.json + params/); copy it to damage it."""
  import jax
  import numpy as np

  from dpq_jax import convert
  from dpq_jax.models import load as load_lib
  from tests.pipeline import faults

  spec, _, params = load_lib.load_model(faults.config().model)  # the same init the fault job compiled
  params = jax.tree.map(np.asarray, params)
  path = str(tmp_path_factory.mktemp('converted') / 'dit')
  convert.save_converted(path, spec, params)
  return spec, params, path
