r"""The delegation chain's second link on many conversations: does the background model of a
trained run write the right call when a delegation is forced on time?

  python benchmarks/background_links.py --workdir=runs/tiny [--num=24] [--split=validation]

The trainer's report measures this on the few validation conversations that delegate (3 or 4
for tiny). Here `--num` delegation conversations of `--split` are generated afresh (the
`delegation` scenario forced, the run's corpus seed and length; half of them have a typed
question since corpus 1.4.0); with --from_corpus they are instead the delegation
conversations of the run's own corpus split (for train: the ones it learnt from, so the
gap to fresh ones is what it memorised). Each runs through the streaming engine of the run's newest
checkpoint with a delegation forced at the micro-turn before the corpus' own
(tml_jax.probe.background_at_delegations; the typed question is fed as TEXT_IN, as the
evaluation feeds it). Prints the links for all, for typed and for spoken questions, and the
first calls written against the expected ones; --json writes them too.

Importable without TensorFlow, grain or clu.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LINKS = ("ended", "tool", "args", "ran", "answer")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a trainer workdir (config.json, checkpoints)")
  p.add_argument("--num", type=int, default=24, help="delegation conversations")
  p.add_argument("--split", default="validation", choices=("train", "validation", "test"))
  p.add_argument("--from_corpus", action="store_true",
                 help="the corpus split's own delegation conversations, not fresh ones")
  p.add_argument("--json", default=None, help="also write the counts here")
  a = p.parse_args(argv)
  if a.num < 1:
    p.error(f"--num={a.num}: need at least one conversation")

  from tml_jax import probe
  from tml_jax.data import scenarios
  from tml_jax.data.conversation import featurise
  from tml_jax.serve.engine import Engine, load_config

  config = load_config(a.workdir, None)
  engine = Engine.from_workdir(a.workdir, delegate_threshold=1.0)
  chunk_s = config.layout.chunk_ms / 1000
  t0 = time.perf_counter()
  rows = {"all": dict.fromkeys(LINKS, 0), "typed": dict.fromkeys(LINKS, 0),
          "spoken": dict.fromkeys(LINKS, 0)}
  n = {"all": 0, "typed": 0, "spoken": 0}
  calls = []
  names = list(scenarios.SCENARIOS)
  size = int(config.data[f"num_{a.split}"])
  picks = ([i for i in range(size) if names[i % len(names)] == "delegation"][:a.num]
           if a.from_corpus else list(range(a.num)))
  for j, i in enumerate(picks):
    conv = scenarios.generate(a.split, i, seed=int(config.data.seed),
                              duration_s=float(config.data.conversation_s),
                              scenario=None if a.from_corpus else "delegation")
    record = featurise(conv)
    out = probe.background_at_delegations(engine, [record], chunk_s=chunk_s)
    typed = any(e.data.get("typed") for e in conv.events_of("delegation"))
    for group in ("all", "typed" if typed else "spoken"):
      n[group] += out["n"]
      for k in LINKS:
        rows[group][k] += out[k]
    calls += [("typed" if typed else "spoken", want, got) for want, got in out["calls"]]
    print(f"[{j + 1}/{len(picks)}] {conv.id}: {'typed' if typed else 'spoken'}, "
          + ", ".join(f"{k} {out[k]}" for k in LINKS) + f" of {out['n']} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
  which = "the corpus's own" if a.from_corpus else "fresh"
  print(f"\n{a.workdir} (step {engine.step}), {a.split} ({which}), {len(picks)} delegation "
        f"conversations, {platform.machine()} {os.cpu_count()} cores")
  print("| questions | n | " + " | ".join(LINKS) + " |")
  print("|---|---|" + "---|" * len(LINKS))
  for group in rows:
    print(f"| {group} | {n[group]} | " + " | ".join(str(rows[group][k]) for k in LINKS) + " |")
  print("\nfirst calls (expected -> written):")
  for kind, want, got in calls[:12]:
    print(f"  {kind:6s} {want!r} -> {got!r}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(workdir=a.workdir, step=engine.step, split=a.split, n=n, links=rows,
                     calls=calls), f, indent=1)


if __name__ == "__main__":
  main()
