"""The lease that holds a gs:// workdir (dpq_jax/gcs_lock.py), against tests/pipeline/fake_gcs.py: an in-process fake
of the gcsfs calls it makes, enforcing GCS's preconditions (create only if absent; PATCH and DELETE only on the
generation and metageneration named). Not GCS itself. The run-level case (a second pipeline run on a gs:// workdir)
is in test_gcs_paths.py, beside the mocked gs:// file system it needs.
"""

import threading
import time

import pytest

from dpq_jax import errors, gcs_lock, workdir
from tests.pipeline.fake_gcs import FakeGcs

URL = 'gs://bkt/runs/w/.lock'


def lease(fs: FakeGcs, pid: str, lease_s: float = 600.0) -> gcs_lock.Lease:
  """A lease on URL whose clock is the fake server's (no skew), holder `pid`."""
  out = gcs_lock.Lease(URL, fs, lease_s=lease_s, clock=lambda: fs.now)
  out.holder['pid'] = pid
  return out


def holder(fs: FakeGcs) -> str | None:
  o = fs.objects.get(('bkt', 'runs/w/.lock'))
  return None if o is None else o['metadata']['pid']


def test_a_second_holder_is_refused_naming_the_first_and_gets_it_once_released():
  fs = FakeGcs()
  a, b = lease(fs, '111'), lease(fs, '222')
  a.acquire('W')
  assert fs.calls[0] == ('UPLOAD', 'runs/w/.lock', {'ifGenerationMatch': '0'})  # create-only, not check-then-write
  fs.now += 30
  with pytest.raises(errors.WorkdirError, match=r'W is in use by another run \(pid 111 on host .*renewed 30 s ago'):
    b.acquire('W')
  assert holder(fs) == '111'
  stored = fs.objects['bkt', 'runs/w/.lock']
  a.release()  # deletes exactly the generation and metageneration it holds
  want = {'ifGenerationMatch': str(stored['generation']), 'ifMetagenerationMatch': str(stored['metageneration'])}
  assert fs.calls[-1] == ('DELETE', 'runs/w/.lock', want)
  b.acquire('W')
  assert holder(fs) == '222'
  b.release()
  assert holder(fs) is None


def test_renewals_keep_a_lock_past_its_lease_and_a_stale_one_is_taken_over():
  fs = FakeGcs()
  a, b = lease(fs, '111', lease_s=600), lease(fs, '222', lease_s=600)
  a.acquire('W')
  for _ in range(3):  # 1500 s in all, renewed every 500 s: never stale
    fs.now += 500
    assert a.renew()
    with pytest.raises(errors.WorkdirError, match='pid 111'):
      b.acquire('W')
  fs.now += 601  # a stopped renewing (died, or cannot reach GCS) for longer than its lease
  b.acquire('W')
  assert holder(fs) == '222'
  assert not a.renew() and a.lost.is_set()  # a learns it at its next renewal (412), and
  a.release()  # its release leaves b's lock alone (the delete names a's generation)
  assert holder(fs) == '222'
  b.release()


class _DeleteHook:
  """fs, but `hook` runs once just before the first DELETE goes to it (the other taker, acting in between)."""

  def __init__(self, fs, hook):
    self.fs, self.hook = fs, hook

  def pipe_file(self, *a, **k):
    return self.fs.pipe_file(*a, **k)

  def call(self, method, *a, **k):
    if method == 'DELETE' and self.hook is not None:
      hook, self.hook = self.hook, None
      hook()
    return self.fs.call(method, *a, **k)


def test_of_two_runs_taking_one_stale_lock_exactly_one_gets_it():
  """c sees the stale lock and deletes it; b takes it over first, between c's look and c's delete: c's delete names
  the stale generation, fails (412), and c, looking again, finds b's live lock and is refused."""
  fs = FakeGcs()
  dead = lease(fs, '111', lease_s=60)
  dead.acquire('W')
  dead._stop.set()  # killed: no more renewals (its thread ends)
  fs.now += 61
  b = lease(fs, '222')
  c = gcs_lock.Lease(URL, _DeleteHook(fs, lambda: b.acquire('W')), clock=lambda: fs.now)
  with pytest.raises(errors.WorkdirError, match='pid 222'):
    c.acquire('W')
  assert holder(fs) == '222'
  deletes = [p for m, _, p in fs.calls if m == 'DELETE']
  assert len(deletes) == 2 and deletes[0] == deletes[1]  # both deleted exactly the stale generation; one won
  b.release()


def test_many_runs_at_once_one_holder():
  fs = FakeGcs()
  leases = [lease(fs, str(i)) for i in range(8)]
  won, refused = [], []

  def take(x):
    try:
      x.acquire('W')
      won.append(x.holder['pid'])
    except errors.WorkdirError:
      refused.append(x.holder['pid'])

  threads = [threading.Thread(target=take, args=(x,)) for x in leases]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(won) == 1 and len(refused) == 7 and holder(fs) == won[0]
  for x in leases:
    x.release()
  assert holder(fs) is None


def test_the_heartbeat_thread_renews_and_a_lost_lock_stops_the_run():
  fs = FakeGcs()
  a = gcs_lock.Lease(URL, fs, lease_s=0.5)  # renews every 0.05 s of real time
  a.acquire('W')
  deadline = time.monotonic() + 10
  while fs.objects['bkt', 'runs/w/.lock']['metageneration'] < 3 and time.monotonic() < deadline:
    time.sleep(0.02)
  assert fs.objects['bkt', 'runs/w/.lock']['metageneration'] >= 3  # two renewals at least
  held = workdir.Held('gs://bkt/runs/w', a)
  held.check()  # still ours
  with fs._lock:  # taken over behind its back (as after a whole lease without renewal)
    fs.objects['bkt', 'runs/w/.lock']['generation'] += 1
  deadline = time.monotonic() + 10
  while not a.lost.is_set() and time.monotonic() < deadline:
    time.sleep(0.02)
  with pytest.raises(errors.WorkdirError, match='lost its lock gs://bkt/runs/w/.lock'):
    held.check()
  a.release()
  assert holder(fs) is not None  # not deleted: it is not a's any more
