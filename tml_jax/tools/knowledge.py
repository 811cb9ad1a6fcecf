"""Local knowledge lookup: the FACTS of the synthetic corpus plus a few more, by word overlap."""

from __future__ import annotations

import re

from tml_jax.data.templates import FACTS

EXTRA_FACTS = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Italy?", "Rome"),
    ("How many hours are in a day?", "24"),
    ("How many days are in a week?", "7"),
    ("What is the boiling point of water in Fahrenheit?", "212 F"),
)
_STOP = {"what", "is", "the", "of", "a", "an", "in", "our", "how", "many", "does", "are",
         "at", "which", "to", "do", "there"}


def _words(text: str) -> set[str]:
  return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP}


def table() -> list[tuple[str, str]]:
  return [(q, r) for q, _, r in FACTS] + list(EXTRA_FACTS)


def lookup(question: str, ctx=None) -> str:
  """Result text of the best-matching fact; LookupError when nothing shares a content word."""
  del ctx
  asked = _words(question)
  best, score = None, 0.0
  for q, r in table():
    have = _words(q)
    s = len(asked & have) / max(len(asked | have), 1)
    if s > score:
      best, score = r, s
  if best is None or score < 0.34:
    raise LookupError(f"no local fact matches {question!r}")
  return best
