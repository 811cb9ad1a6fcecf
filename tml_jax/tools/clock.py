"""Clock, timers and reminders, all on the conversation clock (seconds since the start).

In live mode the conversation clock is the wall clock since the session began; offline it is
the recording's time. A reminder fires at the first micro-turn at or after its due time: the
engine polls `Reminders.due(now_s)` every chunk and feeds what fired in as TEXT_IN
(`RESULT reminder: <text>`, tml_jax.serve.session; the corpus writes the same text through
`due_text`). A repeating reminder ("every 8 seconds; ...") fires again a period after each
due time until the conversation ends.
"""

from __future__ import annotations

import dataclasses
import re
import threading

from tml_jax.data.templates import WEEKDAYS

_UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "secs": 1, "m": 60, "min": 60,
          "minute": 60, "minutes": 60, "mins": 60, "h": 3600, "hour": 3600, "hours": 3600}


def parse_duration(text: str) -> float:
  """'90', '90 s', '2 minutes', '1 hour 30 minutes' -> seconds."""
  parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", str(text).lower())
  if not parts:
    raise ValueError(f"no duration in {text!r}; say e.g. '30 seconds' or '2 minutes'")
  total = 0.0
  for num, unit in parts:
    if unit and unit not in _UNITS:
      raise ValueError(f"unknown time unit {unit!r} in {text!r}; use seconds, minutes or hours")
    total += float(num) * _UNITS.get(unit or "s")
  return total


@dataclasses.dataclass(order=True)
class Reminder:
  due_s: float
  text: str = dataclasses.field(compare=False)
  set_at_s: float = dataclasses.field(compare=False, default=0.0)
  period_s: float = dataclasses.field(compare=False, default=0.0)  # 0: fires once


def due_text(text: str) -> str:
  """What a fired reminder puts into TEXT_IN (after RESULT): the corpus and the engine share it."""
  return f"reminder: {text}"


class Reminders:
  """Thread-safe: the background worker adds, the engine's micro-turn loop polls."""

  def __init__(self):
    self._items: list[Reminder] = []
    self._lock = threading.Lock()

  def add(self, delay_s: float, text: str, now_s: float, period_s: float = 0.0) -> Reminder:
    if delay_s < 0:
      raise ValueError(f"reminder delay {delay_s} s is negative; use a time in the future")
    if period_s < 0 or 0 < period_s < 1.0:
      raise ValueError(f"reminder period {period_s} s: repeat at most once a second "
                       "(period >= 1 s), or 0 for a one-off")
    r = Reminder(now_s + delay_s, text, now_s, period_s)
    with self._lock:
      self._items.append(r)
      self._items.sort()
    return r

  def due(self, now_s: float) -> list[Reminder]:
    """The reminders due by now_s, each once (a repeating one is put back a period after its
    due time, so a late poll fires it once, not for every period it missed)."""
    with self._lock:
      fired = [r for r in self._items if r.due_s <= now_s + 1e-9]
      self._items = [r for r in self._items if r.due_s > now_s + 1e-9]
      for r in fired:
        if r.period_s > 0:
          nxt = r.due_s + r.period_s
          while nxt <= now_s + 1e-9:
            nxt += r.period_s
          self._items.append(dataclasses.replace(r, due_s=nxt))
      self._items.sort()
    return fired

  def pending(self) -> list[Reminder]:
    with self._lock:
      return list(self._items)


def clock(args: str, ctx) -> str:
  """'now' -> conversation time; 'weekday(Monday + 3)' -> 'weekday(Monday + 3) = Thursday'."""
  m = re.match(r"\s*weekday\(\s*([A-Za-z]+)\s*\+\s*(\d+)\s*\)", str(args))
  if m:
    day = m.group(1).capitalize()
    if day not in WEEKDAYS:
      raise ValueError(f"unknown weekday {m.group(1)!r}")
    later = WEEKDAYS[(WEEKDAYS.index(day) + int(m.group(2))) % 7]
    return f"weekday({day} + {m.group(2)}) = {later}"
  now = ctx.now_s()
  return f"time = {int(now // 60)} min {now % 60:.1f} s into the conversation"


def timer(args: str, ctx) -> str:
  """'2 minutes' -> a reminder 'timer done' at now + 2 min."""
  r = ctx.reminders.add(parse_duration(args), f"timer of {str(args).strip()} is done",
                        ctx.now_s())
  return f"timer set for {r.due_s - r.set_at_s:g} s"


def remind(args: str, ctx) -> str:
  """'30 seconds; take the pasta out' -> a reminder with that text, due in 30 s;
  'every 8 seconds; check the oven' -> one due every 8 s from now."""
  when, _, what = str(args).partition(";")
  every = re.match(r"\s*every\b", when, re.IGNORECASE)
  delay = parse_duration(when[every.end():] if every else when)
  r = ctx.reminders.add(delay, what.strip() or "reminder", ctx.now_s(),
                        period_s=delay if every else 0.0)
  if every:
    return f"reminder set every {delay:g} s: {r.text}"
  return f"reminder set for {r.due_s - r.set_at_s:g} s: {r.text}"
