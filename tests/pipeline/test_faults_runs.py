"""Fault injection, runs: unusable workdirs (a full disk simulated as ENOSPC from the writer, which runs everywhere;
a real one, where a tmpfs can be mounted, is test_faults_disk.py's), config and flag errors, a concurrent run,
killed writers. Each ends as main ends it (tests/pipeline/faults.py) with nothing half-written or clobbered; subprocesses only where a
second process is the point (the lock holder, kill -9) or flag parsing is (it exits before importing JAX).
"""

import errno
import os
import shutil
import signal
import subprocess
import sys

import pytest

from dpq_jax import convert, io_utils, pipeline, workdir
from dpq_jax.quant import storage
from tests import helpers
from tests.pipeline import faults

# ------------------------------------------------------------------------------------------ unusable workdirs


def test_workdir_that_is_a_file_or_under_one(tmp_path, capsys):
  f = tmp_path / 'f'
  f.write_text('mine')
  for where in (f, f / 'w'):
    line = faults.refused(capsys, pipeline.run, faults.config(), str(where))
    assert str(where) in line and ('not a directory' in line or 'is a file' in line), line
  assert f.read_text() == 'mine'


def test_workdir_that_is_not_writable(tmp_path, capsys, monkeypatch):
  ro = tmp_path / 'ro'
  ro.mkdir()
  ro.chmod(0o555)
  if os.access(ro, os.W_OK):  # root ignores permissions: what os.access reports on a read-only mount is simulated
    real = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode, **k: False if str(p) == str(ro) else real(p, mode, **k))
  line = faults.refused(capsys, pipeline.run, faults.config(), str(ro / 'w'))
  assert f'{ro} is not writable' in line, line
  ro.chmod(0o755)
  assert os.listdir(ro) == []


def test_full_disk_leaves_the_previous_artifact(faults_copy, capsys, monkeypatch):
  """ENOSPC from the artifact writer (simulated, see the module doc): one line, the old artifact untouched."""
  before = faults.files(os.path.join(faults_copy, storage.ARTIFACT_DIR))

  def full(self, kind, path, data, **meta):
    raise OSError(errno.ENOSPC, 'No space left on device', os.path.join(faults_copy, 'quantized', storage.FILES[kind]))

  monkeypatch.setattr(storage._Writer, 'add', full)
  line = faults.refused(
    capsys, pipeline.run, faults.config(**{'quant.seed': 7}), faults_copy
  )  # another seed: recomputed
  assert 'no space left' in line, line
  assert faults.files(os.path.join(faults_copy, storage.ARTIFACT_DIR)) == before and faults.temps(faults_copy) == []


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
  'overrides,message',
  [
    ({'quant.pattern': r'blocks_(\d+'}, "config.quant.pattern: 'blocks_(\\\\d+' is not a valid regex"),
    ({'model.input_size': 10}, 'config.model.input_size=10: expected a multiple of the patch size 4'),
  ],
)
def test_bad_config_values_before_any_work(tmp_path, capsys, overrides, message):
  line = faults.refused(capsys, pipeline.run, faults.config(**overrides), str(tmp_path / 'w'))
  assert message in line, line
  assert not (tmp_path / 'w').exists()


def test_unreachable_budget_is_refused_before_quantize_writes(tmp_path, capsys, monkeypatch):
  from dpq_jax.quant import surgery

  monkeypatch.setattr(surgery, 'quantize_params', lambda *a, **k: pytest.fail('k-means ran'))
  config = faults.config(**{'compress.budget': 1e6})
  config.stages = ('load', 'quantize', 'compress')
  line = faults.refused(capsys, pipeline.run, config, str(tmp_path / 'w'))
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


# ------------------------------------------------------------------------------------------ concurrent runs


_HOLDER = (
  'import sys, time; from dpq_jax import workdir; held = workdir.hold(sys.argv[1]); held.__enter__(); '
  'print("HELD", flush=True); time.sleep(120)'
)


def test_second_run_is_refused_naming_the_holder(faults_copy, capsys):
  before = faults.files(faults_copy)
  holder = subprocess.Popen(
    [sys.executable, '-c', _HOLDER, faults_copy], cwd=helpers.ROOT, stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == 'HELD'
    line = faults.refused(capsys, pipeline.run, faults.config(**{'quant.seed': 7}), faults_copy)
    assert f'pid {holder.pid}' in line and 'in use by another run' in line, line
  finally:
    holder.kill()
    holder.wait()
  assert faults.files(faults_copy) == before
  with workdir.hold(faults_copy):  # the lock of a killed holder is free again
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


def test_kill_9_while_writing_the_artifact_and_the_next_run_cleans_up(faults_copy):
  """A real kill -9 in storage.save (quantize, compress and calibrate all write through it)."""
  artifact = os.path.join(faults_copy, storage.ARTIFACT_DIR)
  before = faults.files(artifact)
  writer = subprocess.Popen([sys.executable, '-c', _KILLED_SAVE, artifact], cwd=helpers.ROOT, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
  assert writer.stdout.readline().strip() == 'WRITING'
  writer.send_signal(signal.SIGKILL)
  writer.wait()
  assert faults.files(artifact) == before  # the good artifact is untouched
  assert [os.path.basename(t) for t in faults.temps(faults_copy)][0].startswith('.quantized.tmp-')
  with workdir.hold(faults_copy):
    assert faults.temps(faults_copy) == []
  storage.load(artifact)


_STALLED_CONVERT = """
import sys, time
from dpq_jax import convert, io_utils
spec, params = convert.load_converted(sys.argv[1])
def stall(tmp, directory, commit_file=None):  # everything written, not yet moved into place
  print('WRITING', flush=True)
  time.sleep(120)
io_utils.replace_dir = stall
convert.save_converted(sys.argv[2], spec, params)
"""


def test_converter_killed_mid_write_is_cleaned_by_the_next_one(tiny_converted, tmp_path):
  """Converted checkpoints live outside any workdir: a real kill -9 of the converter leaves its temp dir beside
  the output; the next conversion into that output removes it, but never the temp of a converter still running,
  and puts back a DIR.old that a kill between replace_dir's renames left."""
  spec, params, source = tiny_converted
  out = tmp_path / 'dit'
  shutil.copytree(source, out)
  before = faults.files(out)

  def stalled():
    p = subprocess.Popen([sys.executable, '-c', _STALLED_CONVERT, source, str(out)], cwd=helpers.ROOT,
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout.readline().strip() == 'WRITING'
    return p

  killed, running = stalled(), None
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  (dead,) = [n for n in os.listdir(tmp_path) if n.startswith('.dit.tmp-')]
  assert faults.files(out) == before  # the good output is untouched
  try:
    running = stalled()
    (live,) = [n for n in os.listdir(tmp_path) if n.startswith('.dit.tmp-') and n != dead]
    convert.save_converted(str(out), spec, params)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith('.dit.tmp-')) == [live]  # the live one stays
    saved = faults.files(out)
  finally:
    if running is not None:
      running.kill()
      running.wait()
  convert.load_converted(str(out))
  os.rename(out, str(out) + '.old')  # killed between replace_dir's renames
  assert io_utils.remove_dead_builds(str(tmp_path), 'dit') == [str(tmp_path / f'.dit.tmp-{live[9:]}'), f'{out}.old']
  assert sorted(os.listdir(tmp_path)) == ['dit'] and faults.files(out) == saved


def test_temps_of_killed_writers_are_removed_at_start(faults_copy):
  """What a kill -9 leaves in each writing stage (atomic_write's files: report, lineage, samples, statistics; the
  artifact's temp dir; replace_dir killed between its renames), simulated; a run on the workdir clears them."""
  left = ['.report.json.k1ll3d.tmp', '.lineage.json.a1b2c3.tmp', 'samples/.00000000.npz.x9y8z7.tmp',
          'stats/.moments.npz.q1w2e3.tmp', 'rows/pq-1bit/.quantized.tmp-r4t5y6/codes.bin']  # fmt: skip
  for rel in left:
    os.makedirs(os.path.dirname(os.path.join(faults_copy, rel)), exist_ok=True)
    open(os.path.join(faults_copy, rel), 'w').write('half')
  os.rename(
    os.path.join(faults_copy, 'quantized'), os.path.join(faults_copy, 'quantized.old')
  )  # killed between the renames
  report = pipeline.run(faults.config(), faults_copy)
  assert faults.temps(faults_copy) == [] and not os.path.exists(os.path.join(faults_copy, 'quantized.old'))
  assert report['timings_s']['quantize'] == 0.0  # the whole old artifact was put back and loaded


def test_a_bug_keeps_its_traceback():
  """Only user faults are one line: anything else (a bug) propagates, so its traceback shows."""
  from dpq_jax import errors

  with pytest.raises(KeyError), errors.reported():
    raise KeyError('a bug')
  with pytest.raises(OSError), errors.reported():
    raise OSError(5, 'Input/output error')  # EIO: not a fault the user fixes
