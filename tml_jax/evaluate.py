r"""Run systems over Full-Duplex-Bench sample folders and score what each says out loud.

  python -m tml_jax.data.export_fdb --split=test --out=out/fdb --per_task=20
  python -m tml_jax.evaluate --workdir=out/run --data=out/fdb --out=out/eval
  python -m tml_jax.evaluate --data=out/fdb --out=out/eval_baselines \
      --systems=vad_0.5s,vad_0.8s,silent,always_talking --max_per_task=5

DATA is the benchmark's layout (our export, or the real v1 / v1.5 folders); it is never
written. Per sample every system writes REPORT/<system>/<task>/<sample>/output.wav (the
model also monologue.json, its own text stream); the harness then writes output.json, the
ASR transcript of output.wav in the benchmark's shape, for every system alike, and scores
it with the benchmark's rules. REPORT/report.json, report.md, PNG plots and
REPORT/samples.jsonl (one line per system and sample) follow. The pieces live in
tml_jax/eval/: `samples` (reading DATA), `systems` (the model and the baselines), `vad`,
`asr`, `metrics` (the rules, with their sources), `harness` and `report`.

Systems: "model" (the streaming engine, `tml_jax.serve.Engine.from_workdir(--workdir,
--config)`), and the baselines of `tml_jax.eval.baselines` (vad_<endpoint>s, silent,
always_talking). When the model is asked for and cannot be loaded, the baselines still run
and are reported, and the program exits with status 1; a run without "model" among
--systems is a baselines-only run.

Python: `evaluate(data_dir, out_dir, systems=..., workdir=..., config=...) -> report dict`.
"""

from __future__ import annotations

import os
import sys

from tml_jax.eval import baselines, report
from tml_jax.eval.harness import DEFAULT_SYSTEMS, evaluate, score  # noqa: F401 (the API)
from tml_jax.eval.samples import (Sample, SampleError, discover, kind_of,  # noqa: F401
                                  load_sample, reference_times)
from tml_jax.eval.systems import (BaselineSystem, ModelSystem, ModelUnavailable,  # noqa: F401
                                  make_system)


def main(argv):
  del argv
  from absl import app, logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
  if not _DATA.value or not _OUT.value:
    raise app.UsageError("pass --data=DIR (a Full-Duplex-Bench layout) and --out=REPORT")
  names = [n.strip() for n in _SYSTEMS.value.split(",") if n.strip()]
  for n in names:
    if n != "model":
      baselines.make(n)  # fail on a typo before any work
  result = evaluate(_DATA.value, _OUT.value, names, workdir=_WORKDIR.value,
                    config=_CONFIG.value, max_per_task=_MAX.value)
  print(report.print_table(os.path.join(_OUT.value, "report.json"), echo=False))
  print(f"wrote {_OUT.value}/report.json, report.md and plots in {result['wall_s']} s")
  if "model" in result["unavailable"]:
    print(f"error: the model was asked for but not scored: {result['unavailable']['model']} "
          f"(pass --workdir=W of a trained run, or leave model out of --systems for a "
          f"baselines-only run)", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  # Flags are defined only when run as a program: export_fdb defines --config and --out too,
  # and tests import both modules into one process.
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Model config (default: the "
                                            "workdir's own).", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of the model.")
  _DATA = flags.DEFINE_string("data", None, "Full-Duplex-Bench layout root (read only).")
  _OUT = flags.DEFINE_string("out", None, "Report folder (outputs, report.json/md, plots).")
  _SYSTEMS = flags.DEFINE_string("systems", ",".join(DEFAULT_SYSTEMS), "Comma-separated.")
  _MAX = flags.DEFINE_integer("max_per_task", None, "Evaluate at most N samples per task.")
  app.run(main)
