r"""Corpus generation speed: seconds of conversation generated and featurised per wall second.

  python benchmarks/corpus.py                      # 60 conversations of 24 s, 2 workers
  python benchmarks/corpus.py --num=150 --workers=2 --duration=24

Goal: one hour of conversation generated + featurised in <= 3 minutes on 2 cores,
i.e. >= 20 conversation-seconds per wall second. Prints the figure and the CPU-time
breakdown: synth (eSpeak NG + word alignment + resampling), mix (scenario logic, placement,
augmentation) and featurise (dMel / log-mel of both channels, int16). Serialisation to
ArrayRecord is not included (see the full-build figure below). No TFDS, TensorFlow or grain.

Recorded 2026-11-22 on the shared 2-core dev VM while other jobs ran (load average ~5.5):
  --num=150 --workers=2: 3600 s of conversation in 47.6 s wall = 76 conv-s/s, 1 h in 48 s;
  worker time: synth 66 %, mix 7 %, featurise 27 %.   --workers=1: 68 conv-s/s.
  Full build `python -m tml_jax.data.build --config=configs/interaction.py:tiny` (600/40/40
  x 24 s = 4.5 h, with TFDS serialisation and zlib): 285 s = 57 conv-s/s, 0.58 GB on disk.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tml_jax.data import conversation, scenarios, speech  # noqa: E402

_SYNTH_S = [0.0]


def _timed_synth(*args, _orig=speech.synth, **kw):
  t0 = time.perf_counter()
  try:
    return _orig(*args, **kw)
  finally:
    _SYNTH_S[0] += time.perf_counter() - t0


def _one(args):
  split, index, seed, duration_s = args
  speech.synth = _timed_synth  # per process: the scenes call speech.synth by attribute
  _SYNTH_S[0] = 0.0
  t0 = time.perf_counter()
  conv = scenarios.generate(split, index, seed, duration_s)
  t1 = time.perf_counter()
  conversation.featurise(conv)
  t2 = time.perf_counter()
  return conv.duration_s, _SYNTH_S[0], t1 - t0 - _SYNTH_S[0], t2 - t1


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num", type=int, default=60)
  p.add_argument("--duration", type=float, default=24.0)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  jobs = [("train", i, a.seed, a.duration) for i in range(a.num)]
  t0 = time.perf_counter()
  if a.workers > 1:
    with multiprocessing.get_context("fork").Pool(a.workers) as pool:
      results = pool.map(_one, jobs, chunksize=1)
  else:
    results = list(map(_one, jobs))
  wall = time.perf_counter() - t0
  conv_s = sum(r[0] for r in results)
  synth, mix, feat = (sum(r[k] for r in results) for k in (1, 2, 3))
  cpu = synth + mix + feat
  rate = conv_s / wall
  print(f"{a.num} conversations x {a.duration:g} s = {conv_s:.0f} s of conversation in "
        f"{wall:.1f} s wall with {a.workers} worker(s)")
  print(f"speed: {rate:.1f} conversation-s per wall-s; one hour takes {3600 / rate:.0f} s "
        f"(goal <= 180 s: {'OK' if 3600 / rate <= 180 else 'MISSED'})")
  print(f"worker-time breakdown: synth {synth:.1f} s ({100 * synth / cpu:.0f}%), mix {mix:.1f} s "
        f"({100 * mix / cpu:.0f}%), featurise {feat:.1f} s ({100 * feat / cpu:.0f}%)")


if __name__ == "__main__":
  main()
