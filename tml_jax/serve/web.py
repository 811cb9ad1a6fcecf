r"""Talk to it: a live browser demo over WebSocket.

  python -m tml_jax.serve.web --workdir=runs/tiny [--host=127.0.0.1 --port=8000 --max_sessions=2]

then open http://127.0.0.1:8000 and press the microphone button. One engine is loaded and
compiled once; every connection is a session with its own cache, clocks, text queue and
background worker, and all sessions' micro-turns run one at a time on one compute thread.
Each session's recording is written to --out_dir/<session id>/ (default W/web_sessions):
input.wav (what the model heard, chunk by chunk, silence where input was missing),
output.wav, monologue.json, events.jsonl, latency.json, timeline.png, charts/ and
session.json (samples received, late and missing, per-chunk input RMS, end-to-end latency).

Protocol (version 1), endpoint ws://HOST:PORT/stream:
  client -> server
    binary  16-bit little-endian mono PCM at 16 kHz, frames of any length; the server
            re-chunks them to 200 ms micro-turns (`inputs.LiveInput`: chunk t is used if it
            arrives within the jitter buffer, serve.jitter_buffer_ms after it is due; what
            has not arrived by then is heard as silence and reported as input_missing).
    text    JSON {"type": "text", "text": "..."}: typed input, into TEXT_IN;
            JSON {"type": "delegate"}: hand the context to the background model now.
  server -> client
    binary  exactly one micro-turn of the same format (3200 samples, 6400 bytes), the audio
            made for chunk t, to be played during chunk t+1.
    text    {"type": "hello", "session", "protocol": 1, "sample_rate", "chunk_ms",
            "jitter_buffer_ms"} once; then
            {"type": "event", "kind": ..., "time_s": ...} with kind in text (the model's text
            as it is decoded, "text", "chunk"), word (each word once complete, "text",
            "end_s"; times are when it is heard), delegation, background_result ("text"), tool_call, tool_result,
            tool_error, reminder, chart ("url" of the PNG, served by this server),
            input_missing, text_in, error ("error": what was wrong; the session goes on), ...;
            {"type": "latency", "compute_p50_ms", "compute_p99_ms", "e2e_p50_ms",
            "e2e_p99_ms", "chunks", "missing_chunks", ...} every second (the last 60 s);
            e2e = the last sample of chunk t arriving -> the answer's first sample sent;
            {"type": "error", "kind": "refused", "reason"} when all --max_sessions are in
            use, then the socket closes (code 1013, try again later);
            {"type": "error", "kind": "session_failed", "error"} if a micro-turn fails
            (code 1011).
  Bad frames (odd byte counts, text that is not JSON, unknown types) get an error event;
  the session goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import json
import os
import re
import signal
import time
import wave

import numpy as np
from aiohttp import WSMsgType, web

from tml_jax.audio import io
from tml_jax.serve import outputs
from tml_jax.serve.inputs import LiveClock, LiveInput
from tml_jax.serve.session import Session

PROTOCOL = 1
STATIC = os.path.join(os.path.dirname(__file__), "static")
LATENCY_WINDOW = 300  # chunks (60 s) in each latency message
_SKIP = {"trace"}     # event fields that stay in events.jsonl, not on the wire


def _pct(x, q):
  return round(float(np.percentile(x, q)), 2) if len(x) else None


class WebSession:
  """One WebSocket conversation: the receive side feeds `LiveInput`, `tick` runs the
  micro-turns as chunks become ready and sends what they make."""

  def __init__(self, server: "Server", ws: web.WebSocketResponse, sid: str):
    e = server.engine
    self.server, self.ws, self.sid = server, ws, sid
    self.out_dir = os.path.join(server.out_root, sid)
    self.live = LiveInput(e.chunk_samples, chunk_s=e.chunk_s, jitter_buffer_s=e.jitter_buffer_s)
    self.clock = LiveClock(e.chunk_s)
    self.session = Session(e, self.clock, out_dir=self.out_dir, stream=e.stream.fork())
    self.heard = wave.open(os.path.join(self.out_dir, "input.wav"), "wb")  # what the model heard
    self.heard.setnchannels(1)
    self.heard.setsampwidth(2)
    self.heard.setframerate(e.config.layout.sample_rate)
    self.arrived = asyncio.Event()  # set by every audio frame
    self.typed, self.delegate_next = [], False
    self.e2e_all = []  # ms per heard chunk (compute times are in the session's records)
    self.last_latency = 0.0

  # --------------------------------------------------------------- client -> server
  async def error(self, message: str):
    await self.send(dict(type="event", kind="error", time_s=self.time_s(), error=message))

  def time_s(self) -> float:
    return round(self.clock.now_s(), 3) if self.live.started else 0.0

  async def receive(self, msg):
    if msg.type == WSMsgType.BINARY:
      try:
        self.live.push(msg.data)
      except ValueError as e:
        await self.error(str(e))
        return
      if self.clock.t0 is None:
        self.clock.t0 = self.live.t0  # the conversation clock starts with the stream
      self.arrived.set()
    elif msg.type == WSMsgType.TEXT:
      try:
        data = json.loads(msg.data)
      except json.JSONDecodeError as e:
        await self.error(f"a text frame that is not JSON ({e}): send "
                         '{"type": "text", "text": "..."} or {"type": "delegate"}')
        return
      kind = data.get("type") if isinstance(data, dict) else None
      if kind == "text" and isinstance(data.get("text"), str):
        self.typed.append(data["text"])
      elif kind == "delegate":
        self.delegate_next = True
      else:
        await self.error(f"unknown message {str(data)[:80]!r}: the types are 'text' (with a "
                         "string 'text') and 'delegate'")

  # --------------------------------------------------------------- server -> client
  async def send(self, obj: dict):
    if not self.ws.closed:
      await self.ws.send_str(json.dumps(obj))

  async def tick(self):
    """Micro-turns, in order, each as soon as its chunk is ready. A failing step ends the
    session with an error message (code 1011); the other sessions go on."""
    try:
      await self._tick()
    except asyncio.CancelledError:
      raise
    except Exception as e:
      await self.send(dict(type="error", kind="session_failed", error=f"{type(e).__name__}: {e}"))
      await self.ws.close(code=1011, message=b"session failed")
      raise

  async def _tick(self):
    loop = asyncio.get_running_loop()
    await self.arrived.wait()
    live, sess = self.live, self.session
    while not self.ws.closed:
      t = sess.t
      while time.perf_counter() < live.ready_at(t):  # complete, or at its deadline
        self.arrived.clear()
        try:
          await asyncio.wait_for(self.arrived.wait(), live.ready_at(t) - time.perf_counter())
        except TimeoutError:
          pass
      ready = live.ready_at(t)
      audio, missing = live.take(t)
      self.heard.writeframes(b"\0\0" * live.S if audio is None
                             else io.to_pcm16(audio).astype("<i2").tobytes())
      for text in self.typed:
        sess.type_text(text)
      self.typed, delegate, self.delegate_next = [], self.delegate_next, False
      def step(audio=audio, missing=missing, delegate=delegate, ready=ready):
        # Lag: from the chunk being ready to its step starting on the compute thread,
        # which includes waiting behind other sessions' micro-turns.
        return sess.step(audio, missing_samples=missing, delegate=delegate,
                         lag_ms=(time.perf_counter() - ready) * 1e3,
                         waited_s=max(0.0, ready - live.due(t)))
      out = await loop.run_in_executor(self.server.compute, step)
      if self.ws.closed:
        break
      await self.ws.send_bytes(io.to_pcm16(out.played).astype("<i2").tobytes())
      if not missing and audio is not None:  # from a real last sample, not a deadline
        self.e2e_all.append((time.perf_counter() - ready) * 1e3)
      for e in out.events:
        await self.send(self.wire_event(e))
      if out.text:
        await self.send(dict(type="event", kind="text", time_s=round((t + 1) * sess.engine.chunk_s, 3),
                             chunk=t, text=out.text))
      for w in out.words:
        await self.send(dict(type="event", kind="word", time_s=w["timestamp"][0],
                             end_s=w["timestamp"][1], text=w["text"]))
      if time.perf_counter() - self.last_latency >= 1.0:
        self.last_latency = time.perf_counter()
        await self.send(self.latency())

  def wire_event(self, e: dict) -> dict:
    e = {k: v for k, v in e.items() if k not in _SKIP}
    if e["kind"] == "tool_result" and e.get("tool") == "chart":
      m = re.search(r"chart saved: (\S+)", str(e.get("result", "")))
      if m:
        rel = os.path.relpath(m.group(1), self.out_dir)
        e = dict(e, kind="chart", url=f"/files/{self.sid}/{rel}")
    return dict(type="event", **e)

  def latency(self) -> dict:
    recs = self.session.records[-LATENCY_WINDOW:]
    compute, e2e = [r.compute_ms for r in recs], self.e2e_all[-LATENCY_WINDOW:]
    return dict(type="latency", time_s=self.time_s(), chunks=self.session.t,
                compute_p50_ms=_pct(compute, 50), compute_p99_ms=_pct(compute, 99),
                e2e_p50_ms=_pct(e2e, 50), e2e_p99_ms=_pct(e2e, 99),
                missing_chunks=sum(r.user_missing for r in recs),
                late_samples=self.live.late_samples, sessions=len(self.server.sessions))

  def finish(self) -> dict:
    """Closes the session and writes its recording (runs on a worker thread)."""
    self.heard.close()
    res = self.session.close()
    res.update(live=True, num_samples=self.session.t * self.server.engine.chunk_samples)
    if res["num_chunks"]:
      res["files"] = outputs.write_all(self.out_dir, res, self.server.engine.chunk_s)
      lag_ms = np.multiply(self.live.arrival_lag_s, 1e3)
      summary = dict(session=self.sid, chunks=res["num_chunks"],
                     received_samples=self.live.received_samples,
                     late_samples=self.live.late_samples,
                     missing_samples=self.live.missing_samples,
                     user_rms=[round(float(x), 6) for x in res["user_rms"]],
                     e2e_ms=dict(p50=_pct(self.e2e_all, 50), p99=_pct(self.e2e_all, 99)),
                     arrival_lag_ms=dict(p50=_pct(lag_ms, 50), p99=_pct(lag_ms, 99),
                                         max=_pct(lag_ms, 100)),
                     jitter_buffer_ms=round(self.live.jitter_buffer_s * 1e3, 1),
                     e2e_all_ms=[round(x, 2) for x in self.e2e_all],
                     compute_all_ms=[round(r.compute_ms, 2) for r in res["records"]],
                     lag_all_ms=[r.lag_ms for r in res["records"]],
                     latency=res["latency"])
      with open(os.path.join(self.out_dir, "session.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return res


class Server:
  """The engine, the compute thread and the sessions; `app()` is the aiohttp application."""

  def __init__(self, engine, *, max_sessions: int = 2, out_root: str = "web_sessions"):
    if max_sessions < 1:
      raise ValueError(f"--max_sessions={max_sessions}; at least 1 session is needed")
    self.engine, self.max_sessions, self.out_root = engine, max_sessions, out_root
    self.compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tml-compute")
    self.closers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tml-close")
    self.sessions: dict[str, WebSession] = {}
    self.finished: list[str] = []
    self._count = 0

  def app(self) -> web.Application:
    app = web.Application()
    app.router.add_get("/", self.index)
    app.router.add_get("/stream", self.stream)
    app.router.add_get("/health", self.health)
    app.router.add_get("/files/{sid}/{path:.+}", self.files)
    app.router.add_static("/static", STATIC)
    app.on_shutdown.append(self._shutdown)
    return app

  async def index(self, request):
    return web.FileResponse(os.path.join(STATIC, "index.html"))

  async def health(self, request):
    return web.json_response(dict(sessions=len(self.sessions), max_sessions=self.max_sessions,
                                  finished=self.finished, protocol=PROTOCOL))

  async def files(self, request):
    sid, rel = request.match_info["sid"], request.match_info["path"]
    root = os.path.realpath(os.path.join(self.out_root, sid))
    path = os.path.realpath(os.path.join(root, rel))
    if not re.fullmatch(r"[\w-]+", sid) or not path.startswith(root + os.sep) or \
        not os.path.isfile(path):
      raise web.HTTPNotFound()
    return web.FileResponse(path)

  def _new_id(self) -> str:
    self._count += 1
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{os.getpid()}-{self._count:04d}"

  async def stream(self, request):
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=4 << 20)
    await ws.prepare(request)
    if len(self.sessions) >= self.max_sessions:
      await ws.send_str(json.dumps(dict(
          type="error", kind="refused",
          reason=f"server busy: all {self.max_sessions} sessions are in use; try again when "
                 "one ends, or start the server with a larger --max_sessions")))
      await ws.close(code=1013, message=b"server busy")
      return ws
    sid = self._new_id()
    loop = asyncio.get_running_loop()
    sess = await loop.run_in_executor(self.closers, WebSession, self, ws, sid)
    self.sessions[sid] = sess
    e = self.engine
    await sess.send(dict(type="hello", session=sid, protocol=PROTOCOL,
                         sample_rate=e.config.layout.sample_rate,
                         chunk_ms=e.config.layout.chunk_ms,
                         jitter_buffer_ms=round(e.jitter_buffer_s * 1e3, 1)))
    ticker = asyncio.create_task(sess.tick())
    try:
      async for msg in ws:
        if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
          await sess.receive(msg)
        if ticker.done():
          break
    finally:
      ticker.cancel()
      try:
        await ticker
      except asyncio.CancelledError:
        pass
      except Exception as err:  # reported in the log; the other sessions go on
        print(f"session {sid}: {type(err).__name__}: {err}", flush=True)
      # A step still on the compute thread finishes first: the session closes after it.
      await loop.run_in_executor(self.compute, lambda: None)
      await loop.run_in_executor(self.closers, sess.finish)
      del self.sessions[sid]
      self.finished.append(sid)
    return ws

  async def _shutdown(self, app):
    for s in list(self.sessions.values()):
      await s.ws.close(code=1001, message=b"server shutting down")


async def _serve(server: "Server", host: str, port: int, print_fn):
  runner = web.AppRunner(server.app())
  await runner.setup()
  site = web.TCPSite(runner, host, port)
  await site.start()
  port = runner.addresses[0][1]  # the real one when --port=0
  print_fn(f"tml_jax web demo on http://{host}:{port}/  (WebSocket ws://{host}:{port}/stream; "
           f"{server.max_sessions} session(s); recordings in {server.out_root})")
  stop = asyncio.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    asyncio.get_running_loop().add_signal_handler(sig, stop.set)
  try:
    await stop.wait()
  finally:
    await runner.cleanup()  # open sessions are closed and their recordings written


def serve(engine, *, host: str = "127.0.0.1", port: int = 8000, max_sessions: int = 2,
          out_root: str = "web_sessions", print_fn=print):
  """Runs the server until interrupted (Ctrl-C or SIGTERM)."""
  from tml_jax.serve.engine import _blas_threads
  server = Server(engine, max_sessions=max_sessions, out_root=out_root)
  _blas_threads(1)  # process-wide: the vocoder's small matmuls, see Engine.run_wav
  try:
    asyncio.run(_serve(server, host, port, print_fn))
  finally:
    server.compute.shutdown(wait=True)
    server.closers.shutdown(wait=True)


def main(argv):
  del argv
  from tml_jax.serve.engine import Engine
  kw = {} if _TEMPERATURE.value is None else dict(temperature=_TEMPERATURE.value)
  if _SPEAK_THRESHOLD.value is not None:
    kw["speak_threshold"] = _SPEAK_THRESHOLD.value
  engine = Engine.from_workdir(_WORKDIR.value, _CONFIG.value, **kw)
  if _JITTER_BUFFER_MS.value is not None:
    if _JITTER_BUFFER_MS.value < 0:
      raise ValueError(f"--jitter_buffer_ms={_JITTER_BUFFER_MS.value}; pass 0 or more")
    engine.jitter_buffer_s = _JITTER_BUFFER_MS.value / 1000
  out_root = _OUT_DIR.value or os.path.join(_WORKDIR.value, "web_sessions")
  serve(engine, host=_HOST.value, port=_PORT.value, max_sessions=_MAX_SESSIONS.value,
        out_root=out_root, print_fn=lambda s: print(s, flush=True))


if __name__ == "__main__":
  from absl import app as absl_app, flags
  _WORKDIR = flags.DEFINE_string("workdir", None, "Trainer workdir (its latest checkpoint).",
                                 required=True)
  _CONFIG = flags.DEFINE_string("config", None, "Config when W has no config.json.")
  _HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
  _PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).")
  _MAX_SESSIONS = flags.DEFINE_integer("max_sessions", 2, "Concurrent sessions; more are "
                                       "refused with a message.")
  _OUT_DIR = flags.DEFINE_string("out_dir", None, "Where session recordings go (default "
                                 "W/web_sessions).")
  _TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature (default "
                                    "config.serve.temperature).")
  _JITTER_BUFFER_MS = flags.DEFINE_float(
      "jitter_buffer_ms", None, "How long past its due time a chunk may still arrive and be "
      "heard (default config.serve.jitter_buffer_ms, 100). Raise it on jittery networks: "
      "each millisecond is added to the latency.")
  _SPEAK_THRESHOLD = flags.DEFINE_float("speak_threshold", None, "The speak gate's threshold "
                                        "(default: the one calibrated in W, else 0.5).")
  absl_app.run(main)
