r"""Ablation grids for `python -m tml_jax.ablate`: `get_grid(NAME)` and, for the trainer,
`get_config("NAME/VARIANT")` (the variant's whole config).

  python -m tml_jax.ablate --grid=configs/ablations.py:NAME --workdir=runs/ablate/NAME \
      [--budget_min=M] [--seeds=K] [--data_dir=runs/data]

Every variant of a grid trains from the same base config, corpus, seeds and budget: at most
`steps` optimizer steps (the learning-rate schedule is set for that many) and at most
`budget_min` minutes of training, whichever comes first; the table reports the steps each
reached. Costs below are for 2 CPU cores and include the evaluation (the model only, voice
scored, `eval_per_task` samples per Full-Duplex-Bench task).

Grids
  microturn     the micro-turn length: 100 / 200 / 400 ms at an equal context in seconds
                (a 4.8 s window, 6.4 s training rows) and equal slots per second of text and
                audio. 80 ms is not buildable here: a chunk must hold whole 25 ms dMel hops
                (the corpus' features), so 100 ms is the shortest chunk near 80.
                python -m tml_jax.ablate --grid=configs/ablations.py:microturn \
                    --workdir=runs/ablate/microturn --data_dir=runs/data
                # ~27 min at the default 7 min per variant, one seed
  moe_vs_dense  the tiny MoE (8 experts, top-2, 8.3 M total / 3.9 M active) against a dense
                FFN of equal active width (hidden 1280) and one of equal total FFN
                parameters (hidden 5120).
                python -m tml_jax.ablate --grid=configs/ablations.py:moe_vs_dense \
                    --workdir=runs/ablate/moe_vs_dense --data_dir=runs/data
                # ~27 min
  background    the background model trained jointly, or not at all (config.background
                .enabled). The corpus' delegation scenarios are in validation (background
                loss) but the Full-Duplex-Bench export has no delegation task, so the
                behaviour columns do not score delegation.
                python -m tml_jax.ablate --grid=configs/ablations.py:background \
                    --workdir=runs/ablate/background --data_dir=runs/data     # ~18 min
  monologue     the text stream's supervision on or off (train.loss_weights.text = 0: the
                model is never taught its monologue; its text slots and the speak gate
                stay, so the audio model is compared with and without the inner text).
                python -m tml_jax.ablate --grid=configs/ablations.py:monologue \
                    --workdir=runs/ablate/monologue --data_dir=runs/data      # ~18 min
  window        the attention window: 10 / 25 chunks / unbounded.
                python -m tml_jax.ablate --grid=configs/ablations.py:window \
                    --workdir=runs/ablate/window --data_dir=runs/data         # ~27 min
  smoke         two `tiny,smoke` learning rates for 8 steps, 1 sample per task (CI).
                python -m tml_jax.ablate --grid=configs/ablations.py:smoke \
                    --workdir=runs/ablate/smoke                               # ~3 min
"""

import ml_collections as mlc

from configs.interaction import get_config as base_config

# The tiny config's measured throughput, 2 idle cores: ~0.6 steps/s (configs/interaction.py).
_TINY_STEPS_PER_MIN = 36


def _microturn(chunk_ms: int) -> dict:
  """Slots per second held equal to the 200 ms layout's: 40 dMel frames/s, 40 text bytes/s
  out and 20 in, 20 audio queries/s, one video frame per chunk; 6.4 s rows, a 4.8 s window."""
  k = chunk_ms / 200
  return {
      "layout.chunk_ms": chunk_ms,
      "layout.model_text_slots": int(8 * k),
      "layout.text_in_slots": int(4 * k),
      "layout.model_audio_slots": int(4 * k),
      "layout.num_chunks": int(32 / k),
      "layout.window": int(24 / k),
  }


GRIDS = {
    "microturn": dict(
        base="tiny", budget_min=7.0, eval_per_task=4,
        variants={f"chunk_{ms}ms": _microturn(ms) for ms in (100, 200, 400)}),
    "moe_vs_dense": dict(
        base="tiny", budget_min=7.0, eval_per_task=4,
        variants={
            "moe_8x640_top2": {},
            "dense_equal_active_1280": {"model.ffn": "dense", "model.dense_hidden": 1280},
            "dense_equal_total_5120": {"model.ffn": "dense", "model.dense_hidden": 5120},
        }),
    "background": dict(
        base="tiny", budget_min=7.0, eval_per_task=4,
        variants={"background_on": {}, "background_off": {"background.enabled": False}}),
    "monologue": dict(
        base="tiny", budget_min=7.0, eval_per_task=4,
        variants={"text_on": {}, "text_off": {"train.loss_weights.text": 0.0}}),
    "window": dict(
        base="tiny", budget_min=7.0, eval_per_task=4,
        variants={"window_10": {"layout.window": 10}, "window_25": {"layout.window": 25},
                  "unbounded": {"layout.window": None}}),
    "smoke": dict(
        base="tiny,smoke", budget_min=2.0, eval_per_task=1, steps=8,
        # Two peak learning rates: the schedule is a run-time input of the train step
        # (tml_jax.train.state.schedule_numbers), so both variants run the same compiled
        # programs and CI pays one set of compilations. The table reads the teacher-forced
        # probe; the free-running one (an engine compile and a conversation per variant) is
        # tested with the trainer's report elsewhere.
        variants={"lr_3e-3": {"train.probe_free_running_conversations": 0},
                  "lr_1e-3": {"train.lr": 1e-3,
                              "train.probe_free_running_conversations": 0}}),
}


def get_grid(name: str) -> dict:
  """{"base", "budget_min", "eval_per_task", "steps", "variants": {name: {field: value}}}."""
  if name not in GRIDS:
    raise ValueError(f"unknown ablation grid {name!r}; the grids are {', '.join(GRIDS)} "
                     "(configs/ablations.py)")
  g = dict(GRIDS[name])
  g.setdefault("steps", int(round(g["budget_min"] * _TINY_STEPS_PER_MIN)))
  return g


def apply(config: mlc.ConfigDict, overrides: dict) -> mlc.ConfigDict:
  """`{"layout.window": 10, ...}` set on a copy of `config`; unknown fields fail."""
  config = config.copy_and_resolve_references()
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"ablation override {path!r}: config has no field {leaf!r} there")
    with node.unlocked():
      node[leaf] = value  # None (e.g. an unbounded window) is allowed for any field
  return config


def variant_config(grid_name: str, variant: str, *, budget_min: float | None = None,
                   steps: int | None = None) -> mlc.ConfigDict:
  g = get_grid(grid_name)
  if variant not in g["variants"]:
    raise ValueError(f"grid {grid_name!r} has no variant {variant!r}; it has "
                     f"{', '.join(g['variants'])}")
  config = apply(base_config(g["base"]), g["variants"][variant])
  budget = g["budget_min"] if budget_min is None else budget_min
  n = g["steps"] if steps is None else steps
  config.train.num_steps = int(n)
  config.train.time_budget_s = float(budget) * 60.0
  # Evaluate and checkpoint at the end, and a few times on the way (a resumed variant loses
  # at most a fifth of its run).
  config.train.eval_every = max(1, int(n))
  config.train.checkpoint_every = max(1, int(n) // 5)
  config.train.warmup_steps = min(int(config.train.warmup_steps), max(1, int(n) // 10))
  return config


def get_config(arg: str) -> mlc.ConfigDict:
  """"GRID/VARIANT[,steps=N]" -> that variant's config (the trainer loads it by this name;
  `tml_jax.ablate` passes the step cap it runs the grid at)."""
  name, *opts = (arg or "").split(",")
  grid_name, _, variant = name.partition("/")
  if not variant:
    raise ValueError(f"config arg {arg!r}: pass GRID/VARIANT, e.g. microturn/chunk_200ms")
  kw = {}
  for opt in opts:
    key, _, value = opt.partition("=")
    if key != "steps" or not value.isdigit():
      raise ValueError(f"config arg {arg!r}: the only option is steps=N")
    kw["steps"] = int(value)
  return variant_config(grid_name, variant, **kw)
