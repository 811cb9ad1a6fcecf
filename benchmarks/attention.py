"""Micro-turn attention benchmark: the block-sparse Pallas kernel against dense baselines.

Run:
  python benchmarks/attention.py            # GPU: bf16, 16 heads, head_dim 128, 8k and 32k
                                            #   tokens, window 50 chunks and unbounded
  python benchmarks/attention.py --quick    # CPU-sized: interpret-mode kernel vs reference
  python benchmarks/attention.py --skip-only  # just the block-skip fractions (any machine)

Sequences are `ChunkLayout()` rows (48 tokens per 200 ms chunk) with a 32-token prefix:
170 chunks = 8192 tokens, 682 chunks = 32768 tokens. Each setting times forward and
forward+backward (grad of a random projection of the output) for
  kernel     kernels_pallas.microturn_attention (Triton on GPU, interpret mode on CPU)
  reference  microturn_attention_reference: XLA with the dense [T, S] mask (skipped where
             its [B, H, T, S] float32 scores would not fit in memory)
  cudnn      jax.nn.dot_product_attention(implementation="cudnn", is_causal=True): the
             fastest dense-causal attention XLA has, a speed bound, not the same mask
  flex       PyTorch FlexAttention with the same mask and a 128x128 block mask, when torch
             with CUDA is importable
TFLOP/s are counted on the blocks each implementation computes (kernel: visited blocks;
reference: all; cudnn: the causal half; flex: its block mask), 4 * bq * bk * D flops per
block and head forward, 3.5x that for forward+backward (the FlashAttention-2 convention;
the kernel's recomputation of the scores in the backward is not counted).

Keeps to jax/numpy: no TensorFlow, grain or clu (docs/design.md §2).

Recorded 2026-11-22 (CPU, 2 shared cores; no GPU was available, so no GPU numbers yet):
  block-skip fractions (128x128 blocks)   blocks  skipped  partial  full
  tiny: ChunkLayout(), 40 chunks, W 25       225    49.3%    13.3%  37.3%
  8k tokens, window 50                      4096    71.8%     5.3%  22.9%
  8k tokens, unbounded                      4096    48.7%     2.1%  49.2%
  32k tokens, window 50                    65536    92.0%     1.6%   6.4%
  32k tokens, unbounded                    65536    49.7%     0.5%  49.8%
  --quick (interpret mode, 592 tokens, f32) matches the reference to 6e-7; its timings
  measure the interpreter, not the kernel.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import microturn_attention as mta
from tml_jax.microturn import ChunkLayout, TokenMeta
from tml_jax.timing import timeit

BLOCK = 128


def row_meta(num_chunks: int, prefix: int, batch: int = 1,
             layout: ChunkLayout | None = None) -> TokenMeta:
  layout = layout or ChunkLayout(prefix=prefix)
  return layout.meta(num_chunks, batch)


def block_counts(meta: TokenMeta, window: int | None, block: int = BLOCK) -> dict:
  flags = np.asarray(mta.block_schedule(meta, meta, window, block, block).block_flag)
  n = flags.size
  return dict(total=n, skip=int((flags == mta.SKIP).sum()),
              partial=int((flags == mta.PARTIAL).sum()), full=int((flags == mta.FULL).sum()))


def print_skip_fractions(settings):
  print(f"\nblock-skip fractions ({BLOCK}x{BLOCK} blocks)")
  print(f"{'setting':<44} {'blocks':>8} {'skipped':>8} {'partial':>8} {'full':>8}")
  for name, meta, window in settings:
    c = block_counts(meta, window)
    print(f"{name:<44} {c['total']:>8} {c['skip'] / c['total']:>8.1%} "
          f"{c['partial'] / c['total']:>8.1%} {c['full'] / c['total']:>8.1%}")


def _flops(blocks: int, bq: int, bk: int, heads: int, head_dim: int, backward: bool) -> float:
  fwd = 4.0 * blocks * bq * bk * heads * head_dim
  return fwd * (3.5 if backward else 1.0)


def _grad_fn(attn, w):
  loss = lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * w)
  return jax.jit(jax.grad(loss, (0, 1, 2)))


def _torch_flex(meta: TokenMeta, window, q, k, v, reps):
  """(fwd_ms, fwdbwd_ms, visited_blocks) with FlexAttention, or None without torch/CUDA."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  dev = "cuda"
  enc_q, enc_k = mta.encode_q(meta), mta.encode_k(meta)
  t = lambda x: torch.as_tensor(np.asarray(x)[0], device=dev)
  qc, qcode, qdoc = map(t, enc_q)
  kc, kcode, kdoc = map(t, enc_k)

  def mask_mod(b, h, qi, ki):
    earlier = kc[ki] < qc[qi]
    if window is not None:
      earlier = earlier & (qc[qi] - kc[ki] < window)
    same = (kc[ki] == qc[qi]) & (kcode[ki] <= qcode[qi])
    return (qdoc[qi] == kdoc[ki]) & ((kcode[ki] == -2) | earlier | same)

  T = qc.shape[0]
  block_mask = create_block_mask(mask_mod, None, None, T, T, device=dev,
                                 BLOCK_SIZE=BLOCK)
  conv = lambda x: torch.as_tensor(np.asarray(x.astype(jnp.float32)), device=dev).to(
      torch.bfloat16).transpose(1, 2).contiguous()  # [B, H, T, D]
  tq, tk, tv = conv(q), conv(k), conv(v)
  heads_ratio = tq.shape[1] // tk.shape[1]
  attn = torch.compile(functools.partial(flex_attention, block_mask=block_mask,
                                         enable_gqa=heads_ratio > 1))

  def bench(fn):
    for _ in range(2):
      fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      fn()
      torch.cuda.synchronize()
      times.append(time.perf_counter() - t0)
    return statistics.median(times)

  fwd = bench(lambda: attn(tq, tk, tv))
  tq.requires_grad_(True), tk.requires_grad_(True), tv.requires_grad_(True)
  grad_out = torch.randn_like(tq)
  fwdbwd = bench(lambda: torch.autograd.grad(attn(tq, tk, tv), (tq, tk, tv), grad_out))
  # Count blocks the way FlexAttention computes them: partial + full blocks.
  visited = int(block_mask.kv_num_blocks.sum()) + int(
      0 if block_mask.full_kv_num_blocks is None else block_mask.full_kv_num_blocks.sum())
  return fwd, fwdbwd, visited


def run(settings, *, heads, kv_heads, head_dim, dtype, reps, interpret, baselines):
  print(f"\n{'setting':<30} {'impl':<10} {'fwd ms':>9} {'TF/s':>7} {'fwd+bwd ms':>11} "
        f"{'TF/s':>7} {'blocks':>8}")
  rng = np.random.default_rng(0)
  for name, meta, window in settings:
    B, T = meta.chunk.shape
    draw = lambda h: jnp.asarray(rng.standard_normal((B, T, h, head_dim)), dtype)
    q, k, v = draw(heads), draw(kv_heads), draw(kv_heads)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    n_blocks = -(-T // BLOCK)
    all_blocks = B * n_blocks * n_blocks
    visited = all_blocks - block_counts(meta, window)["skip"]
    kernel = functools.partial(mta.microturn_attention, q_meta=meta, kv_meta=meta,
                               window=window, interpret=interpret)
    reference = functools.partial(mta.microturn_attention_reference, q_meta=meta,
                                  kv_meta=meta, window=window)
    impls = [("kernel", kernel, visited)]
    ref_bytes = 4 * B * heads * T * T
    if ref_bytes < 8e9:
      impls.append(("reference", reference, all_blocks))
    else:
      print(f"{name:<30} {'reference':<10} skipped: dense scores need {ref_bytes / 1e9:.0f} GB")
    if "cudnn" in baselines and jax.default_backend() == "gpu":
      cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                           implementation="cudnn")
      impls.append(("cudnn", cudnn, B * n_blocks * (n_blocks + 1) // 2))
    outs = {}
    for impl_name, attn, blocks in impls:
      fwd = jax.jit(attn)
      try:
        out = fwd(q, k, v)
        t_fwd = timeit(fwd, q, k, v, reps=reps)
        t_bwd = timeit(_grad_fn(attn, w), q, k, v, reps=reps)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{name:<30} {impl_name:<10} failed: {type(e).__name__}: {str(e)[:80]}")
        continue
      outs[impl_name] = out.astype(jnp.float32)
      tf = lambda t, bwd: _flops(blocks, BLOCK, BLOCK, heads, head_dim, bwd) / t / 1e12
      print(f"{name:<30} {impl_name:<10} {t_fwd * 1e3:>9.3f} {tf(t_fwd, False):>7.2f} "
            f"{t_bwd * 1e3:>11.3f} {tf(t_bwd, True):>7.2f} {blocks:>8}")
    if "kernel" in outs and "reference" in outs:
      err = float(jnp.max(jnp.abs(outs["kernel"] - outs["reference"])))
      print(f"{name:<30} {'':<10} max |kernel - reference| = {err:.2e}")
    if "flex" in baselines:
      flex = _torch_flex(meta, window, q, k, v, reps)
      if flex is not None:
        f_fwd, f_bwd, f_blocks = flex
        tf = lambda t, bwd: _flops(f_blocks, BLOCK, BLOCK, heads, head_dim, bwd) / t / 1e12
        print(f"{name:<30} {'flex':<10} {f_fwd * 1e3:>9.3f} {tf(f_fwd, False):>7.2f} "
              f"{f_bwd * 1e3:>11.3f} {tf(f_bwd, True):>7.2f} {f_blocks:>8}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="CPU-sized run (interpret mode)")
  parser.add_argument("--skip-only", action="store_true", help="only the skip fractions")
  parser.add_argument("--kv_heads", type=int, default=16)
  parser.add_argument("--reps", type=int, default=10)
  args = parser.parse_args()

  tiny = ("tiny: ChunkLayout(), 40 chunks, window 25", row_meta(40, 0), 25)
  big = [(f"{T // 1024}k tokens, window {w}", row_meta(chunks, 32), w)
         for T, chunks in ((8192, 170), (32768, 682)) for w in (50, None)]
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"device {jax.devices()[0].device_kind}")
  print_skip_fractions([tiny] + big)
  if args.skip_only:
    return
  if args.quick:
    quick = [("quick: 12 chunks, window 4", row_meta(12, 16), 4),
             ("quick: 12 chunks, unbounded", row_meta(12, 16), None)]
    run(quick, heads=2, kv_heads=1, head_dim=32, dtype=jnp.float32, reps=2,
        interpret=True, baselines=())
    return
  if jax.default_backend() != "gpu":
    raise SystemExit("the full benchmark needs a GPU; use --quick on CPU")
  run(big, heads=16, kv_heads=args.kv_heads, head_dim=128, dtype=jnp.bfloat16,
      reps=args.reps, interpret=False, baselines=("cudnn", "flex"))


if __name__ == "__main__":
  main()
