"""A rerun of the same job loads DIR/quantized/ instead of recomputing quantize -> compress -> calibrate;
any change of what decides the artifact recomputes it."""

import os
import shutil

import numpy as np
import pytest

from configs import dit_xl_1bit
from dpq_jax import errors, pipeline
from dpq_jax.quant import lineage
from tests import helpers


def _config(**overrides):
  config = dit_xl_1bit.get_config('runlocal=1')
  config.quant.kmeans_iters = 2
  config.quant.k, config.quant.d = 16, 4
  config.compress.budget = 30.0
  config.sample.steps = 2
  config.sample.num_samples = config.sample.batch_size = 2
  return helpers.set_keys(config, **overrides)


def test_fingerprints_chain_and_ignore_what_does_not_change_the_artifact():
  base = _config()
  fp = {'w': np.ones((2, 3), np.float32)}
  links = lineage.plan(base, fp)
  assert [link['stage'] for link in links] == ['quantize', 'compress', 'calibrate']
  assert lineage.plan(base, fp) == links  # deterministic
  # calibrate's lr decides only calibrate's output; k decides everything; log_every/remat nothing.
  assert [a == b for a, b in zip(lineage.plan(_config(**{'calibrate.lr': 1e-3}), fp), links)] == [True, True, False]
  assert [a == b for a, b in zip(lineage.plan(_config(**{'compress.budget': 31.0}), fp), links)] == [True, False, False]
  assert not any(a == b for a, b in zip(lineage.plan(_config(**{'quant.k': 8}), fp), links))
  assert lineage.plan(_config(**{'calibrate.log_every': 7, 'calibrate.remat': 'decoded'}), fp) == links
  assert not any(a == b for a, b in zip(lineage.plan(base, {'w': 2 * fp['w']}), links))  # other weights


def _artifact_state(workdir):
  artifact = os.path.join(workdir, 'quantized')
  return {f: (os.stat(os.path.join(artifact, f)).st_mtime_ns, open(os.path.join(artifact, f), 'rb').read())
          for f in sorted(os.listdir(artifact))}  # fmt: skip


@pytest.mark.slow  # three runs of the DiT-S/8 job: ~1.5 min of CPU
def test_rerun_loads_the_chain_and_a_change_recomputes_it(tmp_path):
  workdir = str(tmp_path / 'w')
  first = pipeline.run(_config(), workdir)
  assert all(first['timings_s'][s] > 0 for s in lineage.CHAIN)
  files = _artifact_state(workdir)
  latents = np.load(os.path.join(workdir, 'samples', 'latents.npz'))['arr_0']

  again = pipeline.run(_config(), workdir)
  assert [again['timings_s'][s] for s in lineage.CHAIN] == [0.0, 0.0, 0.0]
  assert _artifact_state(workdir) == files  # not rewritten
  for key in ('bytes', 'compression_ratio', 'effective_bits_per_weight', 'compress', 'calibrate', 'method'):
    assert again[key] == first[key], key
  # The sampler ran on the loaded model: the same samples (its own resume refuses other weights).
  np.testing.assert_array_equal(np.load(os.path.join(workdir, 'samples', 'latents.npz'))['arr_0'], latents)

  # Another budget: calibration's checkpoints belong to the old chain, refused before anything is rewritten.
  with pytest.raises(errors.CheckpointError, match='holds checkpoints of another calibration'):
    pipeline.run(_config(**{'compress.budget': 34.0}), workdir)
  assert _artifact_state(workdir) == files
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  shutil.rmtree(os.path.join(workdir, 'samples'))  # the sampler refuses other weights likewise
  changed = pipeline.run(_config(**{'compress.budget': 34.0}), workdir)
  assert all(changed['timings_s'][s] > 0 for s in lineage.CHAIN)
  assert changed['bytes']['total'] < first['bytes']['total']
  assert _artifact_state(workdir) != files
