"""The live web demo: the jitter buffer's re-chunking, the WebSocket protocol from a Python
client at real-time pace, the session limit, and the page itself in headless Chromium.

One server process (`python -m tml_jax.serve.web`, an untrained tiny model whose speak gate
is opened and whose text is sampled, so it talks) serves every test in this module.
"""

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import wave

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")

from tml_jax.serve.inputs import LiveInput  # noqa: E402
from tml_jax.serve.web_client import stream  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR, S = 16000, 3200


# ----------------------------------------------------------------------------- LiveInput

class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_live_input_rechunks_any_frame_sizes_exactly(rng):
  clock = FakeClock()
  live = LiveInput(S, chunk_s=0.2, jitter_buffer_s=0.1, now=clock)
  pcm = rng.integers(-30000, 30000, 7 * S + 123).astype("<i2")
  cuts = np.sort(rng.choice(np.arange(1, pcm.size), 40, replace=False))
  pieces = np.split(pcm, cuts)
  for p in pieces:  # all on time: a frame arrives when its last sample was captured
    live.push(p.tobytes())
    clock.now += p.size / SR if live.received_samples > p.size else 0.0
  got = []
  for t in range(7):
    assert live.ready_at(t) <= clock.now
    audio, missing = live.take(t)
    assert missing == 0
    got.append(audio)
  ref = pcm[:7 * S].astype(np.float32) / 32768
  np.testing.assert_array_equal(np.concatenate(got), ref)
  assert live.late_samples == 0 and live.missing_samples == 0


def test_live_input_jitter_buffer_deadline_and_late_samples(rng):
  clock = FakeClock()
  live = LiveInput(S, chunk_s=0.2, jitter_buffer_s=0.1, now=clock)
  pcm = rng.integers(-30000, 30000, 4 * S).astype("<i2")
  live.push(pcm[:S].tobytes())        # chunk 0, on time: t0 = now - 0.2
  t0 = live.t0
  assert live.ready_at(0) == clock.now
  assert live.take(0)[1] == 0
  # Chunk 1 arrives 60 ms late: inside the 100 ms buffer, so it is used whole.
  clock.now = t0 + 0.4 + 0.06
  live.push(pcm[S:2 * S].tobytes())
  assert live.ready_at(1) == pytest.approx(t0 + 0.46)
  audio, missing = live.take(1)
  np.testing.assert_array_equal(audio, pcm[S:2 * S] / 32768)
  assert missing == 0
  # Chunk 2: half of it by the deadline, the rest after it -> heard as what arrived.
  clock.now = t0 + 0.65
  live.push(pcm[2 * S:2 * S + S // 2].tobytes())
  assert live.ready_at(2) == pytest.approx(t0 + 0.6 + 0.1)
  audio, missing = live.take(2)
  assert missing == S // 2
  np.testing.assert_array_equal(audio[:S // 2], pcm[2 * S:2 * S + S // 2] / 32768)
  assert not audio[S // 2:].any()
  clock.now = t0 + 0.75
  live.push(pcm[2 * S + S // 2:4 * S].tobytes())  # the rest of 2 is late; 3 is on time
  assert live.late_samples == S // 2
  audio, missing = live.take(3)
  np.testing.assert_array_equal(audio, pcm[3 * S:] / 32768)
  # Chunk 4 never comes: at its deadline nothing of it is heard.
  assert live.ready_at(4) == pytest.approx(t0 + 1.0 + 0.1)
  assert live.take(4) == (None, S)
  with pytest.raises(ValueError, match="even number of bytes"):
    live.push(b"\x00\x01\x02")
  with pytest.raises(ValueError, match="ahead of real time"):
    live.push(np.zeros(40 * SR, "<i2").tobytes())


# ----------------------------------------------------------------------------- server

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(random_workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("web_sessions"))
  port = _free_port()
  log = open(os.path.join(out, "server.log"), "w+")
  proc = subprocess.Popen(
      [sys.executable, "-m", "tml_jax.serve.web", f"--workdir={random_workdir}",
       f"--port={port}", f"--out_dir={out}", "--max_sessions=1", "--speak_threshold=0",
       "--temperature=1.0"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  deadline = time.time() + 240
  while True:
    log.seek(0)
    if "web demo on http://" in log.read():
      break
    if proc.poll() is not None or time.time() > deadline:
      log.seek(0)
      proc.kill()
      pytest.fail(f"the server did not start:\n{log.read()[-3000:]}")
    time.sleep(0.5)
  yield dict(port=port, out=out, url=f"http://127.0.0.1:{port}")
  proc.terminate()
  try:
    proc.wait(30)
  except subprocess.TimeoutExpired:
    proc.kill()
  log.close()


async def _health(server):
  async with aiohttp.ClientSession() as s:
    async with s.get(server["url"] + "/health") as r:
      return await r.json()


async def _wait_idle(server, finished_before: int, timeout: float = 60):
  """Until the last session has ended and its recording is written."""
  t0 = time.time()
  while time.time() - t0 < timeout:
    h = await _health(server)
    if h["sessions"] == 0 and len(h["finished"]) > finished_before:
      return h["finished"][-1]
    await asyncio.sleep(0.2)
  raise AssertionError("the session did not finish")


def _bursts(rng, seconds: float, segment_s: float = 0.4) -> np.ndarray:
  """Tone bursts of random loudness (some silent): an energy envelope to recognise."""
  n = int(seconds / segment_s)
  level = rng.uniform(0.05, 0.5, n) * (rng.random(n) > 0.25)
  env = np.repeat(level, int(segment_s * SR))
  t = np.arange(env.size) / SR
  return (env * np.sin(2 * np.pi * rng.uniform(180, 400) * t)).astype(np.float32)


def _chunk_rms(x, n=S):
  x = x[:x.size // n * n].reshape(-1, n).astype(np.float64)
  return np.sqrt(np.mean(x ** 2, axis=1))


def _read_wav(path):
  with wave.open(path) as w:
    return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


async def _client(server, wav, **kw):
  pcm = (np.clip(wav, -1, 1) * 32767).astype(np.int16)
  return await stream(f"ws://127.0.0.1:{server['port']}/stream", pcm, **kw)


def test_protocol_over_a_python_client(server, rng):
  seconds = 6.0
  wav = _bursts(rng, seconds)
  before = len(asyncio.run(_health(server))["finished"])
  got = asyncio.run(_client(server, wav, actions=[
      (0, "not json"), (0, json.dumps({"type": "dance"})), (0, b"\x01\x02\x03"),
      (SR, json.dumps({"type": "delegate"})),
      (2 * SR, json.dumps({"type": "text", "text": "hello there"}))]))
  sid = asyncio.run(_wait_idle(server, before))
  assert got["hello"]["protocol"] == 1 and got["hello"]["chunk_ms"] == 200
  # Bad frames: three error events, and the session went on.
  errors = [e for e in got["events"] if e["kind"] == "error"]
  assert len(errors) == 3, errors
  assert "not JSON" in errors[0]["error"] and "dance" in errors[1]["error"]
  assert "3 bytes" in errors[2]["error"]
  # One micro-turn of audio per chunk heard, each exactly 200 ms of int16.
  C = int(seconds / 0.2)
  assert {len(a) for a in got["audio"]} == {2 * S}
  assert C <= len(got["audio"]) <= C + 3
  kinds = [e["kind"] for e in got["events"]]
  assert "delegation" in kinds and "background_result" in kinds and "text_in" in kinds
  assert [e["text"] for e in got["events"] if e["kind"] == "text_in"] == ["hello there"]
  assert "".join(e["text"] for e in got["events"] if e["kind"] == "text"), "the model was silent"
  lat = got["latency"][-1]
  assert len(got["latency"]) >= seconds - 1
  assert 0 < lat["compute_p50_ms"] <= lat["compute_p99_ms"] and lat["e2e_p50_ms"] > 0
  # What the server heard is what was sent: chunk by chunk, nothing missing at real time.
  summary = json.load(open(os.path.join(server["out"], sid, "session.json")))
  assert summary["received_samples"] == wav.size
  assert summary["late_samples"] == 0
  heard = _read_wav(os.path.join(server["out"], sid, "input.wav"))
  n = min(heard.size, wav.size) // S * S
  assert n >= C * S - S
  np.testing.assert_allclose(heard[:n], np.round(wav[:n] * 32767) / 32768, atol=1e-4)
  missing = [e for e in got["events"] if e["kind"] == "input_missing"]
  assert all(e["chunk"] >= C for e in missing), missing  # only after the stream stopped
  out = _read_wav(os.path.join(server["out"], sid, "output.wav"))
  assert out.size == summary["chunks"] * S


def test_sessions_past_the_limit_are_refused(server, rng):
  async def run():
    before = len((await _health(server))["finished"])
    async with aiohttp.ClientSession() as s:
      async with s.ws_connect(f"ws://127.0.0.1:{server['port']}/stream") as first:
        hello = json.loads((await first.receive(timeout=30)).data)
        assert hello["type"] == "hello"
        await first.send_bytes(np.zeros(S, "<i2").tobytes())
        async with s.ws_connect(f"ws://127.0.0.1:{server['port']}/stream") as second:
          msg = json.loads((await second.receive(timeout=30)).data)
          closing = await second.receive(timeout=30)
          assert msg["type"] == "error" and msg["kind"] == "refused"
          assert "max_sessions" in msg["reason"]
          assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
          assert second.close_code == 1013
        # The first session is untouched by the refusal: it still answers.
        for _ in range(20):
          m = await first.receive(timeout=30)
          if m.type == aiohttp.WSMsgType.BINARY:
            break
        assert m.type == aiohttp.WSMsgType.BINARY and len(m.data) == 2 * S
    await _wait_idle(server, before)
  asyncio.run(run())


# ----------------------------------------------------------------------------- the page

def _chromium():
  for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
    path = shutil.which(name)
    if path:
      return path
  return None


class CDP:
  """The DevTools protocol over one page's WebSocket."""

  def __init__(self, ws):
    self.ws, self.n = ws, 0

  async def call(self, method, **params):
    self.n += 1
    await self.ws.send_str(json.dumps(dict(id=self.n, method=method, params=params)))
    while True:
      msg = json.loads((await self.ws.receive(timeout=60)).data)
      if msg.get("id") == self.n:
        if "error" in msg:
          raise RuntimeError(f"{method}: {msg['error']}")
        return msg["result"]

  async def eval(self, expr):
    r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True,
                        awaitPromise=True)
    if "exceptionDetails" in r:
      raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
    return r["result"].get("value")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on PATH (Debian: apt-get install "
                    "chromium); the protocol is covered by test_protocol_over_a_python_client")
def test_page_in_headless_chromium(server, rng, tmp_path):
  seconds = 8.0
  wav = _bursts(rng, 2 * seconds)  # longer than the session: Chromium's loop is not reached
  wav_path = str(tmp_path / "mic.wav")
  with wave.open(wav_path, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(SR)
    w.writeframes((wav * 32767).astype("<i2").tobytes())
  profile = tmp_path / "profile"
  browser = subprocess.Popen(
      [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
       "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
       f"--use-file-for-fake-audio-capture={wav_path}", "--autoplay-policy=no-user-gesture-required",
       "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,860",
       "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  shot = os.environ.get("TML_WEB_SCREENSHOT", str(tmp_path / "page.png"))

  async def drive():
    t0 = time.time()
    while not (profile / "DevToolsActivePort").exists():
      assert browser.poll() is None and time.time() - t0 < 60, "Chromium did not start"
      await asyncio.sleep(0.2)
    await asyncio.sleep(0.3)
    port = int((profile / "DevToolsActivePort").read_text().split()[0])
    before = len((await _health(server))["finished"])
    async with aiohttp.ClientSession() as s:
      async with s.get(f"http://127.0.0.1:{port}/json") as r:
        page = next(t for t in await r.json() if t["type"] == "page")
      async with s.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=1 << 26) as ws:
        cdp = CDP(ws)
        await cdp.call("Page.enable")
        await cdp.call("Page.navigate", url=server["url"] + "/?autostart=1&raw=1")
        t_start = time.time()
        while not await cdp.eval("!!(window.tml && window.tml.hello)"):
          assert time.time() - t_start < 30, await cdp.eval("JSON.stringify(window.tml||{})")
          await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)
        await cdp.eval("tml.delegate()")
        while time.time() - t_start < seconds + 1.0 or not await cdp.eval("tml.results.length"):
          assert time.time() - t_start < seconds + 30, "no background result reached the page"
          await asyncio.sleep(0.25)
        state = json.loads(await cdp.eval(
            "JSON.stringify({sent: tml.sentSamples, received: tml.receivedChunks, "
            "scheduled: tml.scheduledChunks, text: tml.text, results: tml.results, "
            "errors: tml.errors, latency: tml.latency, "
            "wordsShown: document.getElementById('words').textContent, "
            "resultsShown: [...document.querySelectorAll('.result')].map(e => e.textContent)})"))
        # Stop first: a screenshot stalls the page's main thread, and with it the frames.
        await cdp.eval("tml.stop()")
        png = await cdp.call("Page.captureScreenshot", format="png")
        with open(shot, "wb") as f:
          f.write(base64.b64decode(png["data"]))
    sid = await _wait_idle(server, before)
    return state, sid

  try:
    state, sid = asyncio.run(drive())
  finally:
    browser.terminate()
    try:
      browser.wait(20)
    except subprocess.TimeoutExpired:
      browser.kill()
  d = os.path.join(server["out"], sid)
  summary = json.load(open(os.path.join(d, "session.json")))
  print("arrival lag (ms) of the browser's chunks:", summary["arrival_lag_ms"])
  # The server heard the test wav: its energy per chunk, at the best alignment (the fake
  # capture starts playing the file before the page starts sending), matches the file's.
  heard = _read_wav(os.path.join(d, "input.wav"))
  assert summary["received_samples"] >= int(seconds * SR)
  env = lambda x: _chunk_rms(x, 160)  # 10 ms
  ref, got = env(wav), env(heard[:int(seconds * SR)])
  corr = [np.corrcoef(got, ref[k:k + got.size])[0, 1] for k in range(ref.size - got.size)]
  k = int(np.argmax(corr))
  assert corr[k] > 0.95, max(corr)
  ref_chunks = _chunk_rms(wav[k * 160:][:heard.size // S * S])
  got_chunks = _chunk_rms(heard)[:ref_chunks.size]
  loud = ref_chunks > 0.02
  np.testing.assert_allclose(got_chunks[loud], ref_chunks[loud], rtol=0.15)
  # The page received the model's audio and scheduled every chunk of it.
  assert state["received"] >= summary["chunks"] - 2 and state["received"] >= seconds / 0.2 - 2
  assert state["scheduled"] == state["received"]
  # The model's words and the forced delegation's result are shown.
  events = [json.loads(line) for line in open(os.path.join(d, "events.jsonl"))]
  norm = lambda x: x.replace("\r\n", "\n").replace("\r", "\n")  # as HTML reads text
  results = [norm(e["text"]) for e in events if e["kind"] == "background_result"]
  shown = [norm(x) for x in state["resultsShown"]]
  assert results and shown and shown == results[:len(shown)]
  assert state["text"] and norm(state["wordsShown"]) == norm(state["text"][-4000:])
  assert not state["errors"], state["errors"]
  # Real-time pace: no chunk was lost or late while the microphone ran.
  latency = json.load(open(os.path.join(d, "latency.json")))
  assert latency["jitter_buffer"]["missing_chunks"] == 0, latency
  assert summary["late_samples"] == 0
  assert os.path.getsize(shot) > 10_000
