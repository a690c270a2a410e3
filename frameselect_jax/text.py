"""Question text -> right-padded token ids for the selector.

Real runs use the Qwen2.5 tokenizer from a local directory (`hf.load_tokenizer`). Tiny
random presets, which have no tokenizer on disk, use `ByteTokenizer` (UTF-8 bytes), so
demos and tests run anywhere without downloads.
"""
from __future__ import annotations

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


def tokenize_questions(tokenizer: Tokenizer, prompts: Sequence[str], max_length: int,
                       vocab_size: int | None = None):
  """Right-padded (ids int32[b, max_length], mask int32[b, max_length]).

  A prompt longer than max_length is an error rather than silently truncated, and so is a
  token id outside the model's vocabulary.
  """
  ids = np.zeros((len(prompts), max_length), np.int32)
  mask = np.zeros((len(prompts), max_length), np.int32)
  for row, prompt in enumerate(prompts):
    tokens = tokenizer.encode(prompt, add_special_tokens=False)
    if len(tokens) > max_length:
      raise ValueError(f"prompt {row} has {len(tokens)} tokens, more than max_length="
                       f"{max_length}: {prompt[:80]!r}...")
    if vocab_size is not None and tokens and max(tokens) >= vocab_size:
      raise ValueError(f"prompt {row} has token id {max(tokens)} >= the LLM's vocab_size "
                       f"{vocab_size}: tokenizer and model do not match")
    ids[row, :len(tokens)] = tokens
    mask[row, :len(tokens)] = 1
  return ids, mask
