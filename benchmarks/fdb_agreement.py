r"""Do Full-Duplex-Bench's own scripts give the numbers our harness reports?

  python -m tml_jax.evaluate --data=out/fdb --out=out/eval --systems=vad_0.5s,silent,...
  python benchmarks/fdb_agreement.py --fdb=PATH/Full-Duplex-Bench --data=out/fdb \
      --report=out/eval --python=PATH/venv/bin/python [--out=agreement.json]

For every system in REPORT and every task, this lays out a temporary folder per sample in
the benchmark's layout (REPORT's output.wav and output.json, DATA's input.wav and JSON
files; DATA and REPORT are only read), runs the benchmark's scripts from the checkout
(v1_v1.5/evaluation/: eval_pause_handling, eval_smooth_turn_taking, eval_user_interruption,
eval_backchannel, get_timing) with --python, parses what they print or write, and compares
with REPORT/report.json and samples.jsonl: TOR within 0.02, latencies within 0.05 s.

--python needs numpy, scipy and tqdm; the backchannel and v1.5 timing scripts also need
torch and the silero-vad package (e.g. a venv with a CPU torch wheel and
`pip install --no-deps silero-vad`). Three shims keep everything offline and are the only
changes to how their code runs: torchaudio.load reads the 16-bit wav with scipy (the files
are 16 kHz mono, so no resampling is involved); get_timing's torch.hub.load of
snakers4/silero-vad returns the silero-vad package's bundled model instead of downloading
it; eval_user_interruption's GPT judge is a stub that always answers "3" (the rating is
not compared, only TOR and latency, which the script computes before asking).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

SCRIPTS = {"pause_handling": ("eval_pause_handling", "eval_pause_handling"),
           "turn_taking": ("eval_smooth_turn_taking", "eval_smooth_turn_taking"),
           "user_interruption": ("eval_user_interruption", "eval_user_interruption"),
           "backchannel": ("eval_backchannel", "eval_backchannel")}
TOR_TOL, LATENCY_TOL = 0.02, 0.05


# ---- driver: runs inside --python, imports nothing from tml_jax ------------------------

def _shims():
  import types

  import numpy as np
  import scipy.io.wavfile
  import torch

  def load(path):
    sr, x = scipy.io.wavfile.read(str(path))
    x = x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x.astype(np.float32)
    return torch.from_numpy(x.reshape(1, -1) if x.ndim == 1 else x.T.copy()), sr

  sys.modules["torchaudio"] = types.SimpleNamespace(load=load, functional=None)
  from silero_vad import load_silero_vad
  torch.hub.load = lambda *a, **k: (load_silero_vad(), None)


class _StubJudge:
  """eval_user_interruption's `client`: chat.completions.create(...) -> a fixed rating.
  It is asked once per sample that takes the turn (eval_user_interruption.py L115-131)."""

  def __init__(self):
    self.calls = 0
    msg = type("M", (), {"content": "Analysis: not judged.\nI would rate the AI's response as 3"})
    reply = type("R", (), {"choices": [type("C", (), {"message": msg})]})

    def create(**kw):
      del kw
      self.calls += 1
      return reply

    self.chat = type("Chat", (), {"completions": type("Co", (), {
        "create": staticmethod(create)})})


def _tor_from_samples(kind: str, text: str, judge: _StubJudge) -> float | None:
  """Their TOR when the summary was not printed: turn taking and interruption divide by
  zero at the summary when no sample takes the turn (eval_smooth_turn_taking.py L92,
  eval_user_interruption.py L159), after scoring every sample: read the per-sample verdicts
  (the "the TOR is" lines, L83; for interruption the judge calls per sample processed)."""
  if kind == "turn_taking":
    tors = [int(x) for x in re.findall(r"the TOR is (\d)", text)]
    return sum(tors) / len(tors) if tors else None
  n = len(re.findall(r"^Processing ", text, re.M))
  return judge.calls / n if kind == "user_interruption" and n else None


def _parse(text: str) -> dict:
  out = {}
  for key, pat in (("tor", r"Average take turn:\s*([-\d.eE]+)"),
                   ("latency_s", r"Average latency:\s*([-\d.eE]+)"),
                   ("jsd", r"JSD - Mean:\s*([-\d.eE]+)"), ("tor", r"TOR - Mean:\s*([-\d.eE]+)"),
                   ("freq", r"Frequency - Mean:\s*([-\d.eE]+)")):
    m = re.search(pat, text)
    if m:
      out[key] = float(m.group(1))
  return out


def drive(plan_path: str):
  with open(plan_path) as f:
    plan = json.load(f)
  sys.path.insert(0, plan["evaluation_dir"])
  needs_torch = any(j["kind"] in ("backchannel", "v1.5") for j in plan["jobs"])
  if needs_torch:
    _shims()
  results = []
  for job in plan["jobs"]:
    buf, res = io.StringIO(), {"system": job["system"], "task": job["task"]}
    judge = _StubJudge()
    try:
      with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        if job["kind"] == "v1.5":
          import get_timing
          from pathlib import Path
          for folder in sorted(os.listdir(job["dir"])):
            get_timing.process_folder(Path(job["dir"]) / folder)
        else:
          module, fn = SCRIPTS[job["kind"]]
          run = getattr(__import__(module), fn)
          cwd = os.getcwd()
          os.chdir(job["cwd"])  # eval_backchannel reads ./icc_gt_distribution.json
          try:
            run(job["dir"], judge) if job["kind"] == "user_interruption" else run(job["dir"])
          finally:
            os.chdir(cwd)
    except Exception as e:  # their scripts divide by zero when no sample takes the turn
      res["error"] = f"{type(e).__name__}: {e}"
    res.update(_parse(buf.getvalue()))
    if "tor" not in res and "error" in res:
      res["tor"] = _tor_from_samples(job["kind"], buf.getvalue(), judge)
    results.append(res)
  json.dump(results, sys.stdout)


# ---- the comparison (this interpreter) --------------------------------------------------

def _link(src: str, dst: str):
  if os.path.exists(src):
    os.symlink(os.path.abspath(src), dst)


def lay_out(report_dir: str, data_dir: str, tmp: str, systems: list[str]) -> list[dict]:
  """Per system and task, a folder of sample folders as the scripts expect them."""
  rows = [json.loads(line) for line in open(os.path.join(report_dir, "samples.jsonl"))]
  jobs = {}
  for r in rows:
    if r["system"] not in systems or "error" in r or r["kind"] not in list(SCRIPTS) + ["v1.5"]:
      continue
    src = os.path.join(report_dir, r["system"], r["task"], r["sample"])
    dst = os.path.join(tmp, r["system"], r["task"].replace("/", "_"), "samples", r["sample"])
    os.makedirs(dst)
    inp = os.path.join(data_dir, r["task"], r["sample"])
    for name in os.listdir(inp):
      if name.endswith(".json") or name == "input.wav":
        _link(os.path.join(inp, name), os.path.join(dst, name))
    for name in ("output.wav", "output.json"):
      _link(os.path.join(src, name), os.path.join(dst, name))
    job = jobs.setdefault((r["system"], r["task"]), {
        "system": r["system"], "task": r["task"], "kind": r["kind"],
        "dir": os.path.dirname(dst), "cwd": os.path.dirname(os.path.dirname(dst))})
    icc = os.path.join(job["cwd"], "icc_gt_distribution.json")
    if r["kind"] == "backchannel" and not os.path.exists(icc):
      gt = os.path.join(data_dir, r["task"], "gt_distribution.json")
      if os.path.exists(gt):
        shutil.copy(gt, icc)
  return list(jobs.values())


def _v15_theirs(job: dict) -> dict:
  stops, gaps = [], []
  for folder in sorted(os.listdir(job["dir"]), key=int):
    path = os.path.join(job["dir"], folder, "latency_intervals.json")
    with open(path) as f:
      d = json.load(f)
    stops.append(d["latency_stop_list"])
    gaps.append(d["latency_resp_list"])
  return {"stop_intervals": stops, "response_intervals": gaps}


def _mean_of_means(lists) -> float | None:
  means = [sum(e - s for s, e in x) / len(x) for x in lists if x]
  return round(sum(means) / len(means), 4) if means else None


def compare(report_dir: str, jobs: list[dict], theirs: list[dict]) -> list[dict]:
  with open(os.path.join(report_dir, "report.json")) as f:
    rep = json.load(f)
  rows = [json.loads(line) for line in open(os.path.join(report_dir, "samples.jsonl"))]
  out = []
  for job, th in zip(jobs, theirs):
    key = job["task"] if job["kind"] == "v1.5" else job["kind"]
    ours = rep["systems"][job["system"]].get(key, {})
    if job["kind"] == "v1.5":
      mine = sorted((r for r in rows if r["system"] == job["system"] and r["task"] == job["task"]
                     and "metrics" in r), key=lambda r: int(r["sample"]))
      th = {**th, **_v15_theirs(job)}
      same = all([list(map(list, r["metrics"]["stop_intervals"])) == t for r, t in
                  zip(mine, th["stop_intervals"])] + [
                  list(map(list, r["metrics"]["response_intervals"])) == t for r, t in
                  zip(mine, th["response_intervals"])])
      for metric, lists in (("stop_latency_s", th["stop_intervals"]),
                            ("response_latency_s", th["response_intervals"])):
        out.append(_row(job, metric, ours.get(metric), _mean_of_means(lists), LATENCY_TOL,
                        f"intervals identical: {same}"))
      continue
    metrics = {"backchannel": ("tor", "freq", "jsd")}.get(job["kind"], ("tor", "latency_s"))
    for m in metrics:
      if job["kind"] == "pause_handling" and m == "latency_s":
        continue
      tol = TOR_TOL if m in ("tor", "freq", "jsd") else LATENCY_TOL
      out.append(_row(job, m, ours.get(m), th.get(m), tol, th.get("error", "")))
  return out


def _row(job, metric, ours, theirs, tol, note) -> dict:
  ok = (ours is None and theirs is None) or (
      ours is not None and theirs is not None and abs(ours - theirs) <= tol)
  return {"system": job["system"], "task": job["task"], "metric": metric, "ours": ours,
          "theirs": None if theirs is None else round(theirs, 4), "ok": ok, "note": note}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--fdb", help="Full-Duplex-Bench checkout (has v1_v1.5/evaluation)")
  ap.add_argument("--data", help="the DATA folder REPORT was made from")
  ap.add_argument("--report", help="REPORT folder of python -m tml_jax.evaluate")
  ap.add_argument("--python", default=sys.executable, help="interpreter for their scripts")
  ap.add_argument("--systems", default="", help="comma-separated (default: all in REPORT)")
  ap.add_argument("--out", default="", help="also write the comparison as JSON here")
  ap.add_argument("--driver", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.driver:
    return drive(args.driver)
  if not (args.fdb and args.data and args.report):
    ap.error("pass --fdb=CHECKOUT --data=DATA --report=REPORT")
  evaluation = os.path.join(args.fdb, "v1_v1.5", "evaluation")
  if not os.path.exists(os.path.join(evaluation, "eval_smooth_turn_taking.py")):
    ap.error(f"--fdb={args.fdb!r} has no v1_v1.5/evaluation/eval_smooth_turn_taking.py")
  with open(os.path.join(args.report, "report.json")) as f:
    systems = [s for s in (args.systems.split(",") if args.systems else json.load(f)["systems"])
               if s]
  with tempfile.TemporaryDirectory() as tmp:
    jobs = lay_out(args.report, args.data, tmp, systems)
    plan = os.path.join(tmp, "plan.json")
    with open(plan, "w") as f:
      json.dump({"evaluation_dir": os.path.abspath(evaluation), "jobs": jobs}, f)
    proc = subprocess.run([args.python, os.path.abspath(__file__), f"--driver={plan}"],
                          capture_output=True, text=True, cwd=tmp)
    if proc.returncode:
      sys.exit(f"their scripts failed under {args.python}:\n{proc.stderr[-3000:]}")
    rows = compare(args.report, jobs, json.loads(proc.stdout.strip().splitlines()[-1]))
  print("| system | task | metric | ours | theirs | agree | note |\n|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['system']} | {r['task']} | {r['metric']} | {r['ours']} | {r['theirs']} | "
          f"{'yes' if r['ok'] else 'NO'} | {r['note']} |")
  print(f"\n{sum(r['ok'] for r in rows)} of {len(rows)} agree (TOR, freq and JSD within "
        f"{TOR_TOL}, latencies within {LATENCY_TOL} s)")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
