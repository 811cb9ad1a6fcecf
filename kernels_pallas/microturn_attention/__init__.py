"""Flash attention under the micro-turn mask (docs/design.md §4), skipping fully masked blocks.

Layout follows `jax.experimental.pallas.ops`:
  schedule.py   `BlockSizes`, the block pre-pass (`block_schedule`: SKIP / PARTIAL / FULL per
                (q block, kv block) from metadata ranges, then compacted visit lists) and the
                kernel-side token encoding
  tiles.py      tile math shared by the kernels (masked scores, float32 dots, `Config`)
  triton.py     GPU kernels, also run by Pallas interpret mode (and so on CPU)
  mosaic.py     TPU kernels (scalar-prefetched schedule, visit list as a grid axis)
  reference.py  `microturn_attention_reference` in plain jnp, and the shape checks
  api.py        backend choice, padding, the `custom_vjp`: `microturn_attention`,
                `microturn_attention_decode`

Partial blocks evaluate the mask from metadata tiles, full blocks skip it, skipped blocks
cost nothing. Numerics: float32 accumulation, logsumexp saved for the backward pass
(FlashAttention-2); rows without any visible key produce zeros (output and gradients).
"""

from kernels_pallas.microturn_attention.api import (microturn_attention,
                                                    microturn_attention_decode,
                                                    select_backend)
from kernels_pallas.microturn_attention.reference import microturn_attention_reference
from kernels_pallas.microturn_attention.schedule import (FULL, PARTIAL, SKIP, BlockSchedule,
                                                         BlockSizes, Tokens, block_schedule,
                                                         encode_k, encode_q, pad_meta)
from kernels_pallas.microturn_attention.tiles import MASK_VALUE

__all__ = ["FULL", "MASK_VALUE", "PARTIAL", "SKIP", "BlockSchedule", "BlockSizes", "Tokens",
           "block_schedule", "encode_k", "encode_q", "microturn_attention",
           "microturn_attention_decode", "microturn_attention_reference", "pad_meta",
           "select_backend"]
