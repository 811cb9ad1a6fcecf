"""Training-step throughput and model FLOPs utilisation.

  python benchmarks/train_step.py --config=tiny [--batch=8] [--chunks=40] [--steps=5]
  python benchmarks/train_step.py --config=small --peak_tflops=989   # one H100, bf16 dense

FLOPs are counted analytically (tml_jax.flops): active parameters plus the attention pairs
the micro-turn mask leaves visible. On a CPU the peak is measured in the same run (a large
float32 matmul), so the MFU printed there is relative to what XLA's matmul reaches here.
Importable without TensorFlow, grain or clu.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def measured_matmul_tflops(n=2048, dtype=jnp.float32, reps=5) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    f(a, a).block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="tiny")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--chunks", type=int, default=None)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--peak_tflops", type=float, default=0.0, help="0: measure a matmul here")
  p.add_argument("--set", action="append", default=[], help="model overrides k=v")
  args = p.parse_args()

  from configs.interaction import get_config
  from tml_jax.batch import random_batch
  from tml_jax.flops import train_step_flops
  from tml_jax.train import sharding as shd
  from tml_jax.train.state import Setup

  config = get_config(args.config)
  for kv in args.set:
    k, v = kv.split("=")
    config.model[k] = type(config.model[k])(v)
  if args.batch:
    config.train.batch_size = args.batch
  if args.chunks:
    config.layout.num_chunks = args.chunks
  config.train.num_steps = 10 ** 6
  mesh = shd.make_mesh(config)
  setup = Setup(config, mesh)
  batch = random_batch(setup.cfg.layout, batch=config.train.batch_size,
                       num_chunks=config.layout.num_chunks)
  flops = train_step_flops(setup.cfg, batch["meta"])
  gb = shd.to_global(batch, setup.batch_sharding)
  state = setup.init()
  t0 = time.perf_counter()
  state, m = setup.train_step(state, gb, jax.random.key(0))
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(args.steps):
    t = time.perf_counter()
    state, m = setup.train_step(state, gb, jax.random.key(i))
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  tokens = config.train.batch_size * setup.cfg.layout.seq_len(config.layout.num_chunks)
  peak = args.peak_tflops or measured_matmul_tflops()
  achieved = flops / step_s / 1e12
  print(f"config={args.config} moe_impl={config.model.moe_impl} device={jax.devices()[0]} "
        f"batch={config.train.batch_size} chunks={config.layout.num_chunks} tokens/step={tokens}")
  print(f"compile+first step {compile_s:.1f}s; step {step_s * 1000:.0f} ms (median of "
        f"{args.steps}); {tokens / step_s:,.0f} tokens/s")
  print(f"model FLOPs/step {flops / 1e9:.1f} GFLOP -> {achieved:.3f} TFLOP/s; peak "
        f"{'measured matmul' if not args.peak_tflops else 'given'} {peak:.3f} TFLOP/s; "
        f"MFU {100 * achieved / peak:.1f}%")


if __name__ == "__main__":
  main()
