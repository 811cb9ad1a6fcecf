r"""Memory over a long offline session: the engine run from a wav file on disk for an hour.

  python benchmarks/long_session.py --workdir=runs/tiny --minutes=60   # a trained checkpoint
  python benchmarks/long_session.py --minutes=10                       # tiny, random weights

Writes a speech-like input of --minutes to a temporary 16 kHz int16 wav, runs it through
`Engine.run_file` (the input read chunk by chunk, output.wav streamed) and samples the
process's resident memory (RSS) at the start of every simulated minute of the session.
Prints RSS at 1, 5, 30 and 59 min (those reached), the growth per hour, and RSS after the
outputs (timeline plot included) are written; the samples go to --out/long_session.json.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/interaction.py:tiny", "path:variant")
_WORKDIR = flags.DEFINE_string("workdir", None, "Trainer workdir (else random weights).")
_MINUTES = flags.DEFINE_float("minutes", 60.0, "Session length in minutes.")
_OUT = flags.DEFINE_string("out", None, "Folder for long_session.json (default: a temp dir).")


def rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv):
  del argv
  import numpy as np

  from tml_jax.audio import io
  from tml_jax.serve.engine import Engine, load_config
  engine = (Engine.from_workdir(_WORKDIR.value, _CONFIG.value) if _WORKDIR.value
            else Engine.from_config(load_config(None, _CONFIG.value)))
  out = _OUT.value or tempfile.mkdtemp(prefix="long_session_")
  os.makedirs(out, exist_ok=True)
  n = int(_MINUTES.value * 60 * 16000)
  rng = np.random.default_rng(0)
  wav_path = os.path.join(out, "input.wav")
  # Bursts of a 200 Hz tone (turns) and noise, written in 1-minute pieces (bounded memory).
  import wave
  with wave.open(wav_path, "wb") as w:
    w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    for a in range(0, n, 960_000):
      t = np.arange(a, min(n, a + 960_000)) / 16000
      x = (0.2 * np.sin(2 * np.pi * 200 * t) * (np.sin(2 * np.pi * 0.1 * t) > 0)
           + 0.01 * rng.standard_normal(t.size))
      w.writeframes(np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
  samples, real_step = [], engine.stream.step
  per_minute = int(60 / engine.chunk_s)
  t0 = time.perf_counter()

  def step(obs, **kw):
    t = engine.stream.t
    if t % per_minute == 0:
      samples.append(dict(minute=t // per_minute, rss_mb=round(rss_mb(), 1),
                          wall_s=round(time.perf_counter() - t0, 1)))
      m = t // per_minute
      if m and m % 5 == 0:
        rate = t / (time.perf_counter() - t0)
        eta = (n / 16000 / engine.chunk_s - t) / rate
        print(f"minute {m}: RSS {samples[-1]['rss_mb']} MB, {rate:.1f} chunks/s, "
              f"ETA {eta / 60:.1f} min", flush=True)
    return real_step(obs, **kw)

  engine.stream.step = step
  res = engine.run_file(wav_path, os.path.join(out, "run"))
  # In-session samples only: afterwards write_all draws the hour's timeline (matplotlib).
  by = {s["minute"]: s["rss_mb"] for s in samples}
  last = samples[-1]
  first = by.get(1, samples[0]["rss_mb"])
  growth = (last["rss_mb"] - first) / max(last["minute"] - 1, 1e-9) * 60
  result = dict(minutes=_MINUTES.value, chunks=res["num_chunks"],
                source=_WORKDIR.value or _CONFIG.value, samples=samples,
                rss_mb_at={m: by[m] for m in (1, 5, 30, 59, 60) if m in by},
                rss_mb_after_writing_outputs=round(rss_mb(), 1),
                growth_mb_per_hour_after_minute_1=round(growth, 1),
                latency=res["latency"], machine=os.uname().machine, cpus=os.cpu_count())
  with open(os.path.join(out, "long_session.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: result[k] for k in ("minutes", "chunks", "rss_mb_at",
                                           "growth_mb_per_hour_after_minute_1",
                                           "rss_mb_after_writing_outputs")}))
  print(f"wrote {out}/long_session.json")


if __name__ == "__main__":
  app.run(main)
