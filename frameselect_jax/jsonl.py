"""JSON Lines files: one JSON object per line, read with the file and line of any bad one
named, appended in whole lines only (json and the standard library; no JAX)."""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable


class JsonlError(ValueError):
  """A line that is not a JSON object (or fails a schema check), named by file and line."""


def read(path: str, check: Callable[[dict], None] | None = None) -> list[dict]:
  """Every object of a JSONL file, in order; blank lines are skipped.

  check(record) may raise ValueError; the error is re-raised as JsonlError naming the file
  and the line number. A last line without its newline (a writer killed mid-line) is an
  error too, unless it parses."""
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise JsonlError(f"{path}:{number}: not valid JSON ({error.msg})") from None
      if not isinstance(record, dict):
        raise JsonlError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
      if check is not None:
        try:
          check(record)
        except ValueError as error:
          raise JsonlError(f"{path}:{number}: {error}") from None
      records.append(record)
  return records


def drop_partial_line(path: str) -> bool:
  """Cuts a trailing half line (what a killed writer leaves) off the file; True if it did."""
  if not os.path.exists(path):
    return False
  with open(path, "rb+") as f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return False
    f.seek(size - 1)
    if f.read(1) == b"\n":
      return False
    # Find the last newline; everything after it is the half line.
    position, block = size, 1 << 16
    while position > 0:
      start = max(0, position - block)
      f.seek(start)
      chunk = f.read(position - start)
      cut = chunk.rfind(b"\n")
      if cut >= 0:
        f.truncate(start + cut + 1)
        return True
      position = start
    f.truncate(0)
    return True


def append(path: str, records: Iterable[dict]) -> int:
  """Appends each record as one line, flushed as it is written; returns the count.

  Each line is built whole and written with one call, and a half line left by an earlier,
  interrupted writer is cut off first, so the file only ever holds whole lines."""
  drop_partial_line(path)
  count = 0
  with open(path, "a", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, allow_nan=False) + "\n")
      f.flush()
      count += 1
  return count


class Appender:
  """`append` for a long run: the file is opened once (a half line an interrupted writer
  left is cut off first) and each record is written as one whole, flushed line."""

  def __init__(self, path: str):
    drop_partial_line(path)
    self.file = open(path, "a", encoding="utf-8")

  def write(self, records: Iterable[dict]) -> int:
    count = 0
    for record in records:
      self.file.write(json.dumps(record, allow_nan=False) + "\n")
      self.file.flush()
      count += 1
    return count

  def close(self):
    self.file.close()
