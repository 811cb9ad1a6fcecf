"""The asynchronous background worker: DELEGATE -> background model (+ tools) -> TEXT_IN.

The engine submits a job with a copy of the context hidden states and never waits on it: one
daemon thread works through the queue, and `poll` hands back what has finished. A job's
answer is delivered at the first micro-turn at or after the moment it really finished:
  live     the wall clock (it finished before this chunk started);
  offline  submit time + measured compute time on the conversation clock. The offline loop
           runs faster or slower than real time, so `poll` may wait for a job, but only as
           long as the job would have had in real time, and outside the micro-turn timing.
Failures never stop the conversation: a failing tool becomes "the tool failed: ..." and a
crashing model "background model unavailable", both in context and in the events.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tml_jax.microturn import context_mask
from tml_jax.model.background import BackgroundModel
from tml_jax.text import tokenizer as tok
from tml_jax.tools import ToolBox, ToolError

UNAVAILABLE = "background model unavailable"


@dataclasses.dataclass
class Job:
  id: int
  chunk: int                 # micro-turn that emitted DELEGATE
  submit_s: float            # conversation time of the submission (end of that chunk)
  context: tuple             # (hidden [1, M, D], TokenMeta [1, M]) from the engine's cache
  submit_wall: float = 0.0
  done_wall: float | None = None
  answer: str | None = None
  events: list = dataclasses.field(default_factory=list)
  done: threading.Event = dataclasses.field(default_factory=threading.Event)

  @property
  def compute_s(self) -> float:
    return (self.done_wall or time.perf_counter()) - self.submit_wall


class ModelGenerator:
  """Greedy decoding of the background model, jitted; `__call__(context, prompt, stops)`
  continues `prompt` until a stop token or max_len, returning the new tokens."""

  def __init__(self, bg: BackgroundModel, window: int):
    self.graphdef, self.state = nnx.split(bg)
    self.max_len, self.window = bg.cfg.max_len, window
    self._run = jax.jit(self._decode)

  def _decode(self, state, hidden, meta, chunk, tokens_T, start, stops):
    bg = nnx.merge(self.graphdef, state)
    kvs = bg.encode_context(hidden)
    mask = context_mask(meta, jnp.reshape(chunk, (1, 1)), self.window)
    T = tokens_T.shape[0]

    def cond(c):
      _, pos, done = c
      return (~done) & (pos < T)

    def body(c):
      tokens, pos, _ = c
      logits = bg.decode(tokens[None, None], kvs, mask)[0, 0]
      nxt = jnp.argmax(jnp.take(logits, pos - 1, axis=0)).astype(jnp.int32)
      return tokens.at[pos].set(nxt), pos + 1, jnp.any(nxt == stops)

    tokens, pos, _ = jax.lax.while_loop(cond, body, (tokens_T, start, jnp.bool_(False)))
    return tokens, pos

  def __call__(self, context, prompt: list[int], stops: tuple[int, ...], chunk: int):
    hidden, meta = context
    buf = np.full((self.max_len,), tok.PAD, np.int32)
    n = min(len(prompt), self.max_len)
    buf[:n] = prompt[:n]
    out, pos = self._run(self.state, hidden, meta, jnp.int32(chunk), jnp.asarray(buf),
                         jnp.int32(n), jnp.asarray(stops, jnp.int32))
    return np.asarray(out)[n:int(pos)].tolist()


def solve(generate: Callable, tools: ToolBox, job: Job) -> str:
  """One delegation: optional tool call, then the answer. Returns the answer text."""
  enc, dec = tok.ByteTokenizer().encode, tok.ByteTokenizer().decode
  seq = [tok.BOS]
  seq += generate(job.context, seq, (tok.SEP, tok.EOT), job.chunk)
  if len(seq) > 1 and seq[1] == tok.TOOL and seq[-1] == tok.SEP:
    name, _, args = dec(seq[2:-1]).partition(":")
    job.events.append(dict(kind="tool_call", tool=name, args=args, at_s=tools.ctx.now_s()))
    try:
      result = tools.call(name, args)
    except ToolError as e:
      job.events.append(dict(kind="tool_error", tool=name, error=str(e),
                             at_s=tools.ctx.now_s()))
      return f"the tool failed: {e}"
    job.events.append(dict(kind="tool_result", tool=name, result=result,
                           at_s=tools.ctx.now_s()))
    seq += [tok.RESULT] + enc(result) + [tok.SEP]
    seq += generate(job.context, seq, (tok.EOT,), job.chunk)
  last_sep = max((i for i, t in enumerate(seq) if t == tok.SEP), default=0)
  answer = [t for t in seq[last_sep + 1:] if t < 256]
  return dec(answer).strip()


class BackgroundWorker:

  def __init__(self, generate: Callable | None, tools: ToolBox):
    self.generate, self.tools = generate, tools
    self.pending: list[Job] = []
    self._queue: queue.Queue = queue.Queue()
    self._next_id = 0
    self._thread = threading.Thread(target=self._loop, name="background-worker", daemon=True)
    self._thread.start()

  def submit(self, chunk: int, submit_s: float, context) -> Job:
    job = Job(self._next_id, chunk, submit_s, context, submit_wall=time.perf_counter())
    self._next_id += 1
    self.pending.append(job)
    self._queue.put(job)
    return job

  def close(self):
    """Stops the thread after the queued jobs (a job still running is not interrupted)."""
    self._queue.put(None)

  def _loop(self):
    while True:
      job = self._queue.get()
      if job is None:
        return
      # Tools read the conversation clock as the job sees it: submit time + elapsed compute
      # (offline, the main loop may be far ahead of or behind the job in wall time).
      self.tools.ctx.now_s = lambda job=job: job.submit_s + job.compute_s
      try:
        if self.generate is None:
          raise RuntimeError("this checkpoint has no background model (config.background)")
        job.answer = solve(self.generate, self.tools, job)
      except Exception as e:  # a crashing worker is reported in context; the engine goes on
        job.events.append(dict(kind="error", where="background_worker",
                               error=f"{type(e).__name__}: {e}",
                               trace=traceback.format_exc(limit=3)))
        job.answer = UNAVAILABLE
      job.done_wall = time.perf_counter()
      job.done.set()

  def poll(self, now_s: float, *, offline: bool) -> list[Job]:
    """Jobs whose answer is due at conversation time `now_s` (removed from pending)."""
    ready = []
    for job in list(self.pending):
      if offline and not job.done.is_set():
        # Give the job the real time it would have had by now, no more.
        job.done.wait(max(0.0, (now_s - job.submit_s) - job.compute_s))
      if not job.done.is_set():
        continue
      if offline and job.submit_s + job.compute_s > now_s + 1e-9:
        continue
      self.pending.remove(job)
      ready.append(job)
    return ready
