"""What the fault-injection tests share (test_faults_files.py, test_faults_runs.py): the tiny job, and checks that
a fault ended as main ends it (status 2, one `error:` line, no traceback) with nothing left half-written."""

import os

import pytest

from dpq_jax import errors, workdir
from tests import helpers


def config(**overrides):
  """load -> quantize of helpers.tiny_pipeline_config's tiny DiT, with 'section.name'=value overrides."""
  out = helpers.tiny_pipeline_config()
  out.stages = ('load', 'quantize')
  return helpers.set_keys(out, **overrides)


def refused(capsys, fn, *args) -> str:
  """fn(*args) under errors.reported: exit status 2, exactly one `error:` line, no traceback; that line."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as e, errors.reported():
    fn(*args)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith('error:')]
  assert e.value.code == 2 and len(lines) == 1 and 'Traceback' not in err, err
  return lines[0]


def walk(directory) -> list[str]:
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs)


def files(directory) -> dict:
  """{path: bytes} of every file under directory but the lock (which names the last holder)."""
  return {p: open(p, 'rb').read() for p in walk(directory) if os.path.basename(p) != workdir.LOCK}


def temps(directory) -> list[str]:
  """Paths under directory that are temps of a writer (workdir's names for them)."""
  paths = [os.path.join(r, n) for r, ds, fs in os.walk(directory) for n in ds + fs]
  return sorted(p for p in paths if workdir._STALE.fullmatch(os.path.basename(p)))


def truncate(path) -> None:
  os.truncate(path, os.path.getsize(path) // 2)
