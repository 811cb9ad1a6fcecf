"""Streaming inference (docs/design.md §8): `Engine` runs the micro-turn loop live or offline.

  engine = Engine.from_workdir("runs/tiny")           # loads the model once
  engine.run_file("sample/input.wav", "out/sample")   # output.wav, monologue.json, ...
"""

from tml_jax.serve.engine import Engine, load_config
from tml_jax.serve.inputs import LiveClock, OfflineClock, check_frames, load_input, open_wav
from tml_jax.serve.stream import KVCache, StreamingModel, init_cache, serving_config

__all__ = ["Engine", "LiveClock", "OfflineClock", "check_frames", "load_config", "load_input",
           "open_wav", "KVCache", "StreamingModel", "init_cache", "serving_config"]
