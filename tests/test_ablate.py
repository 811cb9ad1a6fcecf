"""Ablations: the grids hold what their docstrings claim, the runner trains, evaluates and
tabulates the smoke grid, resumes by skipping finished runs, and refuses what would mix
budgets or touch someone else's folder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import JIT_CACHE_ENV

from configs import ablations
from tml_jax.ablate import Ablation
from tml_jax.ablate_report import aggregate
from tml_jax.model.transformer import ModelConfig, count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID_FILE = os.path.join(ROOT, "configs", "ablations.py") + ":smoke"


def _ablate(*args, check=True):
  r = subprocess.run([sys.executable, "-m", "tml_jax.ablate", *args], cwd=ROOT,
                     capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", **JIT_CACHE_ENV))
  if check and r.returncode:
    raise AssertionError(f"ablate exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
  return r


def test_grids_compare_what_they_claim():
  mt = {v: ablations.variant_config("microturn", v) for v in
        ablations.get_grid("microturn")["variants"]}
  per_s = lambda c, f: c.layout[f] * 1000 / c.layout.chunk_ms
  for c in mt.values():  # equal context and rows in seconds, equal slots per second
    assert c.layout.window * c.layout.chunk_ms == 4800
    assert c.layout.num_chunks * c.layout.chunk_ms == 6400
    for f in ("model_text_slots", "text_in_slots", "model_audio_slots"):
      assert per_s(c, f) == per_s(mt["chunk_200ms"], f)
  counts = {v: count_params(ModelConfig.from_config(ablations.variant_config("moe_vs_dense", v)))
            for v in ablations.get_grid("moe_vs_dense")["variants"]}
  (moe_t, moe_a), (act_t, act_a), (tot_t, _) = (counts["moe_8x640_top2"],
                                                counts["dense_equal_active_1280"],
                                                counts["dense_equal_total_5120"])
  assert abs(act_a - moe_a) / moe_a < 0.02, (act_a, moe_a)   # equal active parameters
  assert abs(tot_t - moe_t) / moe_t < 0.02, (tot_t, moe_t)   # equal total parameters
  assert ablations.variant_config("window", "unbounded").layout.window is None
  with pytest.raises(ValueError, match="no variant"):
    ablations.variant_config("window", "window_7")
  with pytest.raises(ValueError, match="unknown ablation grid"):
    ablations.get_grid("nope")


def test_aggregate_gives_mean_and_spread_over_seeds(rng):
  vals = rng.normal(size=3)
  rows = [dict(variant="a", seed=s, behaviour={"x:tor": float(v)}, losses={}, probe={},
               cost={"steps": 10}) for s, v in enumerate(vals)]
  agg = aggregate(rows, ["a"])["a"]
  assert agg["behaviour"]["x:tor"]["n"] == 3
  np.testing.assert_allclose(agg["behaviour"]["x:tor"]["mean"], vals.mean())
  np.testing.assert_allclose(agg["behaviour"]["x:tor"]["std"], vals.std())


def test_smoke_grid_trains_evaluates_tabulates_and_resumes(tmp_path):
  w = str(tmp_path / "smoke")
  _ablate("--grid=configs/ablations.py:smoke", f"--workdir={w}")
  table = json.load(open(os.path.join(w, "table.json")))
  assert set(table["variants"]) == {"lr_3e-3", "lr_1e-3"}
  for r in table["runs"]:
    assert r["cost"]["steps"] == 8
    assert "turn_taking:tor" in r["behaviour"] and r["losses"]["text"] > 0
    assert r["cost"]["total_params"] > 0 and r["cost"]["forward_flops_per_token"] > 0
    assert os.path.exists(os.path.join(w, r["variant"], "seed0", "eval", "model"))
  md = open(os.path.join(w, "table.md")).read()
  assert "| lr_3e-3 |" in md and "| lr_1e-3 |" in md
  for family in ("behaviour", "losses", "probe", "cost"):
    assert os.path.getsize(os.path.join(w, f"plot_{family}.png")) > 5000
  # A rerun skips what is done and rewrites the same table (the class the command runs, in
  # this process: a third start of the command would only repeat its imports).
  logs = []
  Ablation(GRID_FILE, w, log=logs.append).run()
  assert sum("done, skipped" in m for m in logs) == 2, logs
  again = json.load(open(os.path.join(w, "table.json")))
  assert again["runs"] == table["runs"]
  # Another budget in the same folder would mix budgets: refused, nothing changed.
  before = open(os.path.join(w, "ablate.json")).read()
  with pytest.raises(SystemExit, match="--budget_min"):
    Ablation(GRID_FILE, w, budget_min=3.0, log=logs.append)
  assert open(os.path.join(w, "ablate.json")).read() == before


def test_refuses_a_folder_it_did_not_write(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  r = _ablate("--grid=configs/ablations.py:smoke", f"--workdir={tmp_path}", check=False)
  assert r.returncode != 0 and "not an ablation run" in r.stderr + r.stdout
  assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
  r = _ablate("--grid=configs/ablations.py:nope", f"--workdir={tmp_path / 'new'}", check=False)
  assert r.returncode != 0 and "unknown ablation grid" in r.stderr + r.stdout
