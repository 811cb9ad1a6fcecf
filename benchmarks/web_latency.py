r"""The web demo's latency at real-time pace: end to end and per micro-turn, with 1..N
concurrent sessions.

  python benchmarks/web_latency.py --workdir=runs/tiny --seconds=60 --sessions=1,2,4

Starts `python -m tml_jax.serve.web` on a free port, then for each session count K streams
K clients at once (`tml_jax.serve.web_client`, 20 ms frames at real-time pace, speech from
the Full-Duplex-Bench export when --fdb is given, else speech-like tone bursts). The first
count runs --seconds; later counts run --seconds_concurrent. From each session's
session.json / latency.json it reports, pooled over the K sessions:
  e2e      the last sample of chunk t arriving at the server -> the answer's first sample sent
           (the browser adds its playback lead, ~50 ms, on top);
  compute  the micro-turn itself (model step + vocoder), as the engine times it;
  missing  chunks not heard by their jitter-buffer deadline while the client streamed (the
           ones after it stopped are counted apart); lag = chunk ready -> its step starting
           on the compute thread (queueing behind other sessions' micro-turns).
Prints a table and writes --out/web_latency.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Trainer workdir to serve.")
_SECONDS = flags.DEFINE_float("seconds", 60.0, "Length of the first (single) session.")
_SECONDS_CONC = flags.DEFINE_float("seconds_concurrent", 20.0, "Length of concurrent ones.")
_SESSIONS = flags.DEFINE_list("sessions", ["1", "2", "4"], "Concurrent session counts.")
_FDB = flags.DEFINE_string("fdb", None, "A Full-Duplex-Bench export: its input.wav files "
                           "are the clients' speech.")
_OUT = flags.DEFINE_string("out", None, "Folder for web_latency.json (default: a temp dir).")


def _speech(seconds: float, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if _FDB.value:
    from tml_jax.audio import io
    wavs = []
    for root, _, files in sorted(os.walk(_FDB.value)):
      if "input.wav" in files:
        wav, rate = io.load_wav(os.path.join(root, "input.wav"))
        wavs.append(io.check_wav(wav, rate))
    rng.shuffle(wavs)
    x = np.concatenate(wavs) if wavs else np.zeros(0, np.float32)
    x = np.tile(x, int(np.ceil(seconds * 16000 / max(1, x.size))))[:int(seconds * 16000)]
  else:
    n = int(seconds / 0.4)
    env = np.repeat(rng.uniform(0.05, 0.4, n) * (rng.random(n) > 0.3), 6400)
    x = env * np.sin(2 * np.pi * 220 * np.arange(env.size) / 16000)
  return (np.clip(x, -1, 1) * 32767).astype(np.int16)


def _pct(x, q):
  return round(float(np.percentile(x, q)), 1) if len(x) else None


def main(argv):
  del argv
  from tml_jax.serve.web_client import stream
  out = _OUT.value or tempfile.mkdtemp(prefix="web_latency_")
  os.makedirs(out, exist_ok=True)
  sessions_dir = os.path.join(out, "sessions")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  counts = [int(k) for k in _SESSIONS.value]
  log = open(os.path.join(out, "server.log"), "w+")
  proc = subprocess.Popen([sys.executable, "-m", "tml_jax.serve.web",
                           f"--workdir={_WORKDIR.value}", f"--port={port}",
                           f"--max_sessions={max(counts)}", f"--out_dir={sessions_dir}"],
                          stdout=log, stderr=subprocess.STDOUT)
  t0 = time.time()
  while True:
    log.seek(0)
    if "web demo on http://" in log.read():
      break
    if proc.poll() is not None or time.time() - t0 > 300:
      log.seek(0)
      raise SystemExit(f"the server did not start:\n{log.read()[-2000:]}")
    time.sleep(0.5)
  print(f"server up in {time.time() - t0:.0f} s on port {port}", flush=True)
  rows = []
  try:
    for i, k in enumerate(counts):
      seconds = _SECONDS.value if i == 0 else _SECONDS_CONC.value
      before = set(os.listdir(sessions_dir)) if os.path.isdir(sessions_dir) else set()
      print(f"{k} session(s) x {seconds:.0f} s ...", flush=True)

      async def run_all():
        url = f"ws://127.0.0.1:{port}/stream"
        return await asyncio.gather(*(stream(url, _speech(seconds, j)) for j in range(k)))
      asyncio.run(run_all())
      new = []
      for _ in range(120):  # their recordings are written after the sockets close
        new = sorted(set(os.listdir(sessions_dir)) - before)
        if len(new) == k and all(os.path.exists(os.path.join(sessions_dir, n, "session.json"))
                                 for n in new):
          break
        time.sleep(0.5)
      summaries = [json.load(open(os.path.join(sessions_dir, n, "session.json"))) for n in new]
      e2e, compute, lag, missing, after = [], [], [], 0, 0
      sent_chunks = int(seconds / 0.2)
      for n in new:
        summary = json.load(open(os.path.join(sessions_dir, n, "session.json")))
        e2e += summary["e2e_all_ms"]
        compute += summary["compute_all_ms"]
        lag += summary["lag_all_ms"]
        with open(os.path.join(sessions_dir, n, "events.jsonl")) as f:
          chunks = [e["chunk"] for e in map(json.loads, f) if e["kind"] == "input_missing"]
        missing += sum(c < sent_chunks for c in chunks)  # while the client was streaming
        after += sum(c >= sent_chunks for c in chunks)   # after it stopped: expected
      row = dict(sessions=k, seconds=seconds, chunks=sum(s["chunks"] for s in summaries),
                 e2e_p50_ms=_pct(e2e, 50), e2e_p99_ms=_pct(e2e, 99),
                 compute_p50_ms=_pct(compute, 50), compute_p99_ms=_pct(compute, 99),
                 lag_p99_ms=_pct(lag, 99),
                 missing_chunks=missing, silent_after_stream_chunks=after,
                 late_samples=sum(s["late_samples"] for s in summaries))
      rows.append(row)
      print(json.dumps(row), flush=True)
  finally:
    proc.terminate()
    proc.wait(60)
  print(f"\nweb demo at real-time pace, {_WORKDIR.value}, {platform.machine()} "
        f"{os.cpu_count()} cores")
  print("| sessions | s each | chunks | e2e p50 / p99 ms | compute p50 / p99 ms | lag p99 ms | "
        "missing |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['sessions']} | {r['seconds']:.0f} | {r['chunks']} | {r['e2e_p50_ms']} / "
          f"{r['e2e_p99_ms']} | {r['compute_p50_ms']} / {r['compute_p99_ms']} | "
          f"{r['lag_p99_ms']} | {r['missing_chunks']} |")
  with open(os.path.join(out, "web_latency.json"), "w") as f:
    json.dump(dict(rows=rows, workdir=_WORKDIR.value, cpu_count=os.cpu_count()), f, indent=1)
  print(f"wrote {out}/web_latency.json")


if __name__ == "__main__":
  app.run(main)
