"""TensorBoard event files of the calibration loop, each logged step's records appended whole or not at all.

tensorboardX's SummaryWriter buffers records in a file object that a thread flushes, and flushes it again in
close and in an atexit hook: on a full disk each of those fails with its own traceback, after the run's one-line
error, and a half-written record stays in the file. This writer appends a logged step's records at once, in the
calling thread, through io_utils.append_bytes (a failed append is cut off again, and names the file), framed as
TensorBoard reads them (TFRecord: length, its masked CRC32C, the Event proto, its masked CRC32C), with
tensorboardX's protos.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from tensorboardX.proto import event_pb2, summary_pb2
from tensorboardX.record_writer import masked_crc32c

from dpq_jax import io_utils


def _record(event: event_pb2.Event) -> bytes:
  data = event.SerializeToString()
  header = struct.pack('<Q', len(data))
  return header + struct.pack('<I', masked_crc32c(header)) + data + struct.pack('<I', masked_crc32c(data))


class EventWriter:
  """One new events file in `logdir`; `purge_step` (a resumed run's first step) tells TensorBoard to drop what an
  earlier run logged from that step on, as SummaryWriter(purge_step=...) does."""

  def __init__(self, logdir: str, purge_step: int | None = None):
    io_utils.makedirs(logdir)
    now = time.time()
    name = f'events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}'
    self.path = os.path.join(logdir, name) if not io_utils.is_remote(logdir) else f'{logdir.rstrip("/")}/{name}'
    events = [event_pb2.Event(wall_time=now, file_version='brain.Event:2')]
    if purge_step is not None:
      start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
      events.append(event_pb2.Event(wall_time=now, step=purge_step, session_log=start))
    io_utils.append_bytes(self.path, b''.join(map(_record, events)))

  def scalars(self, rows: list[dict[str, float]]) -> None:
    """Appends one Event per row: its 'step' and every other key as a scalar tagged 'calibrate/<key>'."""
    events = []
    for row in rows:
      values = [summary_pb2.Summary.Value(tag=f'calibrate/{k}', simple_value=float(v)) for k, v in row.items()
                if k != 'step']  # fmt: skip
      events.append(event_pb2.Event(wall_time=time.time(), step=int(row['step']),
                                    summary=summary_pb2.Summary(value=values)))  # fmt: skip
    io_utils.append_bytes(self.path, b''.join(map(_record, events)))
