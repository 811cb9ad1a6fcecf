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

from tml_jax.model.background import BackgroundModel, read_context
from tml_jax.text import tokenizer as tok
from tml_jax.tools import ToolBox, ToolError

UNAVAILABLE = "background model unavailable"


@dataclasses.dataclass
class Job:
  id: int
  chunk: int                 # micro-turn that emitted DELEGATE
  submit_s: float            # conversation time of the submission (end of that chunk)
  context: tuple             # StreamingModel.context(): hidden, meta, history, history_chunk
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

  def _decode(self, state, hidden, meta, history, history_chunk, chunk, tokens_T, start,
              stops):
    bg = nnx.merge(self.graphdef, state)
    ctx, mask, pos = read_context(bg.cfg, hidden, meta, jnp.reshape(chunk, (1, 1)),
                                  self.window, history, history_chunk)
    kvs = bg.encode_context(ctx, pos)
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
    hidden, meta, history, history_chunk = context
    buf = np.full((self.max_len,), tok.PAD, np.int32)
    n = min(len(prompt), self.max_len)
    buf[:n] = prompt[:n]
    out, pos = self._run(self.state, hidden, meta, history, history_chunk, jnp.int32(chunk),
                         jnp.asarray(buf), jnp.int32(n), jnp.asarray(stops, jnp.int32))
    return np.asarray(out)[n:int(pos)].tolist()


def solve(generate: Callable, tools: ToolBox, job: Job) -> str:
  """One delegation: optional tool call, then the answer. Returns the answer text."""
  enc, dec = tok.ByteTokenizer().encode, tok.ByteTokenizer().decode
  seq = [tok.BOS]
  seq += generate(job.context, seq, (tok.SEP, tok.EOT), job.chunk)
  if len(seq) > 1 and seq[1] == tok.TOOL and seq[-1] != tok.SEP:
    # A call that runs to max_len or ends with EOT: nothing can run, and its text is not
    # an answer (it used to come back as one, garbled call and all).
    text = dec([t for t in seq[2:] if t < 256])
    name = text.partition(":")[0]
    error = (f"the call did not end: no SEP within {len(seq) - 2} tokens ({text[:60]!r})")
    job.events.append(dict(kind="tool_error", tool=name, error=error, ended=False,
                           at_s=tools.ctx.now_s()))
    return f"the tool failed: {error}"
  if len(seq) > 1 and seq[1] == tok.TOOL:
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
  """One daemon thread over a queue of jobs, bounded.

  max_pending: at most this many undelivered jobs, each holding a device copy of the
  context; a delegation beyond it is dropped (and reported by the engine). A delegation
  made while an earlier job is still waiting in the queue (not started) is coalesced into it:
  that job takes the newer context, as if it had just been submitted. A finished job lets
  go of its context.
  """

  def __init__(self, generate: Callable | None, tools: ToolBox, *, max_pending: int = 3):
    if max_pending < 1:
      raise ValueError(f"max_pending={max_pending}: at least one outstanding delegation is "
                       "needed (config.background.max_pending)")
    self.generate, self.tools, self.max_pending = generate, tools, max_pending
    self.pending: list[Job] = []
    self._queue: queue.Queue = queue.Queue()
    self._lock = threading.Lock()   # a job's start vs. coalescing into it
    self._started: set[int] = set()
    self._cancelled: set[int] = set()
    self._next_id = 0
    self._closed = False
    self._thread = threading.Thread(target=self._loop, name="background-worker", daemon=True)
    self._thread.start()

  def submit(self, chunk: int, submit_s: float, context) -> tuple[Job | None, str]:
    """(job, "submitted" | "coalesced" | "dropped"); job is None when dropped. `context` may
    be a function making it (a device copy), called only when the job takes it."""
    if self._closed:
      raise RuntimeError("this BackgroundWorker is closed; make a new one per conversation")
    make = context if callable(context) else (lambda: context)
    with self._lock:
      queued = [j for j in self.pending if j.id not in self._started]
      if queued:
        job = queued[-1]
        job.chunk, job.submit_s, job.context = chunk, submit_s, make()
        job.submit_wall = time.perf_counter()
        return job, "coalesced"
      if len(self.pending) >= self.max_pending:
        return None, "dropped"
      job = Job(self._next_id, chunk, submit_s, make(), submit_wall=time.perf_counter())
      self._next_id += 1
      self.pending.append(job)
    self._queue.put(job)
    return job, "submitted"

  def close(self, timeout_s: float = 60.0) -> dict:
    """Ends the worker: queued jobs are cancelled (never run), the running one is waited for
    up to `timeout_s`, and the thread is joined, so nothing of this conversation runs into
    the next one. Idempotent. Returns {"cancelled": n, "abandoned": bool} (abandoned: the
    running job outlived the timeout; its tool effects are already revoked by ToolBox)."""
    if self._closed:
      return dict(cancelled=0, abandoned=False)
    self._closed = True
    with self._lock:
      cancelled = [j for j in self.pending if j.id not in self._started]
      self._cancelled.update(j.id for j in cancelled)
    for job in cancelled:
      job.context = None
    self._queue.put(None)
    self._thread.join(timeout_s)
    return dict(cancelled=len(cancelled), abandoned=self._thread.is_alive())

  def _loop(self):
    while True:
      job = self._queue.get()
      if job is None:
        return
      with self._lock:
        if job.id in self._cancelled:
          continue
        self._started.add(job.id)
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
      job.context = None  # the device copy of the context is no longer needed
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
