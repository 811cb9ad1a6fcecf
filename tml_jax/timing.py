"""Wall-clock timing for benchmarks (jitted calls; compile and warm-up excluded)."""

import statistics
import time

import jax


def timeit(fn, *args, reps=10, warmup=2):
  """Median wall seconds of `fn(*args)` over `reps` calls after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)
