"""Plain helpers shared by the tests (the fixtures are in conftest.py).

The worker scripts that some tests start with `python -c` import this module too (`from tests import
helpers`): everything here works outside pytest.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpq_jax import convert
from dpq_jax.models import dit
from dpq_jax.models import vae as vae_lib
from dpq_jax.models.load import randomize_zero_init

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
XL_RUNLOCAL = 'configs/dit_xl_1bit.py:runlocal=1'  # the paper's job, shrunk to a DiT-S-sized model
TINY_VAE = vae_lib.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)  # downscale 2

# ------------------------------------------------------------------------------------------- subprocesses


def run_python(*args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
  """`python ARGS` in the repository root, in this process's environment updated with `env`; the completed
  process, its output captured as text."""
  return subprocess.run(
    [sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
    env={**os.environ, **env} if env else None,
  )  # fmt: skip


def run_main(workdir, *overrides, config: str = 'configs/smoke.py', env: dict | None = None, timeout: float = 600):
  """`python -m dpq_jax.main --config=CONFIG --workdir=WORKDIR OVERRIDES...`: the completed process."""
  return run_python('-m', 'dpq_jax.main', f'--config={config}', f'--workdir={workdir}', *overrides, env=env,
                    timeout=timeout)  # fmt: skip


def run_convert(*args, timeout: float = 300) -> subprocess.CompletedProcess:
  """`python convert_torch_checkpoint.py ARGS...`: the completed process."""
  return run_python(os.path.join(ROOT, 'convert_torch_checkpoint.py'), *args, timeout=timeout)


def assert_refused(r: subprocess.CompletedProcess, workdir, *messages: str) -> None:
  """The run refused its input before any work: exit status 2, every message in stderr, nothing at workdir."""
  assert r.returncode == 2, r.stderr[-2000:]
  for message in messages:
    assert message in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(workdir)


def start_python(*args, env: dict | None = None) -> subprocess.Popen:
  """`python ARGS` started in the repository root, in this process's environment updated with `env`; stdout
  and stderr are pipes (text)."""
  return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env={**os.environ, **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def free_port() -> int:
  """A localhost TCP port free now: the coordinator address of a multi-process JAX test."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_results(procs: list[subprocess.Popen], timeout: float, what: str) -> list[dict]:
  """The JSON each process printed after its last 'RESULT ', in order. A timeout kills them all and fails the
  test (`what` names them); a jax without CPU multi-process collectives skips it."""
  results = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f'{what} timed out')
    if p.returncode and 'collectives' in err and 'not' in err and 'support' in err:
      pytest.skip(f'this jax has no CPU multi-process collectives: {err.strip().splitlines()[-1]}')
    assert p.returncode == 0, err[-4000:]
    results.append(json.loads(out.split('RESULT ')[-1]))
  return results


def rerun_with_devices(test_file: str, test_name: str, devices: int = 8) -> None:
  """Runs one test in a pytest subprocess that sees `devices` CPU devices, and asserts it passed.

  XLA_FLAGS=--xla_force_host_platform_device_count is set for that subprocess only: set in this process,
  every later subprocess of the suite (the CLI tests) would inherit the devices."""
  # no:xdist: the rerun is one test, and under `pytest -n` it would otherwise inherit the worker's plugin state
  r = run_python('-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'no:xdist', f'{test_file}::{test_name}',
                 env={'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'})  # fmt: skip
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def dies_half_written(tmp: str) -> None:
  """A writer for io_utils.atomic_write interrupted mid-way: half the file written, then an error."""
  with open(tmp, 'w') as f:
    f.write('half')
  raise RuntimeError('interrupted')


# ------------------------------------------------------------------------------------------- configs


def set_keys(config, **overrides):
  """config[section][name] = value for every 'section.name'=value of `overrides`; returns config."""
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def tiny_pipeline_config():
  """load -> quantize -> sample of a random 2-block DiT on 8x8 latents (configs/smoke.py): seconds on a CPU."""
  from configs import smoke

  config = smoke.get_config()
  config.model.name = 'DiT-2x32x2/4'
  config.model.input_size = 8
  config.model.num_classes = 10
  config.stages = ('load', 'quantize', 'sample')
  config.quant.k, config.quant.d, config.quant.kmeans_iters = 4, 4, 2
  config.quant.pattern = r'blocks_\d+/mlp/fc1'
  config.sample.steps, config.sample.num_samples, config.sample.batch_size = 2, 3, 2
  return config


# ------------------------------------------------------------------------------------------- weights and models


def heavy_tailed(shape, seed: int = 0, df: float = 3, scale: float = 0.02) -> np.ndarray:
  """Student-t(df) values times `scale`, float32: weights with a trained model's heavy tails, seeded."""
  return (np.random.default_rng(seed).standard_t(df, shape) * scale).astype(np.float32)


def random_dit(name: str, input_size: int, num_classes: int = 10):
  """(module, params) of the named DiT; random weights, its zero-initialised layers (adaLN, final) included."""
  model = dit.create_model(name, input_size=input_size, num_classes=num_classes)
  return model, randomize_zero_init(dit.init_params(model, jax.random.key(0)), jax.random.key(1))


def save_random_vae(path, config: vae_lib.VAEConfig = TINY_VAE) -> str:
  """Writes a converted VAE of `config` with random weights (key 0) to `path`; returns it as a string."""
  params = vae_lib.init_params(vae_lib.AutoencoderKL(config), jax.random.key(0))
  convert.save_converted_vae(str(path), config, jax.tree.map(np.asarray, params))
  return str(path)
