"""Streaming inference (docs/design.md §8): `Engine` runs the micro-turn loop live or offline.

  engine = Engine.from_workdir("runs/tiny")           # loads the model once
  engine.run_file("sample/input.wav", "out/sample")   # output.wav, monologue.json, ...
"""

from tml_jax.serve.engine import Engine, LiveClock, OfflineClock, load_config, load_input
from tml_jax.serve.stream import KVCache, StreamingModel, init_cache, serving_config

__all__ = ["Engine", "LiveClock", "OfflineClock", "load_config", "load_input", "KVCache",
           "StreamingModel", "init_cache", "serving_config"]
