"""dpq_jax.api: README's Python API block runs as it stands, and what it loads back is the model the run saved."""

import json
import re

import jax
import numpy as np
import pytest

from dpq_jax import api, errors
from tests import helpers


def _readme_block() -> str:
  """The code block of README's "Python API" section that drives api.Run."""
  with open(f'{helpers.ROOT}/README.md') as f:
    section = f.read().partition('\n## Python API\n')[2].partition('\n## ')[0]
  (block,) = [b for b in re.findall(r'```python\n(.*?)```', section, re.S) if 'api.Run(' in b]
  return block


def test_readme_snippet_runs_and_loads_back_the_saved_model(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  scope = {}
  exec(compile(_readme_block(), 'README.md', 'exec'), scope)  # noqa: S102 (the README's own code)
  run, report = scope['run'], scope['report']
  assert report == json.loads((tmp_path / 'runs/py/report.json').read_text())
  assert report['stages'] == ['load', 'quantize', 'compress'] and report['method'] == 'pq-k16-d4-compressed'
  assert report['compress']['compression_ratio_scope'] >= 8.0
  assert report['bytes']['total'] == sum(f.stat().st_size for f in (tmp_path / 'runs/py/quantized').iterdir())
  assert scope['eps'].shape == (2, 8, 8, 8) and scope['latents'].shape == (2, 8, 8, 4)
  assert np.isfinite(scope['latents']).all()
  # What load_quantized gives back computes what the run held in memory.
  module, variables = run.model()
  x, t, y = jax.random.normal(jax.random.key(0), (2, 8, 8, 4)), np.array([10, 500]), np.array([3, 10])
  np.testing.assert_allclose(scope['model'].apply(scope['variables'], x, t, y), module.apply(variables, x, t, y),
                             rtol=1e-5, atol=1e-5)  # fmt: skip
  # The artifact folder alone: the report is its sizes.
  _, _, sizes = api.load_quantized(str(tmp_path / 'runs/py/quantized'))
  assert sizes['bytes'] == report['bytes']


def test_bad_values_name_themselves(tmp_path):
  with pytest.raises(errors.ConfigError, match='bits=3 with k=256'):
    api.codebook_shape(3)
  assert api.codebook_shape(2) == (256, 4) and api.codebook_shape(1, 16) == (16, 4)
  with pytest.raises(errors.ConfigError, match="config.model.name='DiT-Q/2'"):
    api.Run(str(tmp_path / 'w'), name='DiT-Q/2')
  with pytest.raises(errors.ConfigError, match='no quantized model'):
    api.load_quantized(str(tmp_path))
