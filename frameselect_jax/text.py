"""Prompts, and question text -> right-padded token ids for the selector.

Real runs use the Qwen2.5 tokenizer from a local directory (`hf.load_tokenizer`). Tiny
random presets, which have no tokenizer on disk, use a built-in one (BUILTIN_TOKENIZERS):
`ByteTokenizer` (UTF-8 bytes) or `WordHashTokenizer` (whole words, as a pretrained
tokenizer's vocabulary would give), so demos and tests run anywhere without downloads.
"""

from __future__ import annotations

import re
import zlib
from typing import Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
  def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class ByteTokenizer:
  """UTF-8 bytes as token ids 0..255; ids 256 (pad) and 257 (eos) are special."""

  pad_token_id = 256
  eos_token_id = 257
  vocab_size = 258

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class WordHashTokenizer:
  """Words and punctuation marks as tokens, each hashed (crc32) to an id in
  [2, vocab_size); 0 is pad, 1 is eos. Needs no vocabulary file and takes any text; two
  pieces may share an id (rarely, at a large vocab_size). Not invertible: no `decode`."""

  pad_token_id = 0
  eos_token_id = 1
  PIECES = re.compile(r"\w+|[^\w\s]")

  def __init__(self, vocab_size: int = 1024):
    if vocab_size < 3:
      raise ValueError(f"vocab_size must be >= 3, got {vocab_size}")
    self.vocab_size = vocab_size

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return [
      2 + zlib.crc32(piece.encode("utf-8")) % (self.vocab_size - 2)
      for piece in self.PIECES.findall(text)
    ]


# Tokenizers a config or the API can name instead of a tokenizer directory.
BUILTIN_TOKENIZERS = {"byte": ByteTokenizer, "words": WordHashTokenizer}


def builtin_tokenizer(name: str):
  """The built-in tokenizer of that name, or None when `name` is not one (a directory)."""
  make = BUILTIN_TOKENIZERS.get(name)
  return make() if make else None


OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def question_with_options(question: str, options: Sequence[str] = ()) -> str:
  """'Question: ...' followed by the options lettered (A), (B), ... when there are any."""
  if not question.strip():
    raise ValueError("the question is empty")
  if len(options) > len(OPTION_LETTERS):
    raise ValueError(f"at most {len(OPTION_LETTERS)} options, got {len(options)}")
  text = f"Question: {question.strip()}"
  if options:
    text += "\nOptions:\n" + "\n".join(f"({OPTION_LETTERS[i]}) {o}" for i, o in enumerate(options))
  return text


def question_prompt(question: str, options: Sequence[str] = ()) -> str:
  """The text the selector sees after the visual tokens."""
  return question_with_options(question, options) + "\nWhich frames help answer the question?"


def instruction_prompt(question: str, options: Sequence[str] = ()) -> str:
  """Stage-1 visual instruction following: the text before the answer."""
  return question_with_options(question, options) + "\nAnswer:"


def tokenize_questions(
  tokenizer: Tokenizer, prompts: Sequence[str], max_length: int, vocab_size: int | None = None
):
  """Right-padded (ids int32[b, max_length], mask int32[b, max_length]).

  A prompt longer than max_length is an error rather than silently truncated, and so is a
  token id outside the model's vocabulary.
  """
  ids = np.zeros((len(prompts), max_length), np.int32)
  mask = np.zeros((len(prompts), max_length), np.int32)
  for row, prompt in enumerate(prompts):
    tokens = tokenizer.encode(prompt, add_special_tokens=False)
    if len(tokens) > max_length:
      raise ValueError(
        f"prompt {row} has {len(tokens)} tokens, more than max_length="
        f"{max_length}: {prompt[:80]!r}..."
      )
    if vocab_size is not None and tokens and max(tokens) >= vocab_size:
      raise ValueError(
        f"prompt {row} has token id {max(tokens)} >= the LLM's vocab_size "
        f"{vocab_size}: tokenizer and model do not match"
      )
    ids[row, : len(tokens)] = tokens
    mask[row, : len(tokens)] = 1
  return ids, mask
