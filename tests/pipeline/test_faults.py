"""Fault injection: damaged artifacts, non-finite weights, unusable workdirs, bad configs, damaged converted
checkpoints and reference batches, concurrent runs, killed writers. Each fault ends as main ends it (status 2,
one `error:` line naming the culprit, no traceback) with nothing half-written or clobbered.

Cheap by design: runs are in-process calls of pipeline.run under errors.reported (what main does), on one tiny
job whose artifact a module fixture makes once; subprocesses only where a second process is the point (a lock
holder, kill -9) or flag parsing is. A full disk is simulated (ENOSPC from the writer): mounting a full tmpfs
needs root privileges the test suite must not assume.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpq_jax import convert, errors, pipeline, workdir
from dpq_jax.evaluate import sample_batch, scoring
from dpq_jax.models import load as load_lib
from dpq_jax.quant import storage
from tests import helpers


def _config(**overrides):
  config = helpers.tiny_pipeline_config()
  config.stages = ('load', 'quantize')
  return helpers.set_keys(config, **overrides)


def _refused(capsys, fn, *args) -> str:
  """fn(*args) under errors.reported: exit status 2, exactly one `error:` line, no traceback; that line."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as e, errors.reported():
    fn(*args)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith('error:')]
  assert e.value.code == 2 and len(lines) == 1 and 'Traceback' not in err, err
  return lines[0]


def _walk(directory) -> list[str]:
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs)


def _files(directory) -> dict:
  """{path: bytes} of every file under directory but the lock (which names the last holder)."""
  return {p: open(p, 'rb').read() for p in _walk(directory) if os.path.basename(p) != workdir.LOCK}


def _temps(directory) -> list[str]:
  """Paths under directory that are temps of a writer (workdir's names for them)."""
  paths = [os.path.join(r, n) for r, ds, fs in os.walk(directory) for n in ds + fs]
  return sorted(p for p in paths if workdir._STALE.fullmatch(os.path.basename(p)))


@pytest.fixture(scope='module')
def produced(tmp_path_factory):
  """A workdir holding the tiny job's finished artifact and lineage (do not modify: copy it)."""
  base = str(tmp_path_factory.mktemp('faults') / 'base')
  pipeline.run(_config(), base)
  return base


@pytest.fixture
def copy(produced, tmp_path):
  out = str(tmp_path / 'w')
  shutil.copytree(produced, out)
  return out


# ------------------------------------------------------------------------------------------ damaged artifacts


def _flip(path, at=0.5):
  data = bytearray(open(path, 'rb').read())
  data[int(len(data) * at)] ^= 0xFF
  open(path, 'wb').write(bytes(data))


def _nan_codebooks(path):
  n = os.path.getsize(path) // 2
  open(path, 'wb').write(np.full(n, np.nan, np.float16).tobytes())  # same size


def _truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def _edit_shape(path):
  index = json.load(open(path))
  index['entries'][0]['shape'] = [3, 5, 7]
  json.dump(index, open(path, 'w'))


DAMAGE = {
  'codes.bin': _flip,
  'codebooks.bin': _nan_codebooks,
  'full_precision.bin': _truncate,
  'index.json': _edit_shape,
}


@pytest.mark.parametrize('name', sorted(DAMAGE) + ['missing', 'index-not-json'])
def test_damaged_artifact_is_named_and_a_rerun_recomputes_it(copy, capsys, name):
  artifact = os.path.join(copy, storage.ARTIFACT_DIR)
  target = {'missing': 'codebooks.bin', 'index-not-json': 'index.json'}.get(name, name)
  path = os.path.join(artifact, target)
  if name == 'missing':
    os.remove(path)
  elif name == 'index-not-json':
    open(path, 'w').write('{"model": ')
  else:
    DAMAGE[name](path)
  line = _refused(capsys, storage.load, artifact)
  assert path in line and 'rerun' in line, line
  if name in ('codes.bin', 'index.json', 'missing'):  # the producing command again: recomputed, not loaded
    report = pipeline.run(_config(), copy)
    assert report['timings_s']['quantize'] > 0
    storage.load(artifact)  # whole again
    if name != 'index.json':  # (an edited index.json changes the artifact's digest: no longer the recorded one)
      assert 'is damaged' in open(os.path.join(copy, 'report.md')).read()


# ------------------------------------------------------------------------------------------ non-finite weights


@pytest.fixture(scope='module')
def tiny_converted(tmp_path_factory):
  """(spec, params, path) of a converted random DiT-2x32x2/4 on 8x8 latents (do not modify: copy it)."""
  spec, _, params = load_lib.load_model(_config().model)  # the produced job's model: its init is compiled already
  params = jax.tree.map(np.asarray, params)
  path = str(tmp_path_factory.mktemp('converted') / 'dit')
  convert.save_converted(path, spec, params)
  return spec, params, path


def test_converter_refuses_nan_weights(torch_dit, tmp_path, capsys):
  import torch

  import convert_torch_checkpoint

  _, state = torch_dit
  state = dict(state, **{'blocks.1.mlp.fc2.weight': state['blocks.1.mlp.fc2.weight'].copy()})
  state['blocks.1.mlp.fc2.weight'][0, 3] = np.inf
  pt = tmp_path / 'dit.pt'
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pt)
  out = tmp_path / 'out'
  line = _refused(capsys, convert_torch_checkpoint.main, ['--checkpoint', str(pt), '--output', str(out)])
  assert 'blocks.1.mlp.fc2.weight' in line and 'non-finite' in line, line
  assert not out.exists() and not list(tmp_path.glob('.out.tmp-*'))


def test_load_refuses_nan_weights_of_a_converted_checkpoint(tiny_converted, tmp_path, capsys):
  spec, params, _ = tiny_converted
  params = jax.tree.map(np.copy, params)
  params['blocks_0']['attn']['qkv']['kernel'][1, 2] = np.nan
  path = str(tmp_path / 'nan')
  convert.save_converted(path, spec, params)
  config = _config(**{'model.init': 'checkpoint', 'model.checkpoint': path, 'model.name': ''})
  line = _refused(capsys, pipeline.run, config, str(tmp_path / 'w'))
  assert 'blocks_0/attn/qkv/kernel' in line and 'non-finite' in line, line
  assert not (tmp_path / 'w').exists()


def test_save_refuses_nan_weights_before_writing(produced, tmp_path, capsys):
  meta, q = storage.load(os.path.join(produced, storage.ARTIFACT_DIR))
  name = sorted(q.pq)[0]
  bad = q.pq[name].replace(codebooks=np.where(np.arange(q.pq[name].codebooks.size).reshape(q.pq[name].codebooks.shape)
                                               == 5, np.nan, q.pq[name].codebooks))  # fmt: skip
  q = q.replace(pq={**q.pq, name: bad})
  line = _refused(capsys, storage.save, str(tmp_path / 'quantized'), q, meta)
  assert f'{name}' in line and 'codebooks' in line, line
  assert os.listdir(tmp_path) == []


def test_non_finite_samples_fail_the_run(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(sample_batch.Run, 'latents', lambda self, start, progress: np.full((2, 8, 8, 4), np.nan))
  config = _config()
  config.stages = ('load', 'sample')
  line = _refused(capsys, pipeline.run, config, str(tmp_path / 'w'))
  assert 'samples 0..1' in line and 'non-finite' in line, line
  assert not list((tmp_path / 'w').rglob('*.npz')) and not (tmp_path / 'w' / 'report.json').exists()


# ------------------------------------------------------------------------------------------ unusable workdirs


def test_workdir_that_is_a_file_or_under_one(tmp_path, capsys):
  f = tmp_path / 'f'
  f.write_text('mine')
  for where in (f, f / 'w'):
    line = _refused(capsys, pipeline.run, _config(), str(where))
    assert str(where) in line and ('not a directory' in line or 'is a file' in line), line
  assert f.read_text() == 'mine'


def test_workdir_that_is_not_writable(tmp_path, capsys, monkeypatch):
  ro = tmp_path / 'ro'
  ro.mkdir()
  ro.chmod(0o555)
  if os.access(ro, os.W_OK):  # root ignores permissions: what os.access reports on a read-only mount is simulated
    real = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode, **k: False if str(p) == str(ro) else real(p, mode, **k))
  line = _refused(capsys, pipeline.run, _config(), str(ro / 'w'))
  assert f'{ro} is not writable' in line, line
  ro.chmod(0o755)
  assert os.listdir(ro) == []


def test_full_disk_leaves_the_previous_artifact(copy, capsys, monkeypatch):
  """ENOSPC from the artifact writer (simulated, see the module doc): one line, the old artifact untouched."""
  before = _files(os.path.join(copy, storage.ARTIFACT_DIR))

  def full(self, kind, path, data, **meta):
    raise OSError(errno.ENOSPC, 'No space left on device', os.path.join(copy, 'quantized', storage.FILES[kind]))

  monkeypatch.setattr(storage._Writer, 'add', full)
  line = _refused(capsys, pipeline.run, _config(**{'quant.seed': 7}), copy)  # another seed: recomputed
  assert 'no space left' in line, line
  assert _files(os.path.join(copy, storage.ARTIFACT_DIR)) == before and _temps(copy) == []


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
  'overrides,message',
  [
    ({'quant.pattern': r'blocks_(\d+'}, "config.quant.pattern: 'blocks_(\\\\d+' is not a valid regex"),
    ({'model.input_size': 10}, 'config.model.input_size=10: expected a multiple of the patch size 4'),
  ],
)
def test_bad_config_values_before_any_work(tmp_path, capsys, overrides, message):
  line = _refused(capsys, pipeline.run, _config(**overrides), str(tmp_path / 'w'))
  assert message in line, line
  assert not (tmp_path / 'w').exists()


def test_unreachable_budget_is_refused_before_quantize_writes(tmp_path, capsys, monkeypatch):
  from dpq_jax.quant import surgery

  monkeypatch.setattr(surgery, 'quantize_params', lambda *a, **k: pytest.fail('k-means ran'))
  config = _config(**{'compress.budget': 1e6})
  config.stages = ('load', 'quantize', 'compress')
  line = _refused(capsys, pipeline.run, config, str(tmp_path / 'w'))
  assert 'config.compress: a budget of' in line and 'smallest reachable size' in line, line
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize(
  'flag,message',
  [
    ('--config.nosuch=1', "--config.nosuch=1: the config has no key 'nosuch'"),
    ('--config=configs/smoke.py:nosuch=1', "unknown config argument 'nosuch'"),
    ('--config=nosuchfile.py', 'nosuchfile.py'),
  ],
)
def test_bad_flags_are_one_line(tmp_path, flag, message):
  r = helpers.run_main(tmp_path / 'w', flag)  # exits in flag parsing: no JAX import, about a second
  lines = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and 'Traceback' not in r.stderr, r.stderr
  assert not (tmp_path / 'w').exists()


# ------------------------------------------------------------------------------------------ damaged inputs


def _largest(directory):
  return max(_walk(directory), key=os.path.getsize)


CONVERTED_DAMAGE = {
  'not-json': (lambda d: open(os.path.join(d, 'model.json'), 'w').write('{'), 'model.json: unreadable'),
  'other-model': (lambda d: _edit_json(os.path.join(d, 'model.json'), name='DiT-S/2'), 'as DiT-S/2'),
  'unknown-key': (lambda d: _edit_json(os.path.join(d, 'model.json'), nosuch=1), 'not a model description'),
  'truncated': (lambda d: _truncate(_largest(os.path.join(d, 'params'))), 'were written (truncated'),
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
  line = _refused(capsys, convert.load_converted, path)
  assert message in line and path in line, line


@pytest.mark.parametrize('config,message', [('{', 'not a diffusers DiT config'), ('{"sample_size": "x"}', "'x'"),
                                            ('{"sample_size": 0}', 'sample_size=0')])  # fmt: skip
def test_damaged_diffusers_config(tmp_path, capsys, config, message):
  (tmp_path / 'config.json').write_text(config)
  line = _refused(capsys, convert.read_diffusers_folder, str(tmp_path))
  assert message in line and 'config.json' in line, line


def test_damaged_reference_batches(tmp_path, capsys):
  npz = tmp_path / 'ref.npz'
  np.savez(npz, arr_0=np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3))
  data = bytearray(npz.read_bytes())
  data[len(data) // 2] ^= 0xFF  # inside arr_0's bytes: a bad CRC, found when the stream ends
  npz.write_bytes(bytes(data))
  line = _refused(capsys, lambda: list(scoring.Images(str(npz), 'config.evaluate.reference').batches(4)))
  assert str(npz) in line and 'cannot be read' in line, line
  folder = tmp_path / 'pngs'
  folder.mkdir()
  (folder / 'a.png').write_bytes(b'\x89PNG\r\n\x1a\n not an image')
  line = _refused(capsys, scoring.Images, str(folder), 'config.evaluate.reference')
  assert 'a.png' in line and 'cannot be read' in line, line


# ------------------------------------------------------------------------------------------ concurrent runs


_HOLDER = (
  'import sys, time; from dpq_jax import workdir; held = workdir.hold(sys.argv[1]); held.__enter__(); '
  'print("HELD", flush=True); time.sleep(120)'
)


def test_second_run_is_refused_naming_the_holder(copy, capsys):
  before = _files(copy)
  holder = subprocess.Popen([sys.executable, '-c', _HOLDER, copy], cwd=helpers.ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'HELD'
    line = _refused(capsys, pipeline.run, _config(**{'quant.seed': 7}), copy)
    assert f'pid {holder.pid}' in line and 'in use by another run' in line, line
  finally:
    holder.kill()
    holder.wait()
  assert _files(copy) == before
  with workdir.hold(copy):  # the lock of a killed holder is free again
    pass


# ------------------------------------------------------------------------------------------ killed writers

_KILLED_SAVE = """
import os, sys, time
from dpq_jax.quant import storage
meta, q = storage.load(sys.argv[1])
real = storage._Writer.add
def slow(self, *a, **k):
  real(self, *a, **k)
  for f in self.handles.values():
    f.flush()
  print('WRITING', flush=True)
  time.sleep(120)
storage._Writer.add = slow
storage.save(sys.argv[1], q, meta)
"""


def test_kill_9_while_writing_the_artifact_and_the_next_run_cleans_up(copy):
  """A real kill -9 in storage.save (quantize, compress and calibrate all write through it)."""
  artifact = os.path.join(copy, storage.ARTIFACT_DIR)
  before = _files(artifact)
  writer = subprocess.Popen([sys.executable, '-c', _KILLED_SAVE, artifact], cwd=helpers.ROOT, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
  assert writer.stdout.readline().strip() == 'WRITING'
  writer.send_signal(signal.SIGKILL)
  writer.wait()
  assert _files(artifact) == before  # the good artifact is untouched
  assert [os.path.basename(t) for t in _temps(copy)][0].startswith('.quantized.tmp-')
  with workdir.hold(copy):
    assert _temps(copy) == []
  storage.load(artifact)


def test_temps_of_killed_writers_are_removed_at_start(copy):
  """What a kill -9 leaves in each writing stage (atomic_write's files: report, lineage, samples, statistics; the
  artifact's temp dir; replace_dir killed between its renames), simulated; a run on the workdir clears them."""
  left = ['.report.json.k1ll3d.tmp', '.lineage.json.a1b2c3.tmp', 'samples/.00000000.npz.x9y8z7.tmp',
          'stats/.moments.npz.q1w2e3.tmp', 'rows/pq-1bit/.quantized.tmp-r4t5y6/codes.bin']  # fmt: skip
  for rel in left:
    os.makedirs(os.path.dirname(os.path.join(copy, rel)), exist_ok=True)
    open(os.path.join(copy, rel), 'w').write('half')
  os.rename(os.path.join(copy, 'quantized'), os.path.join(copy, 'quantized.old'))  # killed between the renames
  report = pipeline.run(_config(), copy)
  assert _temps(copy) == [] and not os.path.exists(os.path.join(copy, 'quantized.old'))
  assert report['timings_s']['quantize'] == 0.0  # the whole old artifact was put back and loaded


# ------------------------------------------------------------------------------------------ calibration checkpoints


@pytest.mark.parametrize('stored,message', [(None, 'without a fingerprint'), ('other', 'of another calibration')])
def test_calibration_checkpoint_needs_its_own_fingerprint(tmp_path, capsys, stored, message):
  from dpq_jax.calibrate import checkpoint as ckpt_lib
  from dpq_jax.calibrate import loop

  ckpt = ckpt_lib.Checkpointer(str(tmp_path / loop.CHECKPOINT_DIR), 1, 0, async_save=False)
  data = {'iterator': 'x'} if stored is None else {'iterator': 'x', 'fingerprint': stored}
  ckpt.save(1, {'a': np.zeros(2, np.float32)}, data, force=True)
  ckpt.close()
  line = _refused(capsys, loop.check_checkpoints, str(tmp_path), 'this-job')
  assert message in line, line
  if stored is not None:
    loop.check_checkpoints(str(tmp_path), stored)  # its own job resumes it
