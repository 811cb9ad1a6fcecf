"""`python -m tml_jax.plan`: topology names, HLO bookkeeping, and a real cpu-N plan of `small`."""

import json
import os
import subprocess
import sys

import pytest
from conftest import TEST_XLA_FLAGS

from tml_jax.plan import hlo, topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,generation,shape", [
    ("v5p-8", "v5p", (1, 2, 2)), ("v5p-256", "v5p", (4, 4, 8)), ("v5p-512", "v5p", (4, 8, 8)),
    ("v4-128", "v4", (4, 4, 4)), ("v5e-256", "v5e", (16, 16)), ("v5litepod-8", "v5e", (2, 4)),
    ("v6e-64", "v6e", (8, 8)), ("v5p:2x4x4", "v5p", (2, 4, 4)), ("cpu-8", "cpu", (8,))])
def test_topology_names(name, generation, shape):
  t = topology.parse(name)
  assert (t.generation, t.shape) == (generation, shape)
  chips = 1
  for d in shape:
    chips *= d
  assert t.num_devices == chips
  if generation in ("v4", "v5p") and "-" in name:  # named by TensorCores, 2 per chip
    assert 2 * chips == int(name.split("-")[1])


@pytest.mark.parametrize("name,match", [("v5p-511", "even"), ("v9-8", "unknown TPU"),
                                         ("h100-8", "offline"),
                                         ("v5p-24", "powers of two"), ("tpu", "use a slice")])
def test_bad_topology_names_say_the_fix(name, match):
  with pytest.raises(ValueError, match=match):
    topology.parse(name)


HLO = """
HloModule jit_train_step, entry_computation_layout={...}
%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %all-reduce.1 = f32[8,128]{1,0} all-reduce(f32[8,128]{1,0} %x), channel_id=1, replica_groups={{0,1}}, to_apply=%add, metadata={op_name="jit(train_step)/psum"}
}
%cond (p: (s32[], f32[8,128])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}
%body2 (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %collective-permute.6 = f32[4]{0} collective-permute(f32[4]{0} %z), source_target_pairs={{0,1},{1,0}}
}
%cond2 (p: (s32[], f32[4])) -> pred[] {
  %constant.7 = s32[]{:T(128)} constant(5)
  ROOT %lt.2 = pred[]{:T(512)} compare(%get-tuple-element.3, %constant.7), direction=LT
}
ENTRY %main (a: f32[8,128]) -> f32[2,10] {
  %while.9 = (s32[], f32[8,128]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"48"}}
  %while.10 = (s32[], f32[4]{0}) while(%t2), condition=%cond2, body=%body2
  %all-gather-start.2 = (bf16[4,64]{1,0}, bf16[16,64]{1,0}) all-gather-start(bf16[4,64]{1,0} %p0), dimensions={0}
  %all-gather-done.2 = bf16[16,64]{1,0} all-gather-done((bf16[4,64]{1,0}, bf16[16,64]{1,0}) %all-gather-start.2)
  ROOT %reduce-scatter.3 = f32[2,10]{1,0} reduce-scatter(f32[8,10]{1,0} %g), dimensions={0}
  %all-to-all.4 = (s32[4]{0}, s32[4]{0}) all-to-all(s32[4]{0} %a, s32[4]{0} %b), dimensions={0}
  %fusion.5 = f32[1024,1024]{1,0} fusion(f32[8,128]{1,0} %y), kind=kLoop, metadata={op_name="jit(train_step)/big"}
}
"""


def test_collectives_and_largest_values_from_hlo():
  c = hlo.collectives(HLO)
  # Inside the 48-trip while body: 48 executions per step.
  assert c["all-reduce"] == {"count": 48, "bytes": 48 * 8 * 128 * 4, "static_count": 1}
  # The gathered result, counted once for the start/done pair.
  assert c["all-gather"] == {"count": 1, "bytes": 16 * 64 * 2, "static_count": 1}
  assert c["reduce-scatter"] == {"count": 1, "bytes": 2 * 10 * 4, "static_count": 1}
  assert c["all-to-all"] == {"count": 1, "bytes": 2 * 4 * 4, "static_count": 1}
  # XLA:TPU writes no known_trip_count: the bound of the condition `i < 5` is used.
  assert c["collective-permute"] == {"count": 5, "bytes": 5 * 16, "static_count": 1}
  top = hlo.largest_values(HLO, 1)[0]
  assert (top["bytes"], top["op"], top["source"]) == (1024 * 1024 * 4, "fusion",
                                                      "jit(train_step)/big")
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (107.92G) exceeds available HBM (95.73G). HLO module: jit_train_step.")
  oom = hlo.parse_oom(msg)
  assert oom["hbm"] == int(95.73 * 2 ** 30) and oom["temporaries"] > oom["hbm"]


def _plan(tmp_path, *extra):
  out = tmp_path / "plan.json"
  env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "tml_jax.plan", "--config=configs/interaction.py:small",
                      "--topology=cpu-8", f"--out={out}", *extra], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  last = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else None
  return p, last, (json.loads(out.read_text()) if out.exists() else None)


def test_cpu_plan_of_small(tmp_path):
  """The real train and micro-turn steps of `small`, compiled for 8 CPU devices split
  fsdp x expert (nothing allocated). Its 16 blocks run as one scan (scan_layers, as
  tml_small's plan does): one block compiled instead of 16 keeps this test at a minute."""
  p, last, plan = _plan(tmp_path, "--config.mesh.data=1", "--config.mesh.fsdp=2",
                        "--config.mesh.expert=4", "--config.model.scan_layers=True")
  assert last is not None, p.stdout[-3000:] + p.stderr[-3000:]
  assert {"topology", "per_device_bytes", "hbm_bytes", "fits"} <= set(last)
  assert last["topology"] == "cpu-8"
  # cpu-N plans against the host's RAM / N: `small` may not fit a laptop, and says so.
  assert p.returncode == (0 if last["fits"] else 1), p.stderr[-3000:]
  assert last["fits"] == (last["per_device_bytes"] <= last["hbm_bytes"])
  assert plan["mesh"] == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
  t, m = plan["train_step"], plan["microturn_step"]
  assert t["ok"] and m["ok"]
  # The state is sharded: each device holds about 1/8 of the experts' parameters and
  # moments (the dense ones over fsdp=2), and the step's arguments hold at least that.
  state_total = t["total_params"] * 4 * 3  # float32 parameters + two Adam moments
  assert state_total / 8 < t["state_bytes_per_device"] < state_total / 2
  assert t["memory"]["arguments"] >= t["state_bytes_per_device"]
  assert last["per_device_bytes"] == max(t["memory"]["total"], m["memory"]["total"])
  # fsdp gathers weights, experts exchange tokens, gradients are reduced.
  assert {"all-gather", "all-to-all"} <= set(t["collectives"])
  assert {"all-reduce", "reduce-scatter"} & set(t["collectives"])
  assert t["model_flops_per_step"] > 6 * t["active_params"] * t["tokens_per_step"] * 0.9
  one = m["one_conversation"]
  assert one["budget_s"] == 0.2 and one["flops_per_s"] >= m["active_param_flops"] / 0.2


def test_a_plan_that_does_not_fit_exits_1_naming_buffers(tmp_path):
  p, last, plan = _plan(tmp_path, "--hbm_gib=0.01", "--nomicroturn",
                        "--config.model.num_layers=2")
  assert p.returncode == 1
  assert last["fits"] is False and last["per_device_bytes"] > last["hbm_bytes"]
  assert "does not fit" in p.stderr and "state" in p.stderr and "Fix:" in p.stderr
  assert plan["fits"] is False
