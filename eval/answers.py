"""Reading a downstream model's answers: the option a multiple-choice reply picks, and the
yes/score verdict of the open-ended LLM judge (Video-ChatGPT / ActivityNet-QA protocol).

Both readers return None when nothing can be read, rather than guess: an unreadable answer
counts as wrong and the caller lists it, while a wrong guess would silently move accuracy.
"""

import ast
import json
import re
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Words that say a choice follows: "Answer: B", "The correct answer is (C)", "Option B".
_CUE = r"(?i:\b(?:answer|option|choice)(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?)\s*[:\-]?\s*"
# After a cue, a letter reads as a choice when bracketed, upper-case and not the start of a
# word, or lower-case and followed by punctuation or the end ("the answer is a dog" is text).
_AFTER_CUE = re.compile(
  _CUE + r"(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?![A-Za-z'])|([a-z])(?=[.,;:!?)\]]|\s*$))"
)
_BRACKETED = re.compile(r"[(\[]([A-Za-z])[)\]]")
# At the very start: "B", "B.", "B)", "B:" (not "A.I."), or a letter then a space.
_START_PUNCT = re.compile(r"^([A-Za-z])(?:[.:)](?![A-Za-z0-9])|\s*$)")
_START_SPACE = re.compile(r"^([A-Za-z])\s+(?:[-\u2013\u2014:]\s*)?(.*)$", re.S)
# Last resort: a lone upper-case letter in prose ("I think B."); never the words "A" and "I".
_LONE_CAPITAL = re.compile(r"(?<![A-Za-z'])([B-HJ-Z])(?![A-Za-z'])")


def _norm(text: str) -> str:
  """Lower-case, whitespace collapsed, surrounding quotes and punctuation dropped."""
  return " ".join(text.lower().split()).strip(" \t\"'`.,;:!?")


def parse_choice(text: str, options: Sequence[str]) -> int | None:
  """The 0-based option a multiple-choice answer picks, or None when it cannot be read.

  In order: the whole answer equal to an option text; a letter after "answer is"/"Answer:"/
  "Option"; a letter opening the answer ("B", "(B)", "B.", "B) a blue car"); a single
  bracketed letter anywhere; the longest option text contained in the answer; a single lone
  capital letter. Letters beyond len(options) are not answers. The article "A" in prose ("A
  man is running") is never read as option A.
  """
  if not isinstance(text, str) or not options:
    return None
  count = min(len(options), len(LETTERS))
  body = text.replace("*", "").replace("`", "").strip()  # markdown: **B**, `B`
  if not body:
    return None
  norm_options = [_norm(o) for o in options]
  norm_body = _norm(body)
  if norm_body and norm_body in norm_options:
    return norm_options.index(norm_body)

  def index(letter: str) -> int | None:
    i = LETTERS.index(letter.upper())
    return i if i < count else None

  # A letter after a cue; the last cue wins (replies reason first and conclude last).
  for match in reversed(list(_AFTER_CUE.finditer(body))):
    i = index(next(g for g in match.groups() if g))
    if i is not None:
      return i

  # A letter opening the answer.
  match = _BRACKETED.match(body) or _START_PUNCT.match(body)
  if match and index(match.group(1)) is not None:
    return index(match.group(1))
  match = _START_SPACE.match(body)
  if match:
    letter, rest = match.groups()
    i = index(letter)
    if i is not None:
      rest, name = _norm(rest), norm_options[i]
      # "B a blue car"; after the words "a"/"I" the rest must be the option text exactly.
      names_it = bool(name) and (rest == name if letter in "aAiI" else rest.startswith(name))
      if names_it or (letter.isupper() and letter not in "AI"):
        return i

  # One distinct bracketed letter anywhere: "It is a red car (C)".
  found = {index(m.group(1)) for m in _BRACKETED.finditer(body)} - {None}
  if len(found) == 1:
    return found.pop()

  # Option texts inside the answer, as whole words: the longest wins ("a dog running" over
  # "dog"), but a second option named outside it makes the answer unreadable.
  def words(option: str) -> str:
    return r"(?<!\w)" + re.escape(option) + r"(?!\w)"

  hits = sorted({o for o in norm_options if o and re.search(words(o), norm_body)}, key=len)
  if hits:
    rest = re.sub(words(hits[-1]), " | ", norm_body)
    if any(re.search(words(o), rest) for o in hits[:-1]):
      return None
    return norm_options.index(hits[-1])

  found = {index(m.group(1)) for m in _LONE_CAPITAL.finditer(body)} - {None}
  return found.pop() if len(found) == 1 else None


# The judge prompt of Video-ChatGPT's quantitative_evaluation/evaluate_activitynet_qa.py
# (github.com/mbzuai-oryx/Video-ChatGPT), reused unchanged by lmms-eval's activitynetqa task
# (EvolvingLMMs-Lab/lmms-eval, lmms_eval/tasks/activitynetqa/utils.py, get_eval). Kept
# byte-for-byte, joins without spaces and the "score: 4.8" example included, so that scores
# stay comparable with published ones.
_JUDGE_SYSTEM = (
  "You are an intelligent chatbot designed for evaluating the correctness of generative outputs "
  "for question-answer pairs. "
  "Your task is to compare the predicted answer with the correct answer and determine if they "
  "match meaningfully. Here's how you can accomplish the task:"
  "------"
  "##INSTRUCTIONS: "
  "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
  "- Consider synonyms or paraphrases as valid matches.\n"
  "- Evaluate the correctness of the prediction compared to the answer."
)
_JUDGE_USER = (
  "Please evaluate the following video-based question-answer pair:\n\n"
  "Question: {question}\n"
  "Correct Answer: {answer}\n"
  "Predicted Answer: {prediction}\n\n"
  "Provide your evaluation only as a yes/no and score where the score is an integer value "
  "between 0 and 5, with 5 indicating the highest meaningful match. "
  "Please generate the response in the form of a Python dictionary string with keys 'pred' and "
  "'score', where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in "
  "INTEGER, not STRING."
  "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary "
  "string. "
  "For example, your response should look like this: {{'pred': 'yes', 'score': 4.8}}."
)


def judge_messages(question: str, answer: str, prediction: str) -> list[dict]:
  """Chat messages (system + user) asking an LLM judge whether `prediction` matches `answer`."""
  return [
    {"role": "system", "content": _JUDGE_SYSTEM},
    {
      "role": "user",
      "content": _JUDGE_USER.format(question=question, answer=answer, prediction=prediction),
    },
  ]


def _score(value) -> float | None:
  """A score in 0..5 (4, 4.0, "4" or 4.8: the protocol's own example reply has 4.8); None for
  anything else (7, -1, True)."""
  if isinstance(value, bool):
    return None
  if isinstance(value, str):
    value = value.strip()
    if not re.fullmatch(r"\d+(?:\.\d*)?", value):
      return None
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if 0 <= value <= 5 else None


def _verdict(value) -> bool | None:
  """'yes' -> True, 'no' -> False (any case, surrounding spaces); None for anything else."""
  if not isinstance(value, str):
    return None
  return {"yes": True, "no": False}.get(value.strip().lower())


# A score as the judge writes it: a signed number (a minus sign is read, then refused).
_NUMBER = r"(-?\d+(?:\.\d+)?)"


def parse_judgement(text: str) -> tuple[bool, float] | None:
  """(correct, score) from a judge's reply, or None when it cannot be read.

  Reads {'pred': 'yes', 'score': 4} (single or double quotes, code fences or prose around
  it), then loose forms: "pred: no score: 1", "yes, 4". The score must lie in 0..5.
  """
  if not isinstance(text, str):
    return None
  for block in re.findall(r"\{[^{}]*\}", text):
    for load in (ast.literal_eval, json.loads):
      try:
        value = load(block)
      except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        continue
      if isinstance(value, dict) and "pred" in value and "score" in value:
        correct, score = _verdict(value["pred"]), _score(value["score"])
        if correct is None or score is None:
          return None
        return correct, score

  lowered = text.lower()
  keyed = re.search(r"pred\w*['\"]?\s*[:=]\s*['\"]?(yes|no)\b", lowered)
  if keyed:
    verdict = keyed.group(1)
  else:
    words = set(re.findall(r"\b(yes|no)\b", lowered))
    if len(words) != 1:
      return None
    verdict = words.pop()
  number = re.search(r"score['\"]?\s*(?:[:=]|is|of)?\s*['\"]?" + _NUMBER, lowered)
  if not number:
    number = re.search(r"\b" + verdict + r"\b['\"]?[\s,;:/\-]*?" + _NUMBER, lowered)
  if not number:
    return None
  score = _score(number.group(1))
  return None if score is None else (verdict == "yes", score)
