"""TensorBoard scalars without TensorFlow: event files from tensorboard's own protos.

An event file is a sequence of records, each `length (uint64 LE) | masked crc32c of the
length | Event proto | masked crc32c of the proto` (the TFRecord framing TensorBoard reads).
The first event names the file version; every later one holds one step's scalars as
`simple_value`s. Importing TensorFlow (what clu's writers do) costs seconds per process;
this costs a fraction of one.

Local files are appended to as scalars arrive. Object stores (gs://) cannot append, so a
remote file is rewritten whole on `flush` (scalar logs are small: ~100 bytes per step).
"""

from __future__ import annotations

import os
import socket
import struct
import time

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from tml_jax import paths


def record(data: bytes) -> bytes:
  """One TFRecord-framed record."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


class ScalarWriter:
  """`write_scalars(step, {name: value})`, `flush()`, `close()` into one new event file."""

  def __init__(self, logdir: str):
    paths.makedirs(logdir)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.v2"
    self.path = paths.join(logdir, name)
    self._remote = paths.is_remote(self.path)
    self._written: list[bytes] = []  # remote: everything, rewritten on flush
    self._pending = [record(event_pb2.Event(wall_time=time.time(),
                                            file_version="brain.Event:2").SerializeToString())]
    self.flush()

  def write_scalars(self, step: int, scalars: dict):
    ev = event_pb2.Event(wall_time=time.time(), step=int(step))
    for tag, value in scalars.items():
      ev.summary.value.add(tag=str(tag), simple_value=float(value))
    self._pending.append(record(ev.SerializeToString()))
    if not self._remote:
      self.flush()

  def flush(self):
    if not self._pending:
      return
    if self._remote:
      self._written += self._pending
      paths.write_bytes(self.path, b"".join(self._written))
    else:
      with open(self.path, "ab") as f:
        f.write(b"".join(self._pending))
    self._pending = []

  def close(self):
    self.flush()
