r"""The project's main job, end to end on the tiny config:

  python -m tml_jax.main --config=configs/interaction.py:tiny --workdir=runs/tiny

1. builds the tml_duplex corpus on first use (config.data; `data/` beside the workdir),
2. trains (tml_jax.trainer; resumes when rerun) and writes W/report.md + W/loss_curves.png,
3. exports the test split in Full-Duplex-Bench layout (once) and runs the evaluation harness
   over it for the trained model and the baselines, then prints the results table
   (W/eval/report.md).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (path:variant).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, reports).")
_EVAL = flags.DEFINE_bool("eval", True, "Run the Full-Duplex-Bench style evaluation at the end.")
_PER_TASK = flags.DEFINE_integer("eval_per_task", 8, "Evaluation samples per task.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  from tml_jax.trainer import train_and_evaluate
  config, workdir = _CONFIG.value, _WORKDIR.value
  result = train_and_evaluate(config, workdir)
  if result.get("status") == "preempted" or not _EVAL.value or jax.process_index() != 0:
    return
  from tml_jax.data import export_fdb
  fdb = os.path.join(result["data_dir"], f"fdb_test_{_PER_TASK.value}")
  if not os.path.exists(os.path.join(fdb, ".complete")):
    print(f"exporting {_PER_TASK.value} test samples per task to {fdb} ...", flush=True)
    counts = export_fdb.export(fdb, "test", config.data, per_task=_PER_TASK.value)
    with open(os.path.join(fdb, ".complete"), "w") as f:
      f.write(repr(counts))
  from tml_jax import evaluate
  from tml_jax.eval import report
  out = os.path.join(workdir, "eval")
  evaluate.evaluate(fdb, out, workdir=workdir, config=config)
  report.print_table(os.path.join(out, "report.json"))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
