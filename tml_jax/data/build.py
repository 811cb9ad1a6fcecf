r"""Build the synthetic conversation corpus (`tml_duplex`, docs/design.md §6) for a config.

  python -m tml_jax.data.build --config=configs/interaction.py:tiny --data_dir=data
  python -m tml_jax.data.build --config=configs/interaction.py:tiny,smoke --data_dir=data
  # smoke: 24/4/4 conversations of 12 s, well under a minute on 2 cores

Sizes, duration and seed come from `config.data` (num_train, num_validation, num_test,
conversation_s, seed, workers); override them like any field, e.g.
`--config.data.num_train=2000`. The data dir defaults to `config.data.dir`. A finished build is
reused: delete data_dir/tml_duplex/<name> to regenerate.
"""

from __future__ import annotations

import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file:variant.",
                                          lock_config=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Output dir (default: config.data.dir).")
_WORKERS = flags.DEFINE_integer("workers", None, "Generator processes (default: config).")


def main(argv):
  del argv
  import tensorflow_datasets as tfds

  from tml_jax.data import tml_duplex

  tfds.disable_progress_bar()  # ours shows conversations/s and the ETA; one bar is enough
  config = _CONFIG.value
  data_dir = _DATA_DIR.value or config.data.dir
  if not data_dir:
    raise app.UsageError("no output directory: pass --data_dir=DIR or set config.data.dir")
  t0 = time.perf_counter()
  builder = tml_duplex.build(data_dir, config.data, workers=_WORKERS.value)
  secs = time.perf_counter() - t0
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"tml_duplex/{builder.builder_config.name}: {splits} in {secs:.1f} s -> "
        f"{builder.data_dir}")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
