"""Parameter counts of a config, without allocating anything.

  python -m tml_jax.params --config=configs/interaction.py:tml_small
prints one line: `total_params=N active_params=M` (active = used by one token: all dense
parameters plus top_k / num_experts of the routed experts).
"""

from absl import app, flags
from ml_collections import config_flags

from tml_jax.model.transformer import ModelConfig, count_params

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (path:variant).",
                                          lock_config=True)


def main(argv):
  del argv
  total, active = count_params(ModelConfig.from_config(_CONFIG.value))
  print(f"total_params={total} active_params={active}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
