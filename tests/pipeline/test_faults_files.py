"""Fault injection, bad files: damaged artifacts and converted checkpoints, non-finite weights and samples, damaged
diffusers configs and reference batches, calibration checkpoints of another job. Each ends as main ends it
(tests/pipeline/faults.py) with nothing half-written; in-process calls on the tiny job's artifact, made once
(conftest's faults_workdir) and copied per case.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from dpq_jax import convert, pipeline
from dpq_jax.evaluate import sample_batch, scoring
from dpq_jax.quant import storage
from tests.pipeline import faults

# ------------------------------------------------------------------------------------------ damaged artifacts


def _flip(path, at=0.5):
  data = bytearray(open(path, 'rb').read())
  data[int(len(data) * at)] ^= 0xFF
  open(path, 'wb').write(bytes(data))


def _nan_codebooks(path):
  n = os.path.getsize(path) // 2
  open(path, 'wb').write(np.full(n, np.nan, np.float16).tobytes())  # same size


def _edit_shape(path):
  index = json.load(open(path))
  index['entries'][0]['shape'] = [3, 5, 7]
  json.dump(index, open(path, 'w'))


DAMAGE = {
  'codes.bin': _flip,
  'codebooks.bin': _nan_codebooks,
  'full_precision.bin': faults.truncate,
  'index.json': _edit_shape,
}


@pytest.mark.parametrize('name', sorted(DAMAGE) + ['missing', 'index-not-json'])
def test_damaged_artifact_is_named_and_a_rerun_recomputes_it(faults_copy, capsys, name):
  artifact = os.path.join(faults_copy, storage.ARTIFACT_DIR)
  target = {'missing': 'codebooks.bin', 'index-not-json': 'index.json'}.get(name, name)
  path = os.path.join(artifact, target)
  if name == 'missing':
    os.remove(path)
  elif name == 'index-not-json':
    open(path, 'w').write('{"model": ')
  else:
    DAMAGE[name](path)
  line = faults.refused(capsys, storage.load, artifact)
  assert path in line and 'rerun' in line, line
  if name in ('codes.bin', 'index.json', 'missing'):  # the producing command again: recomputed, not loaded
    report = pipeline.run(faults.config(), faults_copy)
    assert report['timings_s']['quantize'] > 0
    storage.load(artifact)  # whole again
    if name != 'index.json':  # (an edited index.json changes the artifact's digest: no longer the recorded one)
      assert 'is damaged' in open(os.path.join(faults_copy, 'report.md')).read()


# ------------------------------------------------------------------------------------------ non-finite weights


def test_converter_refuses_nan_weights(torch_dit, tmp_path, capsys):
  import torch

  import convert_torch_checkpoint

  _, state = torch_dit
  state = dict(state, **{'blocks.1.mlp.fc2.weight': state['blocks.1.mlp.fc2.weight'].copy()})
  state['blocks.1.mlp.fc2.weight'][0, 3] = np.inf
  pt = tmp_path / 'dit.pt'
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pt)
  out = tmp_path / 'out'
  line = faults.refused(capsys, convert_torch_checkpoint.main, ['--checkpoint', str(pt), '--output', str(out)])
  assert 'blocks.1.mlp.fc2.weight' in line and 'non-finite' in line, line
  assert not out.exists() and not list(tmp_path.glob('.out.tmp-*'))


def test_load_refuses_nan_weights_of_a_converted_checkpoint(tiny_converted, tmp_path, capsys):
  spec, params, _ = tiny_converted
  params = jax.tree.map(np.copy, params)
  params['blocks_0']['attn']['qkv']['kernel'][1, 2] = np.nan
  path = str(tmp_path / 'nan')
  convert.save_converted(path, spec, params)
  config = faults.config(**{'model.init': 'checkpoint', 'model.checkpoint': path, 'model.name': ''})
  line = faults.refused(capsys, pipeline.run, config, str(tmp_path / 'w'))
  assert 'blocks_0/attn/qkv/kernel' in line and 'non-finite' in line, line
  assert not (tmp_path / 'w').exists()


def test_save_refuses_nan_weights_before_writing(faults_workdir, tmp_path, capsys):
  meta, q = storage.load(os.path.join(faults_workdir, storage.ARTIFACT_DIR))
  name = sorted(q.pq)[0]
  bad = q.pq[name].replace(codebooks=np.where(np.arange(q.pq[name].codebooks.size).reshape(q.pq[name].codebooks.shape)
                                               == 5, np.nan, q.pq[name].codebooks))  # fmt: skip
  q = q.replace(pq={**q.pq, name: bad})
  line = faults.refused(capsys, storage.save, str(tmp_path / 'quantized'), q, meta)
  assert f'{name}' in line and 'codebooks' in line, line
  assert os.listdir(tmp_path) == []


def test_non_finite_samples_fail_the_run(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(sample_batch.Run, 'latents', lambda self, start, progress: np.full((2, 8, 8, 4), np.nan))
  config = faults.config()
  config.stages = ('load', 'sample')
  line = faults.refused(capsys, pipeline.run, config, str(tmp_path / 'w'))
  assert 'samples 0..1' in line and 'non-finite' in line, line
  assert not list((tmp_path / 'w').rglob('*.npz')) and not (tmp_path / 'w' / 'report.json').exists()


# ------------------------------------------------------------------------------------------ damaged inputs


def _largest(directory):
  return max(faults.walk(directory), key=os.path.getsize)


CONVERTED_DAMAGE = {
  'not-json': (lambda d: open(os.path.join(d, 'model.json'), 'w').write('{'), 'model.json: unreadable'),
  'other-model': (lambda d: _edit_json(os.path.join(d, 'model.json'), name='DiT-S/2'), 'as DiT-S/2'),
  'unknown-key': (lambda d: _edit_json(os.path.join(d, 'model.json'), nosuch=1), 'not a model description'),
  'truncated': (lambda d: faults.truncate(_largest(os.path.join(d, 'params'))), 'were written (truncated'),
  'added': (lambda d: open(os.path.join(d, 'params', 'extra'), 'w').write('x'), 'params/extra: not written'),
}


def _edit_json(path, **changes):
  meta = json.load(open(path))
  json.dump({**meta, **changes}, open(path, 'w'))


@pytest.mark.parametrize('name', sorted(CONVERTED_DAMAGE))
def test_damaged_converted_checkpoint(tiny_converted, tmp_path, capsys, name):
  path = str(tmp_path / 'dit')
  shutil.copytree(tiny_converted[2], path)
  damage, message = CONVERTED_DAMAGE[name]
  damage(path)
  line = faults.refused(capsys, convert.load_converted, path)
  assert message in line and path in line, line


@pytest.mark.parametrize('config,message', [('{', 'not a diffusers DiT config'), ('{"sample_size": "x"}', "'x'"),
                                            ('{"sample_size": 0}', 'sample_size=0')])  # fmt: skip
def test_damaged_diffusers_config(tmp_path, capsys, config, message):
  (tmp_path / 'config.json').write_text(config)
  line = faults.refused(capsys, convert.read_diffusers_folder, str(tmp_path))
  assert message in line and 'config.json' in line, line


def test_damaged_reference_batches(tmp_path, capsys):
  npz = tmp_path / 'ref.npz'
  np.savez(npz, arr_0=np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3))
  data = bytearray(npz.read_bytes())
  data[len(data) // 2] ^= 0xFF  # inside arr_0's bytes: a bad CRC, found when the stream ends
  npz.write_bytes(bytes(data))
  line = faults.refused(capsys, lambda: list(scoring.Images(str(npz), 'config.evaluate.reference').batches(4)))
  assert str(npz) in line and 'cannot be read' in line, line
  folder = tmp_path / 'pngs'
  folder.mkdir()
  (folder / 'a.png').write_bytes(b'\x89PNG\r\n\x1a\n not an image')
  line = faults.refused(capsys, scoring.Images, str(folder), 'config.evaluate.reference')
  assert 'a.png' in line and 'cannot be read' in line, line


# ------------------------------------------------------------------------------------------ calibration checkpoints


@pytest.mark.parametrize('stored,message', [(None, 'without a fingerprint'), ('other', 'of another calibration')])
def test_calibration_checkpoint_needs_its_own_fingerprint(tmp_path, capsys, stored, message):
  from dpq_jax.calibrate import checkpoint as ckpt_lib
  from dpq_jax.calibrate import loop

  ckpt = ckpt_lib.Checkpointer(str(tmp_path / loop.CHECKPOINT_DIR), 1, 0, async_save=False)
  data = {'iterator': 'x'} if stored is None else {'iterator': 'x', 'fingerprint': stored}
  ckpt.save(1, {'a': np.zeros(2, np.float32)}, data, force=True)
  ckpt.close()
  line = faults.refused(capsys, loop.check_checkpoints, str(tmp_path), 'this-job')
  assert message in line, line
  if stored is not None:
    loop.check_checkpoints(str(tmp_path), stored)  # its own job resumes it


@pytest.mark.parametrize('algorithm', ['xxh3_128', 'sha256'])
def test_digest_records_of_either_algorithm_find_one_flipped_byte(tmp_path, algorithm):
  """Files recorded by XXH3-128 (written now) or sha256 (written before the switch) verify, against hashlib's
  sha256 and the xxhash reference; one flipped byte is named."""
  import hashlib

  import xxhash

  from dpq_jax import errors, integrity

  path = tmp_path / 'codes.bin'
  data = np.random.default_rng(0).integers(0, 256, 3 << 20, np.uint8).tobytes()
  path.write_bytes(data)
  recorded = integrity.file_digest(str(path), algorithm)
  reference = {'xxh3_128': xxhash.xxh3_128, 'sha256': hashlib.sha256}[algorithm](data).hexdigest()
  assert recorded == {'bytes': len(data), algorithm: reference}
  integrity.check_file(str(path), recorded, 'fix')
  integrity.check(str(path), data, recorded, 'fix')
  damaged = bytearray(data)
  damaged[12345] ^= 1
  path.write_bytes(bytes(damaged))
  with pytest.raises(errors.ArtifactError, match='codes.bin: its digest differs'):
    integrity.check_file(str(path), recorded, 'fix')
  with pytest.raises(errors.ArtifactError, match='digest differs'):
    integrity.check(str(path), bytes(damaged), recorded, 'fix')
