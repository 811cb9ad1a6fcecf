r"""Per-micro-turn compute of the streaming engine over a 60 s input (offline clock).

  python benchmarks/engine_latency.py                       # tiny, random weights
  python benchmarks/engine_latency.py --config=configs/interaction.py:tiny,smoke --seconds=20
  python benchmarks/engine_latency.py --workdir=runs/tiny   # a trained checkpoint

Prints p50/p90/p99/max compute per 200 ms micro-turn (featurise + jitted step + vocoder),
the real-time factor (mean compute / 200 ms) and the machine's load average; the goal is
p99 < 200 ms. The split line separates the model step from the vocoder.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/interaction.py:tiny", "path:variant")
_WORKDIR = flags.DEFINE_string("workdir", None, "Trainer workdir (else random weights).")
_SECONDS = flags.DEFINE_float("seconds", 60.0, "Input length.")
_GL = flags.DEFINE_integer("griffin_lim_iters", None, "Vocoder iterations (config default).")


def main(argv):
  del argv
  import numpy as np

  from tml_jax.audio import vocoder
  from tml_jax.serve.engine import Engine, load_config
  kw = {} if _GL.value is None else dict(griffin_lim_iters=_GL.value)
  t0 = time.perf_counter()
  engine = (Engine.from_workdir(_WORKDIR.value, _CONFIG.value, **kw) if _WORKDIR.value
            else Engine.from_config(load_config(None, _CONFIG.value), **kw))
  print(f"engine ready (load + compile) in {time.perf_counter() - t0:.1f}s; cache "
        f"{engine.stream.cache_nbytes() / 1e6:.2f} MB", flush=True)
  rng = np.random.default_rng(0)
  n = int(_SECONDS.value * 16000)
  t = np.arange(n) / 16000
  wav = (0.2 * np.sin(2 * np.pi * 200 * t) * (np.sin(2 * np.pi * 0.3 * t) > 0)
         + 0.01 * rng.standard_normal(n)).astype(np.float32)
  from tml_jax.serve import outputs
  res = engine.run_wav(wav)
  lat = outputs.latency(res["records"], engine.chunk_s)
  # Vocoder share, measured apart on the same mel shape.
  mel = np.full((engine.lay.user_audio, 80), -3.0, np.float32)
  from tml_jax.serve.engine import _blas_threads
  with _blas_threads(1):
    v0 = time.perf_counter()
    for _ in range(20):
      vocoder.vocode(mel, n_iter=engine.gl_iters)
    voc_ms = (time.perf_counter() - v0) / 20 * 1e3
  lat["vocoder_ms"] = round(voc_ms, 3)
  lat["config"] = _CONFIG.value if not _WORKDIR.value else _WORKDIR.value
  lat["input_s"] = _SECONDS.value
  print(json.dumps(lat, indent=1))
  print(f"p50 {lat['p50_ms']:.1f} ms  p90 {lat['p90_ms']:.1f} ms  p99 {lat['p99_ms']:.1f} ms  "
        f"RTF {lat['real_time_factor']:.3f}  (vocoder {voc_ms:.1f} ms)  load "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
  app.run(main)
