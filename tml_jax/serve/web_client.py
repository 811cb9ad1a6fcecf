"""A Python client of the web demo's protocol (`tml_jax.serve.web`): streams audio at
real-time pace and collects what the server sends. Tests and benchmarks use it; so can a
script that wants to talk to a running server without a browser.

  import asyncio, numpy as np
  from tml_jax.serve.web_client import stream
  got = asyncio.run(stream("ws://127.0.0.1:8000/stream", pcm_int16))
  got["audio"]   # the model's micro-turns (6400-byte int16 frames), got["events"], ...
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import numpy as np


async def stream(url: str, pcm: np.ndarray, *, frame: int = 320, sample_rate: int = 16000,
                 actions=(), tail_s: float = 0.6) -> dict:
  """Sends `pcm` (int16 mono) in `frame`-sample frames, each when its last sample would
  have been captured; `actions`: (sample index, str or bytes message) sent before that
  sample. After the stream, waits `tail_s` for the last answers, then closes. Returns
  {"hello", "audio": [bytes], "events": [dict], "latency": [dict], "other": [dict],
  "close_code"}."""
  pcm = np.asarray(pcm)
  if pcm.dtype != np.int16:
    raise ValueError(f"pcm has dtype {pcm.dtype}; pass int16 samples (e.g. "
                     "(np.clip(x, -1, 1) * 32767).astype(np.int16) for float audio)")
  pcm = pcm.astype("<i2")
  got = dict(audio=[], events=[], latency=[], hello=None, other=[], close_code=None)
  actions = sorted(actions, key=lambda a: a[0])
  async with aiohttp.ClientSession() as s:
    async with s.ws_connect(url, max_msg_size=1 << 24) as ws:
      async def receive():
        async for m in ws:
          if m.type == aiohttp.WSMsgType.BINARY:
            got["audio"].append(m.data)
            continue
          d = json.loads(m.data)
          if d.get("type") == "hello":
            got["hello"] = d
          else:
            got.get({"event": "events", "latency": "latency"}.get(d.get("type")),
                    got["other"]).append(d)
      task = asyncio.create_task(receive())
      t0 = time.perf_counter()
      for i in range(0, pcm.size, frame):
        while actions and actions[0][0] <= i:
          msg = actions.pop(0)[1]
          await (ws.send_bytes(msg) if isinstance(msg, bytes) else ws.send_str(msg))
        if ws.closed:
          break
        await ws.send_bytes(pcm[i:i + frame].tobytes())
        await asyncio.sleep(max(0.0, t0 + (i + frame) / sample_rate - time.perf_counter()))
      await asyncio.sleep(tail_s)
      await ws.close()
      await task
      got["close_code"] = ws.close_code
  return got
