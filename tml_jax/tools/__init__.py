"""Tools of the background model (docs/design.md §5): calculator, clock/timer/reminders, knowledge
lookup and a chart renderer.

A tool is `fn(args: str, ctx: ToolContext) -> str`. The background model writes
`TOOL name:args SEP`; `ToolBox.call` runs the tool in its own daemon thread with a timeout, so
a hung tool costs the worker at most `timeout_s` and the conversation never waits on it.
A tool sees its call's `CallContext`: once the call has timed out, it can no longer add
reminders or write files.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import Callable

from tml_jax.tools.calculator import CalculatorError, calculator, evaluate
from tml_jax.tools.chart import chart
from tml_jax.tools.clock import Reminders, clock, parse_duration, remind, timer
from tml_jax.tools.knowledge import lookup

__all__ = ["CallContext", "ToolBox", "ToolContext", "ToolError", "Reminders", "CalculatorError", "evaluate",
           "parse_duration", "default_tools"]


class ToolError(RuntimeError):
  """A tool failed, timed out or does not exist; the message is what enters the context."""


@dataclasses.dataclass
class ToolContext:
  now_s: Callable[[], float] = lambda: 0.0     # conversation clock
  reminders: Reminders = dataclasses.field(default_factory=Reminders)
  out_dir: str | None = None                   # where tools may write files (charts)
  # Files are not written, only their paths returned (the corpus runs the tools this way to
  # know what they would answer).
  dry_run: bool = False
  _ids: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def next_id(self, kind: str) -> int:
    self._ids[kind] += 1
    return self._ids[kind]


class CallContext:
  """What one tool call sees: the conversation's ToolContext, until the call is revoked.

  A call that timed out is revoked: its thread may run on (threads cannot be killed), but
  whatever it tries to leave behind afterwards, a reminder or a file, raises ToolError and is
  discarded. The check and the effect happen under one lock, so an effect is either in
  before the timeout was declared or not at all.
  """

  def __init__(self, ctx: ToolContext, name: str):
    self._ctx, self._name = ctx, name
    self._lock = threading.Lock()
    self.revoked = False
    self.reminders = _GuardedReminders(self)

  def now_s(self) -> float:
    return self._ctx.now_s()

  @property
  def out_dir(self) -> str | None:
    return self._ctx.out_dir

  def next_id(self, kind: str) -> int:
    return self._ctx.next_id(kind)

  def effect(self, fn: Callable, *args):
    """Runs `fn(*args)` (a side effect) unless the call has been revoked."""
    with self._lock:
      if self.revoked:
        raise ToolError(f"tool {self._name} timed out earlier; its late effect is discarded")
      return fn(*args)

  def write_file(self, relpath: str, data: bytes) -> str:
    """Writes `data` to out_dir/relpath (relpath itself without out_dir); its path."""
    path = os.path.join(self._ctx.out_dir, relpath) if self._ctx.out_dir else relpath

    def write():
      if self._ctx.dry_run:
        return path
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
      with open(path, "wb") as f:
        f.write(data)
      return path
    return self.effect(write)

  def revoke(self):
    with self._lock:
      self.revoked = True


class _GuardedReminders:
  def __init__(self, call: CallContext):
    self._call = call

  def add(self, delay_s: float, text: str, now_s: float, period_s: float = 0.0):
    return self._call.effect(self._call._ctx.reminders.add, delay_s, text, now_s, period_s)

  def pending(self):
    return self._call._ctx.reminders.pending()


def default_tools() -> dict[str, Callable]:
  return {"calculator": calculator, "clock": clock, "timer": timer, "remind": remind,
          "knowledge": lookup, "chart": chart}


class ToolBox:

  def __init__(self, tools: dict[str, Callable] | None = None, ctx: ToolContext | None = None,
               *, timeout_s: float = 5.0):
    self.tools = default_tools() if tools is None else dict(tools)
    self.ctx = ctx or ToolContext()
    self.timeout_s = timeout_s

  def call(self, name: str, args: str) -> str:
    fn = self.tools.get(name.strip())
    if fn is None:
      raise ToolError(f"unknown tool {name!r}; known: {', '.join(sorted(self.tools))}")
    # One fresh daemon thread per call: a tool that never returns is abandoned, not joined,
    # and cannot block later calls the way a shared pool's busy worker would.
    future: concurrent.futures.Future = concurrent.futures.Future()
    call = CallContext(self.ctx, name)

    def run():
      try:
        future.set_result(fn(args, call))
      except BaseException as e:  # reported to the model, never raised in the worker
        future.set_exception(e)

    threading.Thread(target=run, name=f"tool-{name}", daemon=True).start()
    try:
      return str(future.result(timeout=self.timeout_s))
    except concurrent.futures.TimeoutError:
      call.revoke()  # whatever it does from now on is discarded
      raise ToolError(f"tool {name} timed out after {self.timeout_s:g} s") from None
    except Exception as e:
      raise ToolError(f"tool {name} failed: {type(e).__name__}: {e}") from e
