"""One conversation on an `Engine`: the state that is per conversation, advanced one
micro-turn at a time.

The engine's offline and live loops and the web server (`tml_jax.serve.web`) all drive a
`Session`: per micro-turn t they hand it what was heard in chunk t (or None when it was
lost), and it gathers the due text, observes, steps the model, vocodes, delegates and
returns what to play during chunk t+1. A session owns its cache (`StreamingModel.fork` on a
server, so sessions share the compiled step), its dMel streams, its TEXT_IN queue, its tool
context and its background worker; `close` ends the worker and the output file.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import time

import jax
import numpy as np

from tml_jax.audio import dmel, vocoder
from tml_jax.microturn import TextFifo
from tml_jax.serve import outputs
from tml_jax.serve.worker import BackgroundWorker
from tml_jax.text import tokenizer as tok
from tml_jax.tools import ToolBox, ToolContext
from tml_jax.tools.clock import due_text as reminder_text


@dataclasses.dataclass
class ChunkRecord:
  t: int
  compute_ms: float
  tokens: list
  user_missing: bool
  p_speak: float = 1.0   # the speak gate's P(speak in chunk t+1); 1 without a gate
  lag_ms: float = 0.0    # live: how late the step started after its chunk was due
  input_wait_ms: float = 0.0  # live: time spent in the jitter buffer waiting for the input
  spoke: bool = True     # the gate let chunk t speak (its audio plays during chunk t+1)
  p_delegate: float = 0.0  # slot 0's P(DELEGATE) (serve.delegate_threshold's scale)


@dataclasses.dataclass
class StepOutput:
  """What micro-turn t made: `played` [S] float audio (heard during chunk t+1), the new
  events, the words it completed and the text it decoded (UTF-8 split across chunks is
  joined)."""
  played: np.ndarray
  record: ChunkRecord
  events: list
  words: list
  text: str


class Session:
  """A conversation's state on a shared engine (see the module docstring).

  clock: the conversation clock tools and reminders read (`inputs.LiveClock` /
  `OfflineClock`). num_samples: the input's length when known (output.wav is then exactly
  as long), None for a live session. stream: the model state to use (default the engine's
  own; a server passes `engine.stream.fork()`). text_at: (time_s, text) typed into TEXT_IN.
  """

  def __init__(self, engine, clock, *, out_dir: str | None = None,
               num_samples: int | None = None, seed: int | None = None, stream=None,
               text_at=()):
    self.engine, self.clock = engine, clock
    lay = engine.lay
    self.sm = engine.stream if stream is None else stream
    self.sm.reset()
    self.user_dm, self.self_dm = dmel.DMelStream(lay.user_audio), dmel.DMelStream(lay.self_audio)
    self.fifo = TextFifo(lay.text_in, capacity=engine.text_in_capacity)
    self.played = np.zeros(engine.chunk_samples, np.float32)
    self.speaking = False  # did the gate let the last chunk speak (then keep_threshold holds)
    self.events, self.records = [], []
    self.key = jax.random.key(engine.seed if seed is None else seed)
    self.text_at = sorted(text_at)
    self.word_stream = outputs.WordStream(engine.chunk_s)
    self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # text across chunks
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
    self.out_dir = out_dir
    self.ctx = ToolContext(now_s=clock.now_s, out_dir=out_dir)
    self.worker = BackgroundWorker(engine.generate,
                                   ToolBox(engine.tools, self.ctx, timeout_s=engine.tool_timeout_s),
                                   max_pending=engine.max_pending)
    self.sink = outputs.AudioSink(num_samples, engine.chunk_samples,
                                  os.path.join(out_dir, "output.wav") if out_dir else None)
    self.closed = False

  @property
  def t(self) -> int:
    """The next micro-turn."""
    return len(self.records)

  def type_text(self, text: str, at_s: float | None = None):
    """Text for TEXT_IN, entering at the first micro-turn at or after `at_s` (default: the
    next one)."""
    at = self.t * self.engine.chunk_s if at_s is None else at_s
    self.text_at.append((at, text))
    self.text_at.sort(key=lambda x: x[0])

  def step(self, audio: np.ndarray | None, *, frame=None, lag_ms: float = 0.0,
           waited_s: float = 0.0, delegate: bool = False, missing_samples: int = 0
           ) -> StepOutput:
    """Micro-turn `self.t`: `audio` [S] float is what was heard in it (None: lost, heard as
    silence and reported; `missing_samples` > 0: only part of it arrived in time, the rest
    is silence, also reported); `delegate` forces a delegation at its end."""
    e, t = self.engine, self.t
    now = t * e.chunk_s  # conversation time at the start of chunk t
    n_events = len(self.events)
    self._gather_text(now)
    missing = audio is None or missing_samples > 0
    if missing:
      self.events.append(dict(kind="input_missing", time_s=round(now, 3), chunk=t,
                              jitter_buffer_ms=round(e.jitter_buffer_s * 1e3, 1),
                              missing_samples=e.chunk_samples if audio is None
                              else int(missing_samples)))
      if audio is None:
        audio = np.zeros(e.chunk_samples, np.float32)
    t0 = time.perf_counter()
    video, video_valid = e._video(frame)
    obs = dict(user_dmel=self.user_dm.push_tokens(audio)[None, None],
               self_dmel=self.self_dm.push_tokens(self.played)[None, None],
               self_speaking=np.full((1, 1), self.speaking),
               text_in=self.fifo.take()[None, None], video_valid=np.bool_(video_valid))
    if video is not None:
      obs["video"] = video
    threshold = e.keep_threshold if self.speaking else e.speak_threshold
    out = self.sm.step(obs, rng=jax.random.fold_in(self.key, t), temperature=e.temperature,
                       speak_threshold=threshold)
    self.speaking = float(out["p_speak"]) >= threshold
    tokens = np.asarray(out["tokens"]).tolist()
    wav = vocoder.vocode(np.asarray(out["mel"]), n_iter=e.gl_iters)[:e.chunk_samples]
    bad = ~np.isfinite(wav)
    if bad.any():  # reported, then played as silence where it is not a number
      self.events.append(dict(kind="vocoder_nonfinite", time_s=round(now, 3), chunk=t,
                              samples=int(bad.sum()),
                              mel_nonfinite=int((~np.isfinite(np.asarray(out["mel"]))).sum())))
      wav = np.where(bad, 0.0, wav)
    self.played = np.clip(wav, -1.0, 1.0).astype(np.float32)
    self.sink.write(t, self.played, audio)
    record = ChunkRecord(t, (time.perf_counter() - t0) * 1e3, tokens, missing,
                         float(out["p_speak"]), round(lag_ms, 3), round(waited_s * 1e3, 3),
                         bool(self.speaking), float(out["p_delegate"]))
    self.records.append(record)
    if delegate or tok.DELEGATE in tokens:
      self._delegate(t, forced=tok.DELEGATE not in tokens)
    text = self._utf8.decode(bytes(
        i for i in tokens[:tokens.index(tok.EOT) if tok.EOT in tokens else None] if i < 256))
    return StepOutput(self.played, record, self.events[n_events:],
                      self.word_stream.push(t, tokens), text)

  def close(self) -> dict:
    """Ends the conversation: the worker (queued jobs cancelled, the running one joined) and
    output.wav; returns the run's result (records, events, loudness per chunk)."""
    if self.closed:
      raise RuntimeError("this Session is already closed")
    self.closed = True
    try:
      closed = self.worker.close()  # nothing of this conversation runs into the next
    finally:
      self.sink.close()
    C = self.t
    self.events.append(dict(kind="end", time_s=round(C * self.engine.chunk_s, 3),
                            pending_background_jobs=len(self.worker.pending),
                            cancelled_background_jobs=closed["cancelled"],
                            abandoned_background_job=closed["abandoned"],
                            text_in_dropped_tokens=self.fifo.dropped))
    return dict(records=self.records, events=self.events, num_chunks=C,
                cache_bytes=self.sm.cache_nbytes(), history_bytes=self.sm.history_nbytes(),
                out_audio=self.sink.chunks,
                user_rms=self.sink.user_rms, model_rms=self.sink.rms)

  def _delegate(self, t: int, *, forced: bool):
    """Hands chunk t's context to the worker: a new job, or coalesced into one still
    queued, or dropped when `background.max_pending` jobs are outstanding."""
    at = round((t + 1) * self.engine.chunk_s, 3)
    job, outcome = self.worker.submit(t, (t + 1) * self.engine.chunk_s, self.sm.context)
    if outcome == "submitted":
      self.events.append(dict(kind="delegation", time_s=at, chunk=t, job=job.id,
                              forced=forced))
    elif outcome == "coalesced":
      self.events.append(dict(kind="delegation_coalesced", time_s=at, chunk=t, job=job.id,
                              forced=forced))
    else:
      self.events.append(dict(kind="delegation_dropped", time_s=at, chunk=t, forced=forced,
                              outstanding=len(self.worker.pending),
                              max_pending=self.worker.max_pending))

  def _gather_text(self, now: float):
    """Background answers, reminders and typed text due by `now` join the TEXT_IN queue;
    past its capacity the oldest queued tokens are dropped, and that is reported.
    (Offline, `poll` may wait for a job, bounded by its real-time budget: not micro-turn
    time.)"""
    enc, events = tok.ByteTokenizer().encode, self.events

    def push(tokens, source: str):
      dropped = self.fifo.push(tokens)
      if dropped:
        events.append(dict(kind="text_in_overflow", time_s=round(now, 3), source=source,
                           dropped_tokens=dropped, capacity=self.fifo.capacity))

    for job in self.worker.poll(now, offline=not self.clock.live):
      for e in job.events:  # `at_s`: when it happened on the job's conversation clock
        at = e.pop("at_s", now)
        events.append(dict(e, time_s=round(at, 3), job=job.id))
      events.append(dict(kind="background_result", time_s=round(now, 3), job=job.id,
                         text=job.answer, delegated_at_s=round(job.submit_s, 3),
                         compute_s=round(job.compute_s, 3)))
      push([tok.RESULT] + enc(job.answer), "background_result")
    for r in self.ctx.reminders.due(now):
      events.append(dict(kind="reminder", time_s=round(now, 3), due_s=round(r.due_s, 3),
                         text=r.text))
      push([tok.RESULT] + enc(reminder_text(r.text)), "reminder")
    while self.text_at and self.text_at[0][0] <= now + 1e-9:
      _, text = self.text_at.pop(0)
      events.append(dict(kind="text_in", time_s=round(now, 3), text=text))
      push([tok.RESULT] + enc(text), "text_in")
