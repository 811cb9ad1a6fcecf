"""The training wing: `python -m tml_jax.train --config=... --workdir=...` (__main__.py).

  state.py       abstract train state, shardings, optimizer, the jitted train/eval steps,
                 params_abstract / model_from_params (what serving builds a model from)
  loop.py        the training loop: data, resume, steps, logging, validation, final report
  losses.py      every loss term (text, flow-matching audio, MoE aux weighting, background,
                 the speak gate)
  checkpoint.py  orbax checkpoints; restore_params reads the parameters alone (serving)
  report.py      the end-of-run report writer (numbers in, files out)
  sharding.py    mesh axes, logical-axis -> mesh-axis mapping, host -> global batches

Deliberately empty of imports: serving imports tml_jax.train.state / .checkpoint without
grain, optax or TensorFlow, and importing this package must not pull them in.
"""
