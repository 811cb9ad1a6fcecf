"""Where the tiny training step's time goes: ablations of one part at a time, timed side by side.

  python benchmarks/step_profile.py [--reps=3] [--steps_per_rep=2] [--variants=full,dense,...]

Every variant is the real jitted train step (tml_jax.train.state.Setup, built as
benchmarks/train_step.py builds it) of the tiny config with one thing removed or swapped.
All variants are compiled first, then timed interleaved (full, no_background, ..., full,
no_background, ...) so that load from other jobs hits every variant alike; each cell is the
median over --reps of the mean over --steps_per_rep steps. The FLOPs columns are XLA's own
count (`Compiled.cost_analysis()`, loops counted once per body, so the grouped MoE's tile
scan is undercounted) and the analytic model count of tml_jax.flops (backbone + heads; no
background model, no optimizer).

The batch is benchmarks/train_step.py's random batch (tml_jax.batch.random_batch) plus the
targets the real pipeline (tml_jax.data.pipeline) adds and random_batch lacks: the speak
gate's `speak_target` / `speak_now` and, with the background model on, `max_delegations`
background sequences of `max_len` tokens per row. Without them the background and speak
losses are skipped, so the step would not be the one training runs.

Importable without TensorFlow, grain or clu.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from typing import Callable

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import measured_matmul_tflops  # noqa: E402  (benchmarks/train_step.py)


def _unchanged(config):
  del config


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  what: str
  arg: str = "tiny"                             # get_config argument
  edit: Callable = _unchanged                   # in-place config change
  step: str = "train"                           # "train" | "forward" | "eval"


def _set(path: str, value):
  def edit(config):
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return edit


def _halve(path: str):
  def edit(config):
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = node[leaf] // 2
  return edit


VARIANTS = (
    Variant("full", "the tiny train step (forward + backward + AdamW)"),
    Variant("no_background", "background.enabled=False", edit=_set("background.enabled", False)),
    Variant("dense_ffn", "tiny,dense: dense SwiGLU of the active width (2 x 640) for the MoE",
            arg="tiny,dense"),
    Variant("half_layers", "model.num_layers 4 -> 2", edit=_halve("model.num_layers")),
    # A zero audio loss weight removes nothing (0 * loss still runs the head forward and
    # backward); zero flow blocks leave only its input/condition/output projections.
    Variant("flow_layers0", "model.flow_layers 3 -> 0 (flow head's residual blocks)",
            edit=_set("model.flow_layers", 0)),
    Variant("no_speak_gate", "model.speak_gate=False", edit=_set("model.speak_gate", False)),
    Variant("half_text_slots", "layout.model_text_slots 8 -> 4 (36 -> 32 tokens/chunk)",
            edit=_halve("layout.model_text_slots")),
    Variant("forward_only", "forward + every loss, no gradient (jit of compute_losses)",
            step="forward"),
    Variant("eval_step", "Setup.eval_step: forward + losses + 8-step flow sampling",
            step="eval"),
)


def training_batch(setup, config, seed: int = 0) -> dict:
  """random_batch plus the speak-gate and background targets the real pipeline produces."""
  from tml_jax.batch import random_batch
  from tml_jax.data.background_targets import target_sequence
  B, C = config.train.batch_size, config.layout.num_chunks
  batch = random_batch(setup.cfg.layout, batch=B, num_chunks=C, seed=seed)
  rng = np.random.default_rng(seed + 1)
  voiced = rng.random((B, C)) < 0.5
  batch["speak_now"] = voiced
  batch["speak_target"] = np.concatenate([voiced[:, 1:], np.zeros((B, 1), bool)], axis=1)
  bg = config.background
  if bg.enabled:
    N, T = bg.max_delegations, bg.max_len
    seqs = [target_sequence("calculator", "What is 3 times 4?", "3 * 4 = 12", T),
            target_sequence("knowledge", "What is the capital of Peru?", "Lima", T)]
    for k, i in (("bg_in", 0), ("bg_target", 1), ("bg_mask", 2)):
      batch[k] = np.stack([np.stack([seqs[n % 2][i] for n in range(N)])] * B)
    batch["bg_chunk"] = rng.integers(0, C, (B, N)).astype(np.int32)
  return batch


def _forward_loss(state, batch, rng, *, setup):
  from tml_jax.train.losses import compute_losses
  return compute_losses(setup.model(state["params"]), batch, rng, setup.weights)[1]


def _xla_flops(compiled) -> float:
  try:
    ca = compiled.cost_analysis()
  except Exception:  # not every backend reports it
    return float("nan")
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get("flops", float("nan")))


class Built:
  """One variant, compiled, with its state; `run()` is one blocking step. A forward or eval
  variant of an already built train variant's config shares its Setup, batch and state."""

  def __init__(self, v: Variant, base: "Built | None" = None, warmup: int = 1):
    from configs.interaction import get_config
    from tml_jax.flops import forward_flops
    from tml_jax.train import sharding as shd
    from tml_jax.train.state import Setup

    self.v, self.base = v, base
    t0 = time.perf_counter()
    if base is None:
      config = get_config(v.arg)
      v.edit(config)
      config.train.num_steps = 10 ** 6
      mesh = shd.make_mesh(config)
      setup = Setup(config, mesh)
      self.host_batch = training_batch(setup, config)
      self.batch = shd.to_global(self.host_batch, setup.batch_sharding)
      self._state = setup.init()
    else:
      config, mesh, setup = base.config, base.mesh, base.setup
      self.host_batch, self.batch = base.host_batch, base.batch
    self.config, self.mesh, self.setup = config, mesh, setup
    self.tokens = config.train.batch_size * setup.cfg.layout.seq_len(config.layout.num_chunks)
    fwd = forward_flops(setup.cfg, self.host_batch["meta"])
    self.analytic = 3 * fwd if v.step == "train" else fwd
    self.rng = jax.random.key(0)
    rep = shd.replicated(mesh)
    with jax.set_mesh(mesh):
      if v.step == "train":
        fn = setup._train_step_jit  # the jit Setup.train_step calls (state donated)
      elif v.step == "eval":
        fn = setup._eval_step_jit
      else:
        fn = jax.jit(functools.partial(_forward_loss, setup=setup),
                     in_shardings=(setup.state_sharding, setup.batch_sharding, rep),
                     out_shardings=rep)
      # the train step also takes the learning-rate schedule's numbers at run time
      self.extra = (setup.schedule_numbers,) if v.step == "train" else ()
      self.compiled = fn.lower(self.state, self.batch, self.rng, *self.extra).compile()
    self.xla = _xla_flops(self.compiled)
    for _ in range(warmup):  # allocations, first touch
      self.run()
    self.build_s = time.perf_counter() - t0
    self.times: list[float] = []

  @property
  def state(self):  # read through: the base's train variant donates and replaces its state
    return self.base.state if self.base is not None else self._state

  def run(self):
    with jax.set_mesh(self.mesh):
      if self.v.step == "train":
        self._state, m = self.compiled(self._state, self.batch, self.rng, *self.extra)
      else:
        m = self.compiled(self.state, self.batch, self.rng)
    jax.block_until_ready(m)


def _paired(built: dict, n: str) -> tuple[float, float, float]:
  """full - n per interleaved rep: (median, min, max) of the saving from removing a part."""
  d = [f - v for f, v in zip(built["full"].times, built[n].times)]
  return float(np.median(d)), min(d), max(d)


def reading(built: dict, med: dict) -> str:
  """A paragraph from the measured medians (only the variants that were run). Savings are
  medians of per-rep paired differences; one whose reps disagree in sign, or whose XLA FLOPs
  equal the full step's, is marked as within noise."""
  full = med["full"]
  pct = lambda x: 100.0 * x / full
  xla_full = built["full"].xla

  def saving(n):
    c, lo, hi = _paired(built, n)
    same_flops = abs(built[n].xla - xla_full) <= 0.005 * xla_full
    note = ""
    if lo < 0 < hi:
      note = f", within noise: per-rep {lo:+.2f}..{hi:+.2f} s"
    elif same_flops:
      note = ", same XLA FLOPs as the full step, so noise or scheduling"
    return c, f"{c:.2f} s ({pct(c):.0f} %{note})"

  L = built["full"].config.model.num_layers
  parts = []
  if "half_layers" in med:
    c, _ = saving("half_layers")
    per_block = c / (L - L // 2)
    rest = full - per_block * L
    flops_share = 100.0 * (xla_full - built["half_layers"].xla) / (L - L // 2) * L / xla_full
    parts.append(f"each of the {L} backbone blocks costs ~{per_block:.2f} s "
                 f"({pct(per_block):.0f} %), so the blocks take "
                 + (f"~{pct(per_block * L):.0f} % of the step and everything else (embeddings, "
                    f"heads, losses, background model, optimizer) ~{pct(rest):.0f} %"
                    if rest > 0.05 * full else
                    "about all of it; what is left for embeddings, heads, losses and the "
                    "optimizer is within the noise")
                 + f" (XLA's FLOP count puts the blocks at {flops_share:.0f} %)")
  if "dense_ffn" in med:
    c, txt = saving("dense_ffn")
    parts.append(f"a dense FFN of the MoE's active width (the same matmul work) is "
                 f"{'faster' if c > 0 else 'slower'} by {txt.lstrip('-')}: "
                 + ("what routing, sorting and the grouped matmul cost over plain matmuls"
                    if c > 0 else "the MoE is no slower than its dense equivalent"))
  if "no_background" in med:
    parts.append(f"the background model costs {saving('no_background')[1]}")
  if "flow_layers0" in med:
    parts.append(f"the flow head's residual blocks {saving('flow_layers0')[1]}")
  if "no_speak_gate" in med:
    parts.append(f"the speak gate {saving('no_speak_gate')[1]}")
  if "half_text_slots" in med:
    fewer = 100.0 * (1 - built["half_text_slots"].tokens / built["full"].tokens)
    parts.append(f"halving the text slots ({fewer:.0f} % fewer tokens) saves "
                 f"{saving('half_text_slots')[1]}")
  if "forward_only" in med:
    f = med["forward_only"]
    parts.append(f"the forward pass with its losses is {pct(f):.0f} % of the step, so "
                 f"backward + AdamW take {(full - f) / f:.1f}x the forward")
  if "eval_step" in med:
    parts.append(f"eval_step (forward + 8-step flow sampling) is {pct(med['eval_step']):.0f} %")
  return ("Reading: " + "; ".join(parts) + ".") if parts else ""


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--steps_per_rep", type=int, default=2)
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed steps per variant after compiling (0: none)")
  p.add_argument("--variants", default="all",
                 help="comma list of " + ",".join(v.name for v in VARIANTS) + " (default all)")
  args = p.parse_args(argv)

  by_name = {v.name: v for v in VARIANTS}
  names = list(by_name) if args.variants == "all" else [
      n.strip() for n in args.variants.split(",") if n.strip()]
  unknown = [n for n in names if n not in by_name]
  if unknown:
    p.error(f"unknown variants {unknown}; known: {', '.join(by_name)}")
  if "full" not in names:
    names.insert(0, "full")  # the ratio's denominator

  t_start = time.perf_counter()
  built = {}
  for n in names:
    v = by_name[n]
    # forward/eval of the unchanged tiny model reuse its train variant's setup and state
    same = [b for b in built.values() if b.v.step == "train" and b.v.arg == v.arg
            and b.v.edit is _unchanged] if v.step != "train" and v.edit is _unchanged else []
    base = same[0] if same else None
    b = Built(v, base=base, warmup=args.warmup)
    built[n] = b
    print(f"built {n:16s} compile+warm-up {b.build_s:5.1f} s  tokens/step {b.tokens}",
          flush=True)
  full_cfg = built["full"].config
  for r in range(args.reps):  # interleaved: A B C ... A B C ...
    for n, b in built.items():
      t = time.perf_counter()
      for _ in range(args.steps_per_rep):
        b.run()
      b.times.append((time.perf_counter() - t) / args.steps_per_rep)
    print(f"rep {r + 1}/{args.reps}: " + "  ".join(
        f"{n} {b.times[-1]:.2f}" for n, b in built.items()), flush=True)

  med = {n: float(np.median(b.times)) for n, b in built.items()}
  full = med["full"]
  peak = measured_matmul_tflops()
  print(f"\ntiny config: batch {full_cfg.train.batch_size} x {full_cfg.layout.num_chunks} "
        f"chunks, moe_impl={full_cfg.model.moe_impl}, device={jax.devices()[0]}; "
        f"median of {args.reps} reps x {args.steps_per_rep} steps, interleaved; "
        f"float32 matmul here {peak * 1000:.0f} GFLOP/s\n")
  print("| variant | what changes | median s/step | min-max | ratio to full | XLA GFLOP "
        "| analytic GFLOP | XLA GFLOP/s |")
  print("|---|---|---|---|---|---|---|---|")
  for n, b in built.items():
    x = b.xla / 1e9
    print(f"| {n} | {b.v.what} | {med[n]:.2f} | {min(b.times):.2f}-{max(b.times):.2f} | "
          f"{med[n] / full:.2f} | {x:.1f} | {b.analytic / 1e9:.1f} | {x / med[n]:.0f} |")
  print()
  print(reading(built, med))
  print(f"\nwall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
  main()
