"""Data pipeline throughput against the training step it feeds.

  python benchmarks/pipeline.py --data_dir=data [--config=tiny] [--batches=20] [--workers=0]

Prints batches/s of the grain loader (records -> micro-turn batches of the tiny layout) and,
with --train_step_s (from benchmarks/train_step.py, measured the same day), the ratio; the
goal is >= 5x faster than training consumes them.
"""

import argparse
import time


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="tiny")
  p.add_argument("--data_dir", required=True)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--workers", type=int, default=0)
  p.add_argument("--train_step_s", type=float, default=0.0)
  args = p.parse_args()
  from configs.interaction import get_config
  from tml_jax.data import pipeline, tml_duplex
  config = get_config(args.config)
  src = tml_duplex.load_split(args.data_dir, "train", config.data)
  it = iter(pipeline.make_loader(src, config, split="train", seed=0,
                                 worker_count=args.workers))
  next(it)
  t = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  per_batch = (time.perf_counter() - t) / args.batches
  print(f"pipeline: {1 / per_batch:.2f} batches/s ({per_batch * 1000:.0f} ms per batch of "
        f"{config.train.batch_size} x {config.layout.num_chunks} chunks, workers={args.workers})")
  if args.train_step_s:
    print(f"train step {args.train_step_s:.2f} s -> pipeline is {args.train_step_s / per_batch:.1f}x "
          "faster than training consumes batches")


if __name__ == "__main__":
  main()
