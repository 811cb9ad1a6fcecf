"""The train state, its shardings and the jitted steps.

State: dict(step=int32 [], params=pure dict of the model's nnx state, opt=optax state): the
tree orbax checkpoints hold (tml_jax.train.checkpoint). Parameters are sharded by their
logical axes through the config's rule table (tml_jax.train.sharding); optimizer moments
follow their parameter. `train_step(state, batch, rng, numbers) -> (state, metrics)` is pure and jitted
once with explicit shardings and the state donated.

Serving imports this module for `params_abstract` / `model_from_params` and must not need the
training dependencies: optax is imported only where the optimizer is built.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from tml_jax.model.transformer import InteractionModel, ModelConfig
from tml_jax.train import sharding as shd
from tml_jax.train.losses import compute_losses, losses_from_output, sampled_audio_l1


# ----------------------------------------------------------------------------- the model

def abstract_model(cfg: ModelConfig):
  """(graphdef, abstract nnx state) of the model, allocating nothing."""
  return nnx.split(nnx.eval_shape(lambda: InteractionModel(cfg, rngs=nnx.Rngs(0))))


def params_abstract(config, sharding: jax.sharding.Sharding | None = None):
  """(graphdef, abstract nnx state) of the model `config` describes, each leaf a
  ShapeDtypeStruct placed on `sharding` (default: the first device, what serving runs on).
  `nnx.to_pure_dict` of the state is the `params` subtree of a checkpoint."""
  graphdef, abs_state = abstract_model(ModelConfig.from_config(config))
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return graphdef, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abs_state)


def model_from_params(graphdef, abs_state, params: dict) -> InteractionModel:
  """The model with `params` (a pure dict, as checkpointed) in the structure of `abs_state`."""
  state = jax.tree.map(lambda x: x, abs_state)  # a copy: replace_by_pure_dict mutates
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def _nested(flat: dict) -> dict:
  out = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


def param_shardings(abs_state, rules, mesh) -> dict:
  """NamedSharding of every parameter (pure-dict tree) from its logical axes."""
  return _nested({
      p: jax.sharding.NamedSharding(mesh, shd.logical_to_spec(
          v.get_metadata().get("logical_axes", ()), rules, v.get_value().shape, mesh))
      for p, v in abs_state.flat_state()})


# ----------------------------------------------------------------------------- optimizer

def schedule_numbers(tc) -> jnp.ndarray:
  """[peak, warmup_steps, decay_steps, end] of the learning-rate schedule, as an array the
  jitted step takes at run time: a run's length is then not part of the compiled program, so
  runs of different lengths (and every test trainer) share one cached compilation."""
  return jnp.asarray([tc.lr, tc.warmup_steps, max(tc.num_steps, tc.warmup_steps + 1),
                      tc.lr * tc.min_lr_ratio], jnp.float32)


def learning_rate(step, numbers):
  """Linear warmup from 0 to the peak, then a cosine decay to `end` at decay_steps (the
  schedule optax.warmup_cosine_decay_schedule computes, from traced numbers)."""
  peak, warmup, decay, end = (numbers[i] for i in range(4))
  step = jnp.asarray(step, jnp.float32)
  rising = peak * step / jnp.maximum(warmup, 1.0)
  frac = jnp.clip((step - warmup) / jnp.maximum(decay - warmup, 1.0), 0.0, 1.0)
  falling = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  return jnp.where(step < warmup, rising, falling)


def make_optimizer(tc, numbers=None):
  """AdamW with global-norm clipping. `numbers` (schedule_numbers, traced inside the step)
  sets the learning rate; the state's structure does not depend on it."""
  import optax  # training only (see the module docstring)
  numbers = schedule_numbers(tc) if numbers is None else numbers
  schedule = lambda count: learning_rate(count, numbers)
  # No decay on vectors (norm scales): decaying them only fights the normalisation.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                     optax.adamw(schedule, b2=tc.b2, weight_decay=tc.weight_decay,
                                 mask=decay_mask))


def optimizer_shardings(tx, abs_opt, param_sh, mesh):
  """Optimizer moments follow their parameter's sharding; scalars (counts) are replicated."""
  import optax  # training only
  return optax.tree_utils.tree_map_params(tx, lambda _, sh: sh, abs_opt, param_sh,
                                          transform_non_params=lambda _: shd.replicated(mesh))


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- setup

class Setup:
  """Everything static about a run: model graph, shardings, optimizer, jitted steps."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.cfg = ModelConfig.from_config(config)
    self.graphdef, self.abs_state = abstract_model(self.cfg)
    self.tx = make_optimizer(config.train)  # its structure; the step builds its own
    self.schedule_numbers = schedule_numbers(config.train)
    abs_params = nnx.to_pure_dict(self.abs_state)
    abs_opt = jax.eval_shape(self.tx.init, abs_params)
    param_sh = param_shardings(self.abs_state, config.sharding_rules, mesh)
    self.state_sharding = dict(step=shd.replicated(mesh), params=param_sh,
                               opt=optimizer_shardings(self.tx, abs_opt, param_sh, mesh))
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params, opt=abs_opt),
        self.state_sharding)
    self.batch_sharding = shd.batch_sharding(mesh)
    self.weights = {k: float(v) for k, v in config.train.loss_weights.items()}
    # The initialiser runs once: on CPU, LLVM's optimisation of its ~100 threefry streams
    # is most of its compile time (tiny,smoke: 11.1 s -> 4.1 s at level 0, the same values
    # to 1e-13) and buys nothing. Every process of a run compiles it alike.
    platform = mesh.devices.flat[0].platform
    self._init_jit = jax.jit(
        self._init, out_shardings=self.state_sharding,
        compiler_options=dict(xla_backend_optimization_level=0) if platform == "cpu" else None)
    step_in = (self.state_sharding, self.batch_sharding, shd.replicated(mesh))
    self._train_step_jit = jax.jit(functools.partial(train_step, setup=self),
                                   in_shardings=step_in + (shd.replicated(mesh),),
                                   out_shardings=(self.state_sharding, shd.replicated(mesh)),
                                   donate_argnums=(0,))
    self._eval_step_jit = jax.jit(functools.partial(eval_step, setup=self),
                                  in_shardings=step_in, out_shardings=shd.replicated(mesh))
    # The teacher-forced text and speak logits of a batch (the report's decoded samples and
    # the speak-decision probe): one program, compiled once per run, not once per use.
    def logits(params, batch):
      out = self.model(params)(batch)
      return out.text_logits, out.speak_logits
    self._logits_jit = jax.jit(logits)

  # The jitted steps trace under the run's mesh, so layers can see it (the MoE dispatches
  # tokens by all-to-all when the mesh has an 'expert' axis > 1).
  def init(self):
    with jax.set_mesh(self.mesh):
      return self._init_jit()

  def train_step(self, state, batch, rng):
    with jax.set_mesh(self.mesh):
      return self._train_step_jit(state, batch, rng, self.schedule_numbers)

  def eval_step(self, state, batch, rng):
    with jax.set_mesh(self.mesh):
      return self._eval_step_jit(state, batch, rng)

  def logits(self, params, batch):
    """(text logits, speak logits or None) of a global batch, teacher-forced."""
    with jax.set_mesh(self.mesh):
      return self._logits_jit(params, batch)

  def _init(self):
    model = InteractionModel(self.cfg, rngs=nnx.Rngs(self.config.seed))
    params = nnx.to_pure_dict(nnx.state(model))
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt=self.tx.init(params))

  def model(self, params):
    return model_from_params(self.graphdef, self.abs_state, params)


# ----------------------------------------------------------------------------- steps

def train_step(state, batch, rng, numbers, *, setup: Setup):
  """One optimizer step; a non-finite loss or gradient leaves the state unchanged and
  reports ok=False (the host then stops the run with the pre-step state saved). `numbers`
  are the learning-rate schedule's (schedule_numbers), a run-time input."""
  tx = make_optimizer(setup.config.train, numbers)

  def loss_fn(params):
    return compute_losses(setup.model(params), batch, rng, setup.weights)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  grad_norm = global_norm(grads)
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state["params"], updates)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = dict(step=state["step"] + 1, params=params, opt=opt)
  new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, ok=ok,
                 lr=learning_rate(state["step"], numbers))
  return new, metrics


def eval_step(state, batch, rng, *, setup: Setup):
  """Every loss term plus the sampled-mel L1, from one forward pass."""
  model = setup.model(state["params"])
  out = model(batch)
  _, metrics = losses_from_output(model, out, batch, rng, setup.weights,
                                  other_conversation=True)
  metrics["audio_l1"] = sampled_audio_l1(model, out.audio_cond, batch, rng,
                                         setup.config.model.flow_steps)
  return metrics
