"""How errors are told to a user: one line each.

The line is drawn between the user's mistakes and ours. A problem with what the user gave (a
flag, a config value, a file, a checkpoint) raises `InputError` (or the trainer's ConfigError,
one of them) with a message that names the input and the cause; a command prints it as one
`error:` line and exits with status 2. Anything else is a bug here and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading

INPUT_ERROR_STATUS = 2


class InputError(ValueError):
  """Something the user gave is wrong, and they can fix it."""


def one_line(error: BaseException, limit: int = 200) -> str:
  """The exception's type and the first line of its message, cut at `limit` characters
  (decord's errors carry multi-line C++ traces)."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text if len(text) <= limit else text[:limit] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def exit_with(message: str, prefix: str = "error"):
  """Prints `<prefix>: message` as one line on stderr and exits with status 2."""
  print(f"{prefix}: {' '.join(str(message).split())}", file=sys.stderr)
  mute_stderr()
  sys.exit(INPUT_ERROR_STATUS)


def mute_stderr() -> None:
  """For a command about to exit after its one error line: what libraries print while the
  interpreter shuts down (orbax's unfinished reads of a damaged checkpoint, garbage-collected
  with a warning each) would bury that line. Never call it in a process that goes on."""
  sys.stderr.flush()
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  os.close(devnull)
  sys.stderr = open(os.devnull, "w")


def check_can_create(path: str, what: str) -> None:
  """Raises InputError unless `path` is a directory, or one could be made there, that this
  process can write into. Creates nothing that stays: a failed start leaves no empty folder."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f"{what} {path}: exists and is not a directory")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise InputError(f"{what} {path}: {existing} is not a directory")
  try:
    probe = tempfile.mkdtemp(prefix=".write-probe-", dir=existing)
  except OSError as error:
    raise InputError(
      f"{what} {path}: cannot create it (writing in {existing}: {error.strerror})"
    ) from None
  os.rmdir(probe)


def check_can_write_file(path: str, what: str) -> None:
  """Raises InputError unless `path` could be written: its folder exists and takes files, and
  it is not itself a folder. Creates nothing."""
  path = os.path.abspath(path)
  folder = os.path.dirname(path)
  if os.path.isdir(path):
    raise InputError(f"{what} {path}: is a folder, not a file")
  if not os.path.isdir(folder):
    raise InputError(f"{what} {path}: the folder {folder} does not exist")
  check_can_create(folder, what)


def parse_shard(text: str) -> tuple[int, int]:
  """'--shard=i/N' -> (i, N), with 0 <= i < N; else InputError."""
  try:
    i, n = (int(v) for v in str(text).split("/"))
  except ValueError:
    raise InputError(f"--shard={text!r}: expected i/N, e.g. 0/4") from None
  if not (n >= 1 and 0 <= i < n):
    raise InputError(f"--shard={text!r}: need 0 <= i < N")
  return i, n


def take_shard(items: list, shard: tuple[int, int]) -> list:
  """Shard (i, N)'s share of `items`: every N-th, from the i-th."""
  i, n = shard
  return [item for index, item in enumerate(items) if index % n == i]


def write_atomically(path: str, text: str) -> None:
  """Writes a whole file or none: a temporary file beside it (named by process and thread, so
  two writers of one path never share it), then a rename."""
  tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def parse_flags(argv):
  """absl's `flags_parser` for our commands (`app.run(main, flags_parser=parse_flags)`): a
  mistake on the command line (an unknown flag, a value of the wrong type, a config file that
  does not load, a --config.x override naming no field) is one `error:` line and exit 2,
  instead of absl's multi-line FATAL or ml_collections' traceback."""
  from absl import flags

  try:
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS.config is not None:
      flags.FLAGS.config.keys()  # ml_collections loads the file lazily: fail here, not later
    return remaining
  except OSError as error:  # the config file cannot be found or read
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    given = next((a for a in argv[1:] if a.startswith("--config=")), "--config")
    exit_with(f"{given}: cannot load the config file ({lines[-1]})")
  except flags.Error as error:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
    exit_with(message)
  except (AttributeError, KeyError) as error:
    # ml_collections, for an override of a field that does not exist: the field's name, and
    # perhaps a suggestion, inside a nested KeyError's repr.
    text = str(error)
    for override in (a for a in argv[1:] if a.startswith("--config.")):
      path = override[2:].split("=")[0].split(".")[1:]
      if any(re.search(rf"\b{re.escape(part)}\b", text) for part in path):
        suggestion = re.search(r'Did you mean "([^"]+)"', text)
        hint = f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""
        exit_with(f"{override}: the config has no field {'.'.join(path)!r}{hint}")
    raise
