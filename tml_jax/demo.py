"""Build a model, run it over a synthetic micro-turn sequence, draw the attention mask.

  python -m tml_jax.demo --config=configs/interaction.py:tiny --out=out/demo
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from tml_jax.batch import random_batch
from tml_jax.microturn import TokenMeta, render_mask_png
from tml_jax.model.transformer import InteractionModel, ModelConfig, count_params

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (path:variant).")
_OUT = flags.DEFINE_string("out", "out/demo", "Where the mask picture goes.")
_CHUNKS = flags.DEFINE_integer("chunks", 12, "Chunks in the synthetic sequence.")


def main(argv):
  del argv
  config = _CONFIG.value
  cfg = ModelConfig.from_config(config)
  total, active = count_params(cfg)
  print(f"total_params={total} active_params={active}")
  model = InteractionModel(cfg, rngs=nnx.Rngs(config.seed))
  batch = random_batch(cfg.layout, batch=2, num_chunks=_CHUNKS.value, num_docs=2, pad_chunks=1,
                       seed=config.seed)
  forward = nnx.jit(lambda m, b: m(b))
  t0 = time.perf_counter()
  out = jax.block_until_ready(forward(model, batch))
  t1 = time.perf_counter()
  jax.block_until_ready(forward(model, batch))
  t2 = time.perf_counter()
  L = out.hidden.shape[1]
  print(f"forward: batch=2 tokens/row={L} compile+run={t1 - t0:.2f}s run={t2 - t1:.3f}s "
        f"finite={bool(jnp.all(jnp.isfinite(out.hidden)))}")
  print(f"text logits {tuple(out.text_logits.shape)}, audio conditions "
        f"{tuple(out.audio_cond.shape)}, moe balance={float(out.aux.get('balance', 0)):.3f}")
  mel = model.flow.sample(out.audio_cond[0, :1], jax.random.key(0), config.model.flow_steps)
  print(f"flow head sample (untrained) {tuple(mel.shape)}")
  os.makedirs(_OUT.value, exist_ok=True)
  meta = TokenMeta(*(np.asarray(f)[:, :min(L, 8 * cfg.layout.chunk_len)] for f in batch["meta"]))
  path = render_mask_png(meta, cfg.window, os.path.join(_OUT.value, "microturn_mask.png"),
                         title=f"micro-turn mask (first 8 chunks, 2 documents, window "
                               f"{cfg.window})")
  print(f"wrote {path}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
