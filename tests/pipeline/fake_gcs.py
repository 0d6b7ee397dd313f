"""An in-process stand-in for the two gcsfs calls dpq_jax/gcs_lock.py makes, with GCS's precondition semantics (not
GCS itself: what the lock does on a real bucket rests on gcsfs and GCS behaving as documented).

  pipe_file(path, data, metadata=, mode='create')   the upload with ifGenerationMatch=0: FileExistsError (gcsfs's
                                                     answer to HTTP 412) when the object exists
  call('GET' | 'PATCH' | 'DELETE', 'b/{}/o/{}', bucket, key, json=, json_out=, ifGenerationMatch=,
       ifMetagenerationMatch=)                       the JSON API's object resource: 404 -> FileNotFoundError, a
                                                     precondition that does not hold -> FileExistsError (412)

Every object has a generation (new on every create, from a global counter, as GCS's are unique), a metageneration
(1 on create, +1 per PATCH) and `updated`, the fake server's clock (`now`, which tests move) at the last create or
PATCH, as an RFC 3339 string. One lock serialises the calls, as the server orders requests.
"""

import datetime
import itertools
import threading


class FakeGcs:
  def __init__(self, now: float = 1.8e9):
    self.now = now
    self.objects: dict[tuple[str, str], dict] = {}
    self.calls: list[tuple] = []  # (method, key, preconditions) of every request, for the tests to inspect
    self._lock = threading.Lock()
    self._generations = itertools.count(1_700_000_000_000_000)

  def _updated(self) -> str:
    return datetime.datetime.fromtimestamp(self.now, datetime.timezone.utc).isoformat().replace('+00:00', 'Z')

  def _resource(self, bucket: str, key: str) -> dict:
    o = self.objects[bucket, key]
    return {'bucket': bucket, 'name': key, 'generation': str(o['generation']),
            'metageneration': str(o['metageneration']), 'updated': o['updated'], 'metadata': dict(o['metadata'])}  # fmt: skip

  def pipe_file(self, path: str, data: bytes, metadata: dict | None = None, mode: str = 'overwrite') -> None:
    bucket, _, key = path.partition('/')
    with self._lock:
      self.calls.append(('UPLOAD', key, {'ifGenerationMatch': '0'} if mode == 'create' else {}))
      if mode == 'create' and (bucket, key) in self.objects:
        raise FileExistsError(path)
      self.objects[bucket, key] = {'data': bytes(data), 'metadata': dict(metadata or {}), 'updated': self._updated(),
                                   'generation': next(self._generations), 'metageneration': 1}  # fmt: skip

  def call(self, method: str, template: str, bucket: str, key: str, json: dict | None = None, json_out: bool = False,
           **params):  # fmt: skip
    assert template == 'b/{}/o/{}', template
    with self._lock:
      self.calls.append((method, key, dict(params)))
      o = self.objects.get((bucket, key))
      if o is None:
        raise FileNotFoundError(f'gs://{bucket}/{key}')
      want_g, want_m = params.get('ifGenerationMatch'), params.get('ifMetagenerationMatch')
      if (want_g is not None and str(want_g) != str(o['generation'])) or (
        want_m is not None and str(want_m) != str(o['metageneration'])
      ):
        raise FileExistsError(f'gs://{bucket}/{key}')  # 412 Precondition Failed
      if method == 'GET':
        return self._resource(bucket, key)
      if method == 'PATCH':
        o['metadata'].update((json or {}).get('metadata', {}))
        o['metageneration'] += 1
        o['updated'] = self._updated()
        return self._resource(bucket, key)
      if method == 'DELETE':
        del self.objects[bucket, key]
        return {}, b''
      raise AssertionError(f'unexpected {method}')
