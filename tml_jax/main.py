r"""The project's main job, end to end on the tiny config:

  python -m tml_jax.main --config=configs/interaction.py:tiny --workdir=runs/tiny

1. builds the tml_duplex corpus on first use (config.data; `data/` beside the workdir),
2. trains (tml_jax.train.loop; resumes when rerun) and writes W/report.md + W/loss_curves.png,
3. exports the test split in Full-Duplex-Bench layout (once), with the behaviour samples
   beside it (delegation, reminders, visual events, counting, translation, typed text:
   tml_jax.data.export_tasks), and runs the evaluation harness over them for the trained
   model and the baselines, then prints the results table
   (W/eval/report.md): every system scored on what it says out loud (the ASR of its
   output.wav), with the model's own text stream in a labelled column beside it. Exits
   non-zero when the trained model cannot be loaded for scoring.
"""

import os
import subprocess
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (path:variant).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, reports).")
_EVAL = flags.DEFINE_bool("eval", True, "Run the Full-Duplex-Bench style evaluation at the end.")
_PER_TASK = flags.DEFINE_integer("eval_per_task", 8, "Evaluation samples per task.")
_BEHAVIOURS = flags.DEFINE_bool("eval_behaviours", True,
                                "Also evaluate the behaviour samples (tml_jax.data.export_tasks).")
# 4, not 8: behaviour samples run 8-24 s each, and the evaluation stays within 8 minutes on
# 2 cores (8 per behaviour added 4.5 min, benchmarks/RESULTS.md).
_BEHAVIOUR_PER_TASK = flags.DEFINE_integer("eval_behaviour_per_task", 4,
                                           "Evaluation samples per behaviour task.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  from tml_jax.train.loop import train_and_evaluate
  config, workdir = _CONFIG.value, _WORKDIR.value
  result = train_and_evaluate(config, workdir)
  if result.get("status") == "preempted" or not _EVAL.value or jax.process_index() != 0:
    return
  from tml_jax import paths
  from tml_jax.data import export_fdb
  # The evaluation writes and reads audio files with local tools: a remote run (gs://...)
  # is evaluated into a local folder (its checkpoints are still read from the bucket).
  workdir = result["workdir"]  # resolved: file:// and relative paths made absolute
  local = paths.local_folder(workdir)
  fdb = os.path.join(paths.local_folder(result["data_dir"]), f"fdb_test_{_PER_TASK.value}")
  # Reused only when its manifest holds the same settings (seed, durations, per_task, ...).
  export_fdb.ensure_export(fdb, "test", config.data, per_task=_PER_TASK.value,
                           behaviours=_BEHAVIOURS.value,
                           behaviour_per_task=_BEHAVIOUR_PER_TASK.value,
                           log=lambda m: print(m, flush=True))
  out = os.path.join(local, "eval")
  if local != workdir:
    print(f"{workdir} is remote: the evaluation is written to {out}", flush=True)
  # Its own process: the Silero VAD's ONNX runtime aborts ("free(): invalid pointer") in a
  # process that has loaded TensorFlow; training no longer does, but stays apart from it.
  cmd = [sys.executable, "-m", "tml_jax.evaluate", f"--workdir={workdir}", f"--data={fdb}",
         f"--out={out}"]
  rc = subprocess.run(cmd).returncode  # prints the voice-scored table, monologue beside
  if rc:
    sys.exit(f"error: the evaluation failed (exit {rc}): {' '.join(cmd)}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
