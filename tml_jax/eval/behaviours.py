"""Scores of the behaviour samples (tml_jax.data.export_tasks), from what a system said out
loud and, for the chain behind it, from the events the system logged.

`score(expected, annotation_events, words, system_events)` -> {group: [one item]}, the shape
of `metrics.extra_metrics`, summarised by `tml_jax.eval.report.summarise_extra`:

  delegation     delegated (the system emitted DELEGATE after the question), tool_called
                 (the expected tool), result (its background answer arrived), spoken, correct
                 (every key token of the answer said within ANSWER_WINDOW_S of the result:
                 the tokens it shares with the tool's result, e.g. "28", "thursday",
                 "lisbon", else its numbers, else its content words), latency_s (question end
                 to the first key token) = compute_s (DELEGATE to result) + weave_s (result
                 to the first key token) + the delegation's own delay.
  reminder       per firing: said, error_s (onset of the first utterance naming the reminder
                 minus its due time; negative is early), fired (the system's tool fired it).
  visual         per appearance: latency_s of the first utterance that starts within
                 VISUAL_WINDOW_S, mentions (it names the colour, shape or clothes).
  counting       said (the first number after the counting started), correct.
  translation    per source phrase: recall (share of the translation's tokens said while
                 it is spoken and up to LAG_WINDOW_S after), lag_s (first of them minus the
                 source's start: the ear-voice lag).
  typed_text     correct (half of the answer's content words said within ANSWER_WINDOW_S),
                 latency_s from the typing.

A system without events (a baseline, or one that logs none) has delegated / tool_called /
fired = False: it cannot set reminders or call tools, and the table says so by its zeros.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tml_jax.eval.metrics import Word, after, norm_tokens, utterances

ANSWER_WINDOW_S = 6.0   # a delegated or typed answer must start this soon after its cue
VISUAL_WINDOW_S = 3.0
LAG_WINDOW_S = 3.0
REMINDER_WINDOW_S = (-1.0, 3.0)  # the utterance naming a reminder, around its due time
STOPWORDS = frozenset(
    "a an the is are was be been it its i you your we me my to of in on at for and or so "
    "that this there here now please okay ok will do did is has have had am with from".split())
# expected["behaviour"] of the samples this module scores
BEHAVIOURS = ("delegate_and_answer", "remind_when_due", "remark_on_what_appears",
              "say_the_count", "translate_while_listening", "answer_typed_text")
_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def read_system_events(out_dir: str) -> list[dict] | None:
  """The events.jsonl a system wrote beside its output.wav, or None (it logs none)."""
  path = os.path.join(out_dir, "events.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def content(text: str) -> list[str]:
  return [t for t in norm_tokens(text) if t not in STOPWORDS]


def number_words(n: int) -> list[str]:
  """0..9999 as eSpeak says it and an ASR writes it: 28 -> ["twenty", "eight"]."""
  if n < 20:
    return [_ONES[n]]
  if n < 100:
    return [_TENS[n // 10]] + ([_ONES[n % 10]] if n % 10 else [])
  if n < 1000:
    return [_ONES[n // 100], "hundred"] + (number_words(n % 100) if n % 100 else [])
  return number_words(n // 1000) + ["thousand"] + (number_words(n % 1000) if n % 1000 else [])


def _spoken_numbers(tokens: list[str]) -> list[str]:
  """Numbers written as digits ("28", "4.1") become the words that say them, so a text
  and the ASR of its speech compare word for word."""
  out = []
  for t in tokens:
    whole, _, frac = t.partition(".")
    if whole.isdigit() and int(whole) < 10_000 and (not frac or frac.isdigit()):
      out += number_words(int(whole)) + (["point"] + [_ONES[int(d)] for d in frac]
                                         if frac else [])
    else:
      out.append(t)
  return out


def first_number(tokens: list[str]) -> int | None:
  """The first number in a token list ("twenty", "one" -> 21; "4" -> 4)."""
  toks = _spoken_numbers(tokens)
  for i, t in enumerate(toks):
    if t in _ONES:
      return _ONES.index(t)
    if t in _TENS[2:]:
      nxt = toks[i + 1] if i + 1 < len(toks) else ""
      return _TENS.index(t) * 10 + (_ONES.index(nxt) if nxt in _ONES[1:10] else 0)
  return None


def _said(words: list[Word], lo: float, hi: float) -> list[tuple[str, float]]:
  return [(tok, w[1]) for w in words if lo <= w[1] <= hi
          for tok in _spoken_numbers(norm_tokens(w[0]))]


def key_tokens(answer: str, result: str) -> list[str]:
  """What makes a delegated answer right, as spoken words: its tokens that the tool's result
  holds ("28" -> "twenty", "eight"), else its numbers, else its content words."""
  ans = norm_tokens(answer)
  shared = [t for t in dict.fromkeys(ans) if t in set(norm_tokens(result))
            and t not in STOPWORDS]
  nums = [t for t in dict.fromkeys(ans) if t.replace(".", "").isdigit()]
  return list(dict.fromkeys(_spoken_numbers(shared or nums or content(answer))))


def _first(events, kind: str, after_s: float = -np.inf, **match):
  return next((e for e in events or () if e.get("kind") == kind and e.get("time_s", np.inf)
               >= after_s and all(e.get(k) == v for k, v in match.items())), None)


def delegation(expected: dict, annotations: list[dict], words: list[Word],
               sys_events: list[dict] | None) -> dict:
  q_end = float(expected["question_end_s"])
  deleg = _first(sys_events, "delegation", q_end - 0.5)
  tool = _first(sys_events, "tool_call", q_end - 0.5, tool=expected["tool"])
  args = str(expected.get("args") or "").strip()
  result = _first(sys_events, "background_result", deleg["time_s"]) if deleg else None
  ref = next((e for e in annotations if e.get("kind") == "delegation"
              and e.get("data", {}).get("purpose") != "reminder"), None)
  keys = key_tokens(expected["answer"], (ref or {}).get("data", {}).get("result_text", ""))
  start = float(result["time_s"]) if result else q_end
  said = _said(words, start, start + ANSWER_WINDOW_S)
  have = {t for t, _ in said}
  correct = bool(keys) and all(k in have for k in keys)
  first = min((t for tok, t in said if tok in set(keys)), default=None)
  return dict(
      typed=bool(expected.get("typed")), delegated=deleg is not None,
      tool_called=tool is not None,
      args_right=tool is not None and str(tool.get("args", "")).strip() == args,
      result=result is not None, spoken=first is not None, correct=correct,
      latency_s=round(first - q_end, 3) if correct and first is not None else None,
      compute_s=round(result["time_s"] - deleg["time_s"], 3) if result else None,
      weave_s=round(first - result["time_s"], 3) if result and correct and first is not None
      else None)


def reminder(expected: dict, annotations: list[dict], words: list[Word],
             sys_events: list[dict] | None) -> list[dict]:
  sets = [e for e in annotations if e.get("kind") == "reminder_set"]
  if not sets:
    return []
  due0, period = float(sets[0]["data"]["due_s"]), float(expected.get("period_s") or 0.0)
  spoken = {round(float(e["data"]["due_s"]), 3): e for e in annotations
            if e.get("kind") == "reminder_due"}
  turns = [e for e in annotations if e.get("kind") == "model_turn"]
  out = []
  for k, fired_s in enumerate(expected["due_s"]):
    due = due0 + k * period
    ref = spoken.get(round(float(fired_s), 3))
    ref_text = next((t["data"]["text"] for t in turns if ref and abs(t["start_s"]
                                                                     - ref["start_s"]) < 1e-3),
                    "")
    names = set(_spoken_numbers(content(ref_text) + content(expected.get("task", ""))))
    lo, hi = due + REMINDER_WINDOW_S[0], due + REMINDER_WINDOW_S[1]
    onset = None
    for utt in utterances([w for w in words if lo <= w[1] <= hi]):
      if names & set(_spoken_numbers([t for w in utt for t in norm_tokens(w[0])])):
        onset = utt[0][1]
        break
    fired = any(e.get("kind") == "reminder" and abs(float(e.get("due_s", -1e9)) - due) < 0.5
                for e in sys_events or ())
    out.append(dict(said=onset is not None,
                    error_s=round(onset - due, 3) if onset is not None else None,
                    fired=fired, due_s=round(due, 3)))
  return out


def visual(expected: dict, words: list[Word]) -> list[dict]:
  out = []
  for t, desc in zip(expected["appear_s"], expected["descriptions"]):
    utts = utterances(after(words, float(t)))
    first = utts[0] if utts and utts[0][0][1] <= t + VISUAL_WINDOW_S else None
    names = set(norm_tokens(desc)) - {"person", "in"}
    out.append(dict(latency_s=round(first[0][1] - t, 3) if first else None,
                    mentions=bool(first) and bool(names & {x for w in first
                                                           for x in norm_tokens(w[0])})))
  return out


def counting(expected: dict, annotations: list[dict], words: list[Word]) -> dict:
  start = min((e["start_s"] for e in annotations if e.get("kind") == "count_request"),
              default=0.0)
  said = first_number([tok for tok, _ in _said(words, start, np.inf)])
  return dict(said=said, correct=said is not None and said == int(expected["count"]))


def translation(expected: dict, words: list[Word]) -> list[dict]:
  out = []
  for seg in expected["segments"]:
    want = _spoken_numbers(content(seg["target"]) or norm_tokens(seg["target"]))
    said = _said(words, float(seg["start_s"]), float(seg["end_s"]) + LAG_WINDOW_S)
    have = {t for t, _ in said}
    hits = [t for tok, t in said if tok in set(want)]
    out.append(dict(recall=round(sum(w in have for w in want) / max(len(want), 1), 3),
                    lag_s=round(min(hits) - float(seg["start_s"]), 3) if hits else None))
  return out


def typed_text(expected: dict, words: list[Word]) -> dict:
  t0 = float(expected["typed_s"])
  want = set(_spoken_numbers(content(expected["answer"])))
  said = _said(words, t0, t0 + ANSWER_WINDOW_S + 4.0)
  have = {t for t, _ in said}
  hits = [t for tok, t in said if tok in want]
  correct = bool(want) and len(want & have) >= 0.5 * len(want)
  return dict(correct=correct, latency_s=round(min(hits) - t0, 3) if correct else None)


def score(expected: dict, annotations: list[dict], words: list[Word],
          sys_events: list[dict] | None) -> dict[str, list[dict]]:
  """{group: [items]} of one behaviour sample; {} for a sample of no behaviour."""
  b = expected.get("behaviour")
  if b == "delegate_and_answer":
    return {"delegation": [delegation(expected, annotations, words, sys_events)]}
  if b == "remind_when_due":
    return {"reminder_timing": reminder(expected, annotations, words, sys_events)}
  if b == "remark_on_what_appears":
    return {"visual": visual(expected, words)}
  if b == "say_the_count":
    return {"count": [counting(expected, annotations, words)]}
  if b == "translate_while_listening":
    return {"translation": translation(expected, words)}
  if b == "answer_typed_text":
    return {"typed_text": [typed_text(expected, words)]}
  return {}
