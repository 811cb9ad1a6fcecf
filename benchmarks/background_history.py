"""What the background model's pooled history costs: memory per minute of conversation, and
one delegation's decode time with the history against without it, timed side by side.

  python benchmarks/background_history.py [--config=configs/interaction.py:tiny]
      [--minutes=5] [--tokens=48] [--reps=5]

A randomly initialised model of the config (the costs do not depend on training): the engine
steps through `--minutes` of silence-and-noise input so the history ring is full, then the
background decoder (tml_jax.serve.worker.ModelGenerator) writes `--tokens` tokens from that
context, once with `background.history_chunks` as configured and once with 0 (window
only). Both decoders are compiled first, then timed interleaved; each figure is the median
over --reps. Memory is the ring's exact size (StreamingModel.history_nbytes) and the
per-chunk cost times the chunks in a minute.

Importable without TensorFlow, grain or clu.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tml_jax.serve.engine import load_config  # noqa: E402
from tml_jax.model.transformer import InteractionModel, ModelConfig  # noqa: E402
from tml_jax.serve.stream import StreamingModel, serving_config  # noqa: E402
from tml_jax.serve.worker import ModelGenerator  # noqa: E402
from tml_jax.text import tokenizer as tok  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/interaction.py:tiny")
  ap.add_argument("--minutes", type=float, default=5.0)
  ap.add_argument("--tokens", type=int, default=48)
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  config = serving_config(load_config(None, args.config))
  cfg = ModelConfig.from_config(config)
  if cfg.background is None or cfg.background.history_chunks == 0:
    sys.exit(f"{args.config}: background.history_chunks is 0 or the background model is "
             "off; nothing to measure")
  model = InteractionModel(cfg, rngs=nnx.Rngs(0))
  sm = StreamingModel(model, flow_steps=1)
  lay = cfg.layout
  per_min = int(round(60_000 / config.layout.chunk_ms))
  n = int(args.minutes * per_min)
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  for t in range(n):
    obs = dict(user_dmel=rng.integers(0, 16, (1, 1, lay.user_audio, 80)).astype(np.int32),
               self_dmel=np.zeros((1, 1, lay.self_audio, 80), np.int32),
               self_speaking=np.zeros((1, 1), bool),
               text_in=np.full((1, 1, lay.text_in), tok.PAD, np.int32),
               video_valid=np.bool_(False))
    if lay.video:
      obs["video"] = np.zeros((1, 1, lay.video, cfg.patch_size ** 2 * 3), np.uint8)
    sm.step(obs)
    if (t + 1) % per_min == 0:
      rate = (t + 1) / (time.perf_counter() - t0)
      print(f"  stepped {t + 1}/{n} chunks, {rate:.1f} chunks/s, "
            f"ETA {(n - t - 1) / rate:.0f} s", flush=True)
  ctx = sm.context()
  H = cfg.background.history_chunks
  filled = int((np.asarray(ctx[3]) >= 0).sum())
  with_h = ModelGenerator(model.background, cfg.window)
  bg0 = nnx.merge(*nnx.split(model.background))
  bg0.cfg = dataclasses.replace(bg0.cfg, history_chunks=0)
  without = ModelGenerator(bg0, cfg.window)
  prompt, stops = [tok.BOS], (-1,)  # no stop: always `max_len` - 1 tokens would be written
  gens = {"window + history": with_h, "window only": without}
  for g in gens.values():
    g.max_len = min(g.max_len, args.tokens + 1)
    g(ctx, prompt, stops, n - 1)  # compile
  times = {k: [] for k in gens}
  for _ in range(args.reps):
    for k, g in gens.items():
      t0 = time.perf_counter()
      g(ctx, prompt, stops, n - 1)
      times[k].append(time.perf_counter() - t0)
  med = {k: float(np.median(v)) for k, v in times.items()}
  per_chunk = sm.history_nbytes() / H
  print(f"\n{args.config}: D={cfg.d_model}, window {cfg.window} chunks, history horizon {H} "
        f"chunks ({H * config.layout.chunk_ms / 60_000:.1f} min), ring filled {filled}/{H}; "
        f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}")
  print("| quantity | value |\n|---|---|")
  print(f"| history memory per minute of conversation | {per_chunk * per_min / 1e3:.1f} KB |")
  print(f"| history ring (fixed) | {sm.history_nbytes() / 1e6:.2f} MB |")
  print(f"| interaction model ring KV cache (fixed) | {sm.cache_nbytes() / 1e6:.2f} MB |")
  print(f"| context rows the background model reads | {ctx[0].shape[1]} tokens + {H} vectors |")
  for k, v in med.items():
    print(f"| decode {args.tokens} tokens, {k} | {v * 1e3:.1f} ms |")
  print(f"| ratio with / without history | "
        f"{med['window + history'] / med['window only']:.2f} |")


if __name__ == "__main__":
  main()
