r"""Ahead-of-time plan: compile the real train step and micro-turn step for a target slice.

  python -m tml_jax.plan --config=configs/interaction.py:tml_small --topology=v5p-512
  python -m tml_jax.plan --config=configs/interaction.py:small --topology=cpu-8

TPU targets need the TPU compiler from libtpu (`pip install "libtpu==0.0.48.*"`) and no TPU;
`cpu-N` plans on N simulated CPU devices. Nothing is allocated: both programs are traced on
abstract inputs and compiled for the target (tml_jax.plan.build). The plan prints a table,
writes plan.json (`--out`), and ends with one JSON line holding at least topology,
per_device_bytes, hbm_bytes and fits. It exits 1 when a program does not fit, naming the
largest buffers. Mesh and config overrides work as in training:
`--config.mesh.fsdp=8 --config.model.remat=full`.

GPU targets: jax 0.11.2 has no offline GPU topology (`get_topology_desc(..., "cuda")` raises
"topology not implemented for cuda"), so a GPU run is planned on the GPU machine itself:
--topology=local compiles for the attached devices.
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (path:variant).",
                                          lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", None, "v5p-512, v5e-256, v5p:4x8x8, cpu-8 or "
                                "local (the attached devices)")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "slices joined over the data-center network")
_TOKENS_PER_S = flags.DEFINE_float("tokens_per_s", None, "training throughput to state the "
                                   "needed MFU for (default: one step per second)")
_OUT = flags.DEFINE_string("out", "plan.json", "where the plan goes")
_MICROTURN = flags.DEFINE_bool("microturn", True, "also compile the micro-turn step")
_SAVE_HLO = flags.DEFINE_bool("save_hlo", False, "also write each program's optimised HLO "
                               "text beside --out (OUT.train_step.hlo.txt, ...)")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "memory per device to plan against (GiB); "
                              "default: the chip's HBM (cpu-N: the host's RAM / N)")

GiB = 2 ** 30


def _gib(n) -> str:
  if n is None:
    return "-"
  if n >= GiB / 4:
    return f"{n / GiB:,.2f} GiB"
  return f"{n / 2**20:,.1f} MiB" if n >= 2**20 / 4 else f"{n / 2**10:,.1f} KiB"


def _sci(x) -> str:
  return "-" if x is None else f"{x:.3g}"


def weight_bytes_per_microturn(info: dict, cfg, param_bytes: int) -> float:
  """Weight bytes one micro-turn must read: every pass (observations, each text slot, the
  audio queries) reads the dense weights and the experts its tokens pick, E(1-(1-k/E)^n)
  distinct ones for n tokens under uniform routing."""
  total, active = info["total_params"], info["active_params"]
  if cfg.ffn != "moe":
    return float((1 + cfg.layout.model_text + 1) * total * param_bytes)
  E, k = cfg.moe.num_experts, cfg.moe.top_k
  expert = (total - active) / (1 - k / E)
  dense = total - expert
  hit = lambda n: 1 - (1 - k / E) ** n
  lay = cfg.layout
  passes = [lay.chunk_len - lay.model_text - lay.model_audio] + [1] * lay.model_text \
      + [lay.model_audio]
  return float(sum(dense + expert * hit(n) for n in passes) * param_bytes)


def summarise(target, chip, hbm, train, train_info, micro, micro_info, setup, tokens_per_s):
  n = target.num_devices
  out = dict(topology=target.name, platform=target.platform,
             device_kind=chip.kind if chip else "cpu", num_devices=n,
             num_slices=target.num_slices, mesh=dict(setup.mesh.shape),
             config=dict(variant=setup.config.variant, remat=setup.cfg.remat,
                         batch_size=setup.config.train.batch_size,
                         dtype=setup.cfg.dtype, param_dtype=setup.cfg.param_dtype),
             hbm_bytes=hbm)
  t = dict(train.as_dict(), **train_info)
  t["per_device_bytes"] = train.memory.get("total") if train.ok else None
  rate = tokens_per_s or train_info["tokens_per_step"]  # default: one step per second
  t["target_tokens_per_s"] = rate
  if chip:
    t["required_mfu"] = (train_info["model_flops_per_step"] * rate
                         / train_info["tokens_per_step"] / (n * chip.peak_flops))
  out["train_step"] = t
  sizes = [t["per_device_bytes"]]
  if micro is not None:
    m = dict(micro.as_dict(), **micro_info)
    m["per_device_bytes"] = micro.memory.get("total") if micro.ok else None
    budget = micro_info["chunk_s"]
    param_bytes = 2 if setup.cfg.param_dtype == "bfloat16" else 4
    weights = weight_bytes_per_microturn(train_info, setup.cfg, param_bytes)
    m["weight_bytes_read"] = weights
    one = dict(budget_s=budget, weight_bytes_read_per_s=weights / budget,
               model_bytes=train_info["total_params"] * param_bytes + micro_info["cache_bytes"])
    # The text slots are a loop that XLA's count sees once: the analytic active-parameter
    # FLOPs of the chunk's tokens is the floor, and the larger of the two is stated.
    work = max(micro.global_cost.get("flops", 0.0), micro_info["active_param_flops"])
    one["flops_per_s"] = work / budget
    if chip:
      one["chips_for_memory"] = math.ceil(one["model_bytes"] / chip.hbm_bytes)
      one["chips_for_bandwidth"] = one["weight_bytes_read_per_s"] / chip.hbm_bandwidth
      one["flops_fraction_of_chip_peak"] = one["flops_per_s"] / chip.peak_flops
    m["one_conversation"] = one
    out["microturn_step"] = m
    sizes.append(m["per_device_bytes"])
  known = [s for s in sizes if s is not None]
  failed = not train.ok or (micro is not None and not micro.ok)
  out["per_device_bytes"] = max(known) if known else None
  if failed:  # the compiler's own figure of what it needed
    need = [p.memory.get("temporaries", 0) for p in (train, micro) if p is not None and not p.ok]
    out["per_device_bytes"] = max(need + known)
  out["fits"] = (not failed) and out["per_device_bytes"] is not None and \
      out["per_device_bytes"] <= hbm
  return out


def table(plan: dict) -> str:
  rows = [("", "train step", "micro-turn")]
  t, m = plan["train_step"], plan.get("microturn_step", {})
  mem = lambda p, k: _gib(p.get("memory", {}).get(k)) if p.get("ok") else "-"
  for k, label in (("arguments", "arguments"), ("outputs", "outputs"),
                   ("aliased", "donated (aliased)"), ("temporaries", "temporaries"),
                   ("generated_code", "generated code"), ("total", "per device")):
    rows.append((label, mem(t, k), mem(m, k) if m else "-"))
  rows.append(("HBM per device", _gib(plan["hbm_bytes"]), _gib(plan["hbm_bytes"])))
  rows.append(("XLA FLOPs per device*", _sci(t.get("cost", {}).get("flops")),
               _sci(m.get("cost", {}).get("flops")) if m else "-"))
  rows.append(("XLA bytes accessed per device*", _sci(t.get("cost", {}).get("bytes_accessed")),
               _sci(m.get("cost", {}).get("bytes_accessed")) if m else "-"))
  coll = lambda p: ", ".join(f"{k} {v['count']}x {_gib(v['bytes'])}"
                             for k, v in p.get("collectives", {}).items()) or "-"
  rows.append(("collectives per step, device", coll(t), coll(m) if m else "-"))
  rows.append(("compile", f"{t['compile_s']:.0f} s", f"{m['compile_s']:.0f} s" if m else "-"))
  w = [max(len(r[i]) for r in rows) for i in range(2)]
  lines = [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]}" for r in rows]
  head = (f"plan: {plan['config']['variant']} on {plan['topology']} ({plan['num_devices']} x "
          f"{plan['device_kind']}, {plan['num_slices']} slice(s)), mesh {plan['mesh']}, "
          f"remat={plan['config']['remat']}, batch {plan['config']['batch_size']}")
  tail = [f"train: {t['tokens_per_step']:,} tokens/step, model FLOPs/step "
          f"{t['model_flops_per_step']:.3g}; state {_gib(t['state_bytes_per_device'])}/device"]
  if "required_mfu" in t:
    tail.append(f"  MFU needed for {t['target_tokens_per_s']:,.0f} tokens/s: "
                f"{100 * t['required_mfu']:.1f} %")
  if m:
    one = m["one_conversation"]
    s = (f"micro-turn: {m['tokens_per_microturn']} tokens per {one['budget_s'] * 1000:.0f} ms;"
         f" one conversation needs >= {_sci(one.get('flops_per_s'))} FLOP/s and reads "
         f"{_sci(one['weight_bytes_read_per_s'])} B/s of weights ({_gib(one['model_bytes'])}"
         " of weights and cache)")
    tail.append(s)
    if "chips_for_memory" in one:
      tail.append(f"  one chip: {one.get('flops_fraction_of_chip_peak', float('nan')):.2%} of "
                  f"its peak FLOP/s, {one['chips_for_bandwidth']:.1f} chips' HBM bandwidth, "
                  f"{one['chips_for_memory']} chips' HBM to hold it")
  tail.append("* XLA's cost analysis: loop bodies count once, Pallas kernels as 0. "
              "Collectives: per step, loop bodies times their trip count; a ragged-all-to-all "
              "by its receive buffer (an upper bound: only the routed rows move)")
  verdict = "FITS" if plan["fits"] else "DOES NOT FIT"
  tail.append(f"{verdict}: {_gib(plan['per_device_bytes'])} per device of "
              f"{_gib(plan['hbm_bytes'])}")
  return "\n".join([head, *lines, *tail])


def does_not_fit_message(plan: dict) -> str:
  lines = [f"the plan does not fit: {_gib(plan['per_device_bytes'])} per device needed, "
           f"{_gib(plan['hbm_bytes'])} available."]
  for key in ("train_step", "microturn_step"):
    p = plan.get(key)
    if not p:
      continue
    if p.get("error"):
      lines.append(f"{key}: the compiler said: {p['error'].splitlines()[0][:400]}")
    for v in p.get("largest_values", [])[:5]:
      lines.append(f"  {key} buffer {_gib(v['bytes'])}: {v['op']} {v['hlo']} ({v['source']})")
    for v in p.get("largest_state_leaves", [])[:5]:
      lines.append(f"  {key} state {_gib(v['bytes'])}: {v['path']} {v['shape']} -> "
                   f"{v['per_device_shape']} per device")
  lines.append("Fix: shard more (--config.mesh.fsdp / expert / tensor), rematerialise "
               "(--config.model.remat=full), lower --config.train.batch_size, or plan a bigger "
               "slice.")
  return "\n".join(lines)


def main(argv):
  del argv
  from tml_jax.plan import topology
  target = topology.parse(_TOPOLOGY.value, _NUM_SLICES.value) \
      if _TOPOLOGY.value != "local" else None
  import jax
  devs = topology.devices(target) if target else jax.devices()
  if target is None:
    target = topology.Target("local", devs[0].platform, devs[0].platform, (len(devs),))
  from tml_jax.config import validate
  from tml_jax.plan import build
  save_hlo = os.path.splitext(_OUT.value)[0] if _SAVE_HLO.value else ""
  from tml_jax.train import sharding as shd
  from tml_jax.train.state import Setup
  config = _CONFIG.value
  validate(config, num_devices=len(devs))
  chip = target.chip
  hbm = chip.hbm_bytes if chip else _local_bytes(devs)
  if _HBM_GIB.value is not None:
    hbm = int(_HBM_GIB.value * GiB)
  setup = Setup(config, shd.make_mesh(config, devs))
  platform = "gpu" if target.platform in ("cuda", "gpu", "rocm") else target.platform
  print(f"planning {config.variant} for {target.name}: {len(devs)} devices, mesh "
        f"{dict(setup.mesh.shape)}; compiling the train step ...", flush=True)
  train, train_info = build.train_step(config, setup, platform, save_hlo)
  micro = micro_info = None
  if _MICROTURN.value:
    print(f"train step compiled in {train.compile_s:.0f} s; compiling the micro-turn step ...",
          flush=True)
    micro, micro_info = build.microturn_step(config, setup, platform, save_hlo)
  plan = summarise(target, chip, hbm, train, train_info, micro, micro_info, setup,
                   _TOKENS_PER_S.value)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(plan, f, indent=1)
  print(table(plan))
  print(f"wrote {_OUT.value}")
  if not plan["fits"]:
    print(does_not_fit_message(plan), file=sys.stderr, flush=True)
  keys = ("topology", "num_devices", "mesh", "per_device_bytes", "hbm_bytes", "fits")
  print(json.dumps({k: plan[k] for k in keys}), flush=True)
  return 0 if plan["fits"] else 1


def _local_bytes(devs) -> int:
  """Attached devices' memory (GPU/TPU: the allocator's limit); CPU: the host's RAM shared by
  the simulated devices."""
  stats = devs[0].memory_stats() if hasattr(devs[0], "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(devs)


def run():
  flags.mark_flags_as_required(["config", "topology"])
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
