"""Speak-decision labels read from the corpus: the speak gate's target and the
conversational condition of every chunk (tml_jax.probe explains both).

Pure numpy, so the data pipeline builds them for every training row.
"""

from __future__ import annotations

import json

import numpy as np

CONDITIONS = ("other", "user_speaking", "pause", "after_turn_end", "barge_in",
              "user_backchannel")
SPEECH_LOG_MEL = -4.0   # log10 mel: eSpeak speech peaks above -2, digital silence is -7
VOICED_SHARE = 0.25     # a chunk is speech when >= 2 of its 8 frames are
AFTER_TURN_S = 1.0
BACKCHANNEL_TAIL_S = 0.4


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def voiced_chunks(mel_CF80) -> np.ndarray:
  """bool [C]: chunks whose log-mel frames hold speech (the loudest channel above -4): the
  speak gate's target, read from the model's own channel one chunk ahead."""
  return (np.asarray(mel_CF80).max(-1) > SPEECH_LOG_MEL).mean(-1) >= VOICED_SHARE


def chunk_conditions(record, total: int, chunk_s: float) -> np.ndarray:
  """int8 [total]: the `CONDITIONS` index of each chunk's decision time."""
  tau = (np.arange(total) + 1) * chunk_s
  cond = np.zeros(total, np.int8)

  def mark(name, start, end):
    cond[(tau >= start) & (tau < end)] = CONDITIONS.index(name)

  for text, s, e, who in zip(record["word_text"], record["word_start_s"], record["word_end_s"],
                             record["word_speaker"]):
    if _text(who) == "user":
      mark("user_speaking", float(s), float(e))
  events = json.loads(_text(record["events_json"]))
  order = ("user_turn", "pause", "interruption", "user_backchannel")
  for e in sorted(events, key=lambda e: order.index(e["kind"]) if e["kind"] in order else -1):
    s, t = float(e["start_s"]), float(e["end_s"])
    if e["kind"] == "user_turn":
      mark("after_turn_end", t, t + AFTER_TURN_S)
    elif e["kind"] == "pause":
      mark("pause", s, t)
    elif e["kind"] == "interruption":
      mark("barge_in", s, t)
    elif e["kind"] == "user_backchannel":
      mark("user_backchannel", s, t + BACKCHANNEL_TAIL_S)
  return cond


REPLY_OPEN_S = 0.2  # the corpus' replies start 0.2-0.6 s after the user's turn ends


def reply_windows(record, total: int, chunk_s: float) -> np.ndarray:
  """bool [total]: chunks t whose next chunk lies between REPLY_OPEN_S after a user's turn
  ended and the start of the model's reply to it.

  The corpus draws each reply's start uniformly 0.2-0.6 s after the turn end, so "speech
  in chunk t+1" is a coin flip on those chunks, the same user audio giving either label: the
  gate sees a hazard, not a rule, and learns a low probability everywhere. Marking the whole
  window as "speak" turns it into a rule: start once the user has been quiet for 0.2 s.
  """
  out = np.zeros(total, bool)
  nxt = (np.arange(total) + 1) * chunk_s  # start of chunk t+1
  for e in json.loads(_text(record["events_json"])):
    lat = (e.get("data") or {}).get("latency_s", e.get("latency_s"))
    if e["kind"] != "model_turn" or lat is None:
      continue
    start = float(e["start_s"])
    out |= (nxt >= start - float(lat) + REPLY_OPEN_S - 1e-9) & (nxt < start)
  return out
