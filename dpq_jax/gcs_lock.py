"""One run per gs:// workdir: a lease on the object DIR/.lock, taken and kept with GCS preconditions only.

fcntl locks need a local file; GCS has none, but every write can carry a precondition that the server checks
atomically (https://cloud.google.com/storage/docs/request-preconditions), which gcsfs exposes: an upload with
`mode='create'` is sent with ifGenerationMatch=0 (it fails, HTTP 412, if the object exists), and `call()` passes any
other precondition as a query parameter. The lock:

  take      create DIR/.lock only if it does not exist (ifGenerationMatch=0); its custom metadata names the holder
            (host, pid, start time, lease seconds, a random token). No check-then-write race: of two runs, the
            server lets exactly one create it.
  held      a daemon thread renews the lease every lease/10 s by a metadata PATCH on exactly the generation and
            metageneration it holds (ifGenerationMatch, ifMetagenerationMatch), which moves the object's `updated`
            time (the server's clock). A 412 or 404 there means the lock was taken over: `lost` is set and the run
            stops at its next stage (workdir.Held.check) instead of writing on.
  refused   a run that finds the lock renewed within the holder's lease is refused, naming the holder.
  stale     a lock not renewed for longer than its lease (the holder died or cannot reach GCS) is deleted with
            preconditions on the very generation and metageneration that were seen stale, then taken by create as
            above: if the holder renewed meanwhile, or another run took it first, the delete or the create fails
            and this run is refused. Staleness compares the server's `updated` time with this machine's clock, so
            clocks that disagree by more than a small part of the lease (default 600 s) could misjudge it.
  release   delete with ifGenerationMatch/ifMetagenerationMatch of the lease held: never another run's lock.

What a lease cannot give: a holder frozen for longer than its lease (a suspended VM) is taken over and learns it
only at its next renewal; outputs it writes in between are not fenced. Tested against an in-process fake of gcsfs
that enforces these preconditions (tests/pipeline/fake_gcs.py), not against GCS itself.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from absl import logging

from dpq_jax import errors

LEASE_S = 600.0
_OBJECT = 'b/{}/o/{}'  # the JSON API's object resource, as gcsfs's call() formats it


def filesystem() -> Any:
  """gcsfs's filesystem (the `gcs` extra), as etils.epath uses it for gs:// paths."""
  try:
    import fsspec

    return fsspec.filesystem('gs')
  except ImportError as e:
    raise errors.WorkdirError(f'a gs:// workdir needs gcsfs (pip install dpq_jax[gcs]): {e}') from None


def _split(url: str) -> tuple[str, str]:
  bucket, _, key = url[len('gs://') :].partition('/')
  return bucket, key


def _seconds(rfc3339: str) -> float:
  return datetime.datetime.fromisoformat(rfc3339.replace('Z', '+00:00')).timestamp()


class Lease:
  """The lease on `url` (gs://BUCKET/DIR/.lock) through `fs` (gcsfs.GCSFileSystem or a fake with its call() and
  pipe_file()); see the module doc. `clock` is this machine's time (tests move it)."""

  def __init__(self, url: str, fs: Any = None, lease_s: float = LEASE_S, clock: Callable[[], float] = time.time):
    self.url, self.fs, self.lease_s, self.clock = url, fs if fs is not None else filesystem(), lease_s, clock
    self.bucket, self.key = _split(url)
    self.holder = {'host': socket.gethostname(), 'pid': str(os.getpid()), 'started': f'{clock():.0f}',
                   'lease_s': f'{lease_s:g}', 'token': uuid.uuid4().hex}  # fmt: skip
    self.held: tuple[str, str] | None = None  # (generation, metageneration) of our lock
    self.lost = threading.Event()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # ------------------------------------------------------------------ the object, with preconditions
  def _stat(self) -> dict | None:
    try:
      return self.fs.call('GET', _OBJECT, self.bucket, self.key, json_out=True)
    except FileNotFoundError:
      return None

  def _create(self) -> None:
    body = json.dumps(self.holder).encode()  # the same record, readable with `gcloud storage cat`
    self.fs.pipe_file(f'{self.bucket}/{self.key}', body, metadata=self.holder, mode='create')  # ifGenerationMatch=0

  def _delete(self, generation: str, metageneration: str) -> None:
    self.fs.call('DELETE', _OBJECT, self.bucket, self.key, ifGenerationMatch=generation,
                 ifMetagenerationMatch=metageneration)  # fmt: skip

  # ------------------------------------------------------------------ take, renew, release
  def acquire(self, what: str) -> None:
    """Takes the lease or raises WorkdirError naming its live holder (`what`: the workdir, for the message)."""
    for _ in range(5):  # each pass: the lock was released or taken over meanwhile
      try:
        self._create()
      except FileExistsError:
        pass
      now = self._stat()
      if now is None:
        continue
      meta = now.get('metadata') or {}
      if meta.get('token') == self.holder['token']:  # ours (also when a retried create found its own first try)
        self.held = (now['generation'], now['metageneration'])
        self._start()
        return
      age = self.clock() - _seconds(now['updated'])
      lease = float(meta.get('lease_s', self.lease_s))
      who = f'pid {meta.get("pid", "?")} on host {meta.get("host", "?")}'
      if age <= lease:
        raise errors.WorkdirError(
          f'{what} is in use by another run ({who}, {self.url} renewed {age:.0f} s ago, lease {lease:g} s); '
          'wait for it or choose another workdir'
        )
      try:  # stale: delete exactly what was seen, or nothing
        self._delete(now['generation'], now['metageneration'])
        logging.warning('%s: took over the lock of %s, not renewed for %.0f s (lease %g s)', what, who, age, lease)
      except (FileExistsError, FileNotFoundError):
        pass  # renewed, released or taken meanwhile: look again
    raise errors.WorkdirError(f'{what}: the lock {self.url} kept changing hands; try again')

  def renew(self) -> bool:
    """One renewal (the heartbeat's step); False, and `lost` set, when the lock is no longer ours."""
    if self.held is None:
      return False
    meta = dict(self.holder, renewed=f'{self.clock():.0f}')
    try:
      out = self.fs.call('PATCH', _OBJECT, self.bucket, self.key, json={'metadata': meta}, json_out=True,
                         ifGenerationMatch=self.held[0], ifMetagenerationMatch=self.held[1])  # fmt: skip
    except (FileExistsError, FileNotFoundError):  # 412 or 404: taken over or removed
      self.lost.set()
      return False
    self.held = (out['generation'], out['metageneration'])
    return True

  def _start(self) -> None:
    def beat() -> None:
      last = self.clock()
      while not self._stop.wait(self.lease_s / 10):
        try:
          if not self.renew():
            return
          last = self.clock()
        except Exception as e:  # network trouble: keep trying while the lease lasts
          if self.clock() - last > self.lease_s:
            logging.warning('%s: lease not renewed for %.0f s (%s); the lock may be taken', self.url, self.lease_s, e)
            self.lost.set()
            return

    self._thread = threading.Thread(target=beat, name=f'lease {self.url}', daemon=True)
    self._thread.start()

  def release(self) -> None:
    """Stops renewing and deletes the lock if it is still this lease's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self.held is not None and not self.lost.is_set():
      try:
        self._delete(*self.held)
      except (FileExistsError, FileNotFoundError):
        pass  # not ours any more
    self.held = None
