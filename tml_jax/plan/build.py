"""The programs a plan compiles: the real train step and the real cached micro-turn step,
traced on abstract inputs (ShapeDtypeStruct with shardings), so nothing is allocated.

Both are the very functions training and serving run: `Setup`'s jitted train step
(tml_jax.train.state) and `InteractionModel.step` against the ring cache (what
tml_jax.serve.stream jits), here with the parameters sharded as the trainer shards them.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.platform import compile_for
from tml_jax import flops as flops_lib
from tml_jax.batch import random_batch
from tml_jax.microturn import ChunkLayout, TokenMeta
from tml_jax.model.cache import init_cache
from tml_jax.model.transformer import count_params
from tml_jax.plan import hlo
from tml_jax.train import sharding as shd
from tml_jax.train.state import Setup, model_from_params


@dataclasses.dataclass
class Program:
  name: str
  ok: bool
  compile_s: float
  memory: dict
  cost: dict
  collectives: dict
  largest_values: list
  # XLA's count for the whole program before partitioning (one conversation's micro-turn,
  # or the global train step); like `cost`, loop bodies count once and custom kernels as 0.
  global_cost: dict = dataclasses.field(default_factory=dict)
  error: str = ""

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def compile_program(name: str, platform: str, mesh, jitted, *args,
                    save_hlo: str = "") -> Program:
  """Lowers and compiles `jitted(*args)` for `platform`; a compile that runs out of device
  memory is a plan that does not fit, reported with the compiler's figures. `save_hlo`: a
  path prefix; the optimised HLO is written to PREFIX.NAME.hlo.txt."""
  t0 = time.perf_counter()
  with compile_for(platform), jax.set_mesh(mesh):
    lowered = jitted.trace(*args).lower()
    try:
      global_cost = hlo.cost(lowered)
    except Exception:  # compile-only TPU devices: XLA's analysis needs a live backend
      global_cost = {}
    try:
      compiled = lowered.compile()
    except Exception as e:  # XLA raises JaxRuntimeError; only RESOURCE_EXHAUSTED is a verdict
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      oom = hlo.parse_oom(str(e)) or {}
      return Program(name, False, time.perf_counter() - t0,
                     dict(temporaries=oom.get("temporaries", 0), hbm=oom.get("hbm", 0)),
                     {}, {}, [], global_cost, error=str(e)[:4000])
  text = compiled.as_text()
  if save_hlo:
    with open(f"{save_hlo}.{name}.hlo.txt", "w") as f:
      f.write(text)
  return Program(name, True, time.perf_counter() - t0, hlo.memory(compiled),
                 hlo.cost(compiled), hlo.collectives(text), hlo.largest_values(text),
                 global_cost)


def _shard(x) -> tuple:
  """The per-device shape of a (sharded) ShapeDtypeStruct."""
  return tuple(x.sharding.shard_shape(x.shape)) if x.sharding is not None else tuple(x.shape)


def _shard_bytes(x) -> int:
  return int(np.prod(_shard(x))) * jnp.dtype(x.dtype).itemsize


def per_device_bytes(abstract) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  return sum(_shard_bytes(x) for x in jax.tree.leaves(abstract))


def largest_leaves(tree, n: int = 6) -> list[dict]:
  """The `n` biggest leaves per device, by path (parameters, moments)."""
  key = lambda k: str(getattr(k, "key", getattr(k, "idx", k)))
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out.append(dict(path="/".join(key(k) for k in path), shape=list(x.shape),
                    per_device_shape=list(_shard(x)), bytes=_shard_bytes(x)))
  out.sort(key=lambda d: -d["bytes"])
  return out[:n]


def abstract_batch(config, sharding):
  """The train step's batch, global shape, as ShapeDtypeStructs (from one real row)."""
  lay = ChunkLayout.from_config(config.layout)
  row = random_batch(lay, batch=1, num_chunks=config.layout.num_chunks,
                     patch_size=config.model.patch_size)
  row["meta"] = TokenMeta(*row["meta"])
  B = config.train.batch_size
  return row, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((B,) + x.shape[1:], x.dtype, sharding=sharding), row)


def train_step(config, setup: Setup, platform: str, save_hlo: str = "") -> tuple[Program, dict]:
  """The compiled train step and what the plan derives from its shapes."""
  row, batch = abstract_batch(config, setup.batch_sharding)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=shd.replicated(setup.mesh))
  numbers = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=shd.replicated(setup.mesh))
  prog = compile_program("train_step", platform, setup.mesh, setup._train_step_jit,
                         setup.abstract_state, batch, rng, numbers, save_hlo=save_hlo)
  B = config.train.batch_size
  tokens = B * int(np.asarray(row["meta"].segment).shape[1])
  info = dict(
      batch_size=B, tokens_per_step=tokens,
      model_flops_per_step=B * flops_lib.train_step_flops(setup.cfg, row["meta"]),
      state_bytes_per_device=per_device_bytes(setup.abstract_state),
      params_bytes_per_device=per_device_bytes(setup.abstract_state["params"]),
      batch_bytes_per_device=per_device_bytes(batch),
      largest_state_leaves=largest_leaves(setup.abstract_state))
  total, active = count_params(setup.cfg)
  info.update(total_params=total, active_params=active)
  return prog, info


def microturn_step(config, setup: Setup, platform: str,
                   save_hlo: str = "") -> tuple[Program, dict]:
  """One micro-turn of one conversation on the slice: the parameters sharded as in training,
  the ring cache (batch 1) replicated, exactly `InteractionModel.step` as serving jits it."""
  cfg, mesh = setup.cfg, setup.mesh
  lay = cfg.layout
  rep = shd.replicated(mesh)
  cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                       jax.eval_shape(lambda: init_cache(cfg)))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
  obs = dict(user_dmel=spec((1, 1, lay.user_audio, 80), jnp.int32),
             self_dmel=spec((1, 1, lay.self_audio, 80), jnp.int32),
             self_speaking=spec((1, 1), jnp.bool_),
             text_in=spec((1, 1, lay.text_in), jnp.int32), video_valid=spec((), jnp.bool_))
  if lay.video:
    obs["video"] = spec((1, 1, lay.video, cfg.patch_size ** 2 * 3), jnp.uint8)
  if lay.prefix:
    obs["prefix"] = spec((1, lay.prefix), jnp.int32)
  flow_steps, threshold = int(config.model.flow_steps), 0.5

  def step(params, cache, obs, t, forced_T, rng, temperature):
    model = model_from_params(setup.graphdef, setup.abs_state, params)
    return model.step(cache, obs, t, forced_T, rng, temperature, flow_steps=flow_steps,
                      with_prefix=False, speak_threshold=threshold)

  jitted = jax.jit(step, donate_argnums=(1,))
  prog = compile_program("microturn_step", platform, mesh, jitted,
                         setup.abstract_state["params"], cache, obs, spec((), jnp.int32),
                         spec((lay.model_text,), jnp.int32),
                         spec((), jax.random.key(0).dtype), spec((), jnp.float32),
                         save_hlo=save_hlo)
  info = dict(tokens_per_microturn=lay.chunk_len, chunk_s=config.layout.chunk_ms / 1000,
              cache_bytes=per_device_bytes(cache), text_slots=lay.model_text,
              flow_steps=flow_steps,
              # forward FLOPs of the active parameters for one chunk's tokens (no attention):
              # the HLO count's floor, a check on it
              active_param_flops=2.0 * count_params(cfg)[1] * lay.chunk_len)
  return prog, info
