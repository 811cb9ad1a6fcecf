"""Tools of the background model (docs/design.md §5): calculator, clock/timer/reminders, knowledge
lookup and a chart renderer.

A tool is `fn(args: str, ctx: ToolContext) -> str`. The background model writes
`TOOL name:args SEP`; `ToolBox.call` runs the tool in its own daemon thread with a timeout, so
a hung tool costs the worker at most `timeout_s` and the conversation never waits on it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
from collections.abc import Callable

from tml_jax.tools.calculator import CalculatorError, calculator, evaluate
from tml_jax.tools.chart import chart
from tml_jax.tools.clock import Reminders, clock, parse_duration, remind, timer
from tml_jax.tools.knowledge import lookup

__all__ = ["ToolBox", "ToolContext", "ToolError", "Reminders", "CalculatorError", "evaluate",
           "parse_duration", "default_tools"]


class ToolError(RuntimeError):
  """A tool failed, timed out or does not exist; the message is what enters the context."""


@dataclasses.dataclass
class ToolContext:
  now_s: Callable[[], float] = lambda: 0.0     # conversation clock
  reminders: Reminders = dataclasses.field(default_factory=Reminders)
  out_dir: str | None = None                   # where tools may write files (charts)
  _ids: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def next_id(self, kind: str) -> int:
    self._ids[kind] += 1
    return self._ids[kind]


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

    def run():
      try:
        future.set_result(fn(args, self.ctx))
      except BaseException as e:  # reported to the model, never raised in the worker
        future.set_exception(e)

    threading.Thread(target=run, name=f"tool-{name}", daemon=True).start()
    try:
      return str(future.result(timeout=self.timeout_s))
    except concurrent.futures.TimeoutError:
      raise ToolError(f"tool {name} timed out after {self.timeout_s:g} s") from None
    except Exception as e:
      raise ToolError(f"tool {name} failed: {type(e).__name__}: {e}") from e
