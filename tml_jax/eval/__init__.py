"""Evaluation: Full-Duplex-Bench metrics (`metrics`), a VAD (`vad`), reference systems
(`baselines`) and the report (`report`); the harness and CLI are `tml_jax.evaluate`."""
