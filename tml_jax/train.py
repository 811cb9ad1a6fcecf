"""CLI of the trainer (the project's main job); the logic lives in tml_jax.trainer.

  python -m tml_jax.train --config=configs/interaction.py:tiny --workdir=runs/tiny
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tml_jax.trainer import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (path:variant).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the report go here.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result.get("status") != "preempted":
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  sys.exit(app.run(main))
