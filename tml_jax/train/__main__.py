"""CLI of the trainer (the project's main job); the loop lives in tml_jax.train.loop.

  python -m tml_jax.train --config=configs/interaction.py:tiny --workdir=runs/tiny
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (path:variant).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the report go here.")


def main(argv, **loop_kwargs):
  """`loop_kwargs` go to train_and_evaluate (e.g. final_report=False from a script)."""
  del argv
  from tml_jax.train.loop import train_and_evaluate
  logging.set_verbosity(logging.WARNING)
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value, **loop_kwargs)
  if result.get("status") != "preempted":
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  sys.exit(app.run(main))
