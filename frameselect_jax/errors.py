"""How errors are told to a user: one line each."""

from __future__ import annotations


def one_line(error: BaseException, limit: int = 200) -> str:
  """The exception's type and the first line of its message, cut at `limit` characters
  (decord's errors carry multi-line C++ traces)."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text if len(text) <= limit else text[:limit] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__
