"""Random micro-turn batches with the model's input contract (for demos, tests, benchmarks).

The real data pipeline (tml_jax.data) produces exactly these keys from the corpus.
"""

from __future__ import annotations

import numpy as np

from tml_jax.microturn import ChunkLayout
from tml_jax.text import tokenizer


def random_batch(layout: ChunkLayout, *, batch: int, num_chunks: int, seed: int = 0,
                 num_docs: int = 1, pad_chunks: int = 0, patch_size: int = 40) -> dict:
  """A batch of random streams; `num_docs` conversations packed per row, the last
  `pad_chunks` chunks of each row marked invalid. Includes training targets."""
  rng = np.random.default_rng(seed)
  B, C = batch, num_chunks
  dmel = lambda s: rng.integers(0, 16, (B, C, s, 80), dtype=np.int32)
  text = lambda s: rng.integers(0, 256, (B, C, s), dtype=np.int32)
  # Documents start at random chunk boundaries; chunk 0 always starts document 0.
  doc_BC = np.zeros((B, C), np.int32)
  for b in range(B):
    cuts = np.sort(rng.choice(np.arange(1, C), size=min(num_docs - 1, C - 1), replace=False))
    for c in cuts:
      doc_BC[b, c:] += 1
  valid_BC = np.ones((B, C), bool)
  if pad_chunks:
    valid_BC[:, C - pad_chunks:] = False
  target = text(layout.model_text)
  model_text_in = np.concatenate(
      [np.full((B, C, 1), tokenizer.BOS, np.int32), target[..., :-1]], axis=-1)
  out = dict(
      user_dmel=dmel(layout.user_audio), self_dmel=dmel(layout.self_audio),
      video=rng.integers(0, 256, (B, C, layout.video, patch_size * patch_size * 3),
                         dtype=np.uint8),
      text_in=text(layout.text_in), model_text_in=model_text_in, model_text_target=target,
      audio_target=rng.uniform(-7, 2, (B, C, layout.model_audio,
                                       layout.user_audio // max(layout.model_audio, 1) * 80)
                               ).astype(np.float32),
      audio_mask=valid_BC.copy(), audio_voiced=valid_BC & (rng.random((B, C)) < 0.7),
      self_speaking=rng.random((B, C)) < 0.5,
      meta=layout.meta(C, batch=B, doc_BC=doc_BC, valid_BC=valid_BC),
  )
  if layout.prefix:
    out["prefix"] = rng.integers(0, 256, (B, layout.prefix), dtype=np.int32)
  return out
