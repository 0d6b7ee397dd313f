"""Atomic writes: a failed write keeps the old file; new files get the usual permissions, not mkstemp's 0600."""

import os

import pytest

from dpq_jax import io_utils
from tests import helpers


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
  path = tmp_path / 'out.txt'
  io_utils.write_text(str(path), 'good')
  with pytest.raises(RuntimeError):
    io_utils.atomic_write(str(path), helpers.dies_half_written)
  assert path.read_text() == 'good'
  assert os.listdir(tmp_path) == ['out.txt']


def test_written_files_follow_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    io_utils.write_json(str(tmp_path / 'r.json'), {'a': 1})
  finally:
    os.umask(old)
  assert (tmp_path / 'r.json').stat().st_mode & 0o777 == 0o644
