"""InteractionModel: causality, MoE equivalences, flow head, dtypes, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.interaction import get_config
from tml_jax.batch import random_batch
from tml_jax.config import ConfigError, validate
from tml_jax.microturn import Segment, TokenMeta
from tml_jax.model.flow import FlowConfig, FlowHead
from tml_jax.model.moe import MoE, MoEConfig, balance_loss
from tml_jax.model.transformer import InteractionModel, ModelConfig, count_params
from tml_jax.train.losses import flow_matching_loss


def tiny_config(**model):
  c = get_config("tiny")
  c.model.update(dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      num_experts=4, top_k=2, expert_hidden=32, flow_hidden=32, **model))
  c.layout.update(dict(window=3, video_size=(40, 40), video_slots=1, text_in_slots=2,
                       model_text_slots=3, model_audio_slots=2, prefix_slots=2))
  return c


def build(config, seed=0):
  cfg = ModelConfig.from_config(config)
  return cfg, InteractionModel(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("window", [None, 2])
def test_causality_by_gradients(rng, window):
  """The hidden state of chunk t's prediction slot s has exactly zero gradient w.r.t. every
  input of chunks > t, later prediction slots of chunk t, and other documents."""
  config = tiny_config()
  config.layout.window = window
  cfg, model = build(config, seed=int(rng.integers(1 << 30)))
  C = 6
  batch = random_batch(cfg.layout, batch=1, num_chunks=C, num_docs=2,
                       seed=int(rng.integers(1 << 30)))
  meta = TokenMeta(*(jnp.asarray(f) for f in batch["meta"]))
  x0 = cfg.layout.pack(model.embed_chunks(batch))
  pos = jnp.arange(x0.shape[1])[None]
  is_pred = np.isin(np.asarray(meta.segment[0]), [Segment.MODEL_TEXT, Segment.MODEL_AUDIO])
  probe = jnp.asarray(rng.normal(size=x0.shape[-1]), jnp.float32)
  chunk, slot, doc = (np.asarray(f[0]) for f in (meta.chunk, meta.slot, meta.doc))
  # One compiled gradient function, the query index a traced argument.
  grad_fn = jax.jit(jax.grad(
      lambda x, q: jnp.sum(model.backbone(x, meta, pos)[0][0, q] * probe)))
  for q in np.flatnonzero(is_pred)[::3]:
    g = np.abs(np.asarray(grad_fn(x0, q)[0])).sum(-1)
    hidden = (chunk > chunk[q]) | ((chunk == chunk[q]) & is_pred & (slot > slot[q])) | (
        doc != doc[q])
    assert np.all(g[hidden] == 0.0), f"query {q} depends on invisible tokens {np.flatnonzero(g * hidden)}"
    seen_obs = (chunk == chunk[q]) & ~is_pred & (doc == doc[q])
    assert np.all(g[seen_obs] > 0), "the test must be able to see a dependence"


def _loop_moe(moe: MoE, x_TD):
  """Σ_k w_k · expert_k(x), one token at a time (the definition)."""
  logits = x_TD @ moe.router[...]
  probs = jax.nn.softmax(logits, -1)
  w, ids = jax.lax.top_k(probs, moe.cfg.top_k)
  w = w / w.sum(-1, keepdims=True)
  wg, wu, wd = (p[...] for p in (moe.w_gate, moe.w_up, moe.w_down))
  rows = []
  for t in range(x_TD.shape[0]):
    y = 0.0
    for j in range(moe.cfg.top_k):
      e = ids[t, j]
      h = jax.nn.silu(x_TD[t] @ wg[e]) * (x_TD[t] @ wu[e])
      y = y + w[t, j] * (h @ wd[e])
    rows.append(y)
  return jnp.stack(rows)


def test_moe_capacity_grouped_loop_agree(rng):
  B, L, D = 2, 12, 16
  seed = int(rng.integers(1 << 30))
  mk = lambda impl: MoE(MoEConfig(D, 24, num_experts=4, top_k=2, impl=impl,
                                  capacity_factor=4.0), rngs=nnx.Rngs(seed))
  moes = {impl: mk(impl) for impl in ("capacity", "grouped")}
  # Skew the router so one expert is popular and another may be empty.
  bias = jnp.asarray(rng.normal(size=(D, 4)) * 2, jnp.float32)
  for m in moes.values():
    m.router[...] = m.router[...] + bias
  x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  valid = jnp.ones((B, L), bool)
  ref = _loop_moe(moes["grouped"], x.reshape(-1, D)).reshape(B, L, D)
  probe = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)

  def loss(m, x):
    y, aux = m(x, valid)
    return jnp.sum(y * probe), aux

  grads = {}
  for impl, m in moes.items():
    (val, aux), (g_m, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(m, x)
    np.testing.assert_allclose(m(x, valid)[0], ref, rtol=1e-5, atol=1e-5)
    grads[impl] = (g_m, g_x)
    if impl == "capacity":
      assert float(aux["dropped_fraction"]) == 0.0
  g_ref = jax.grad(lambda x: jnp.sum(_loop_moe(moes["grouped"], x.reshape(-1, D)).reshape(B, L, D)
                                     * probe))(x)
  for impl, (g_m, g_x) in grads.items():
    np.testing.assert_allclose(g_x, g_ref, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.state(grads["capacity"][0])),
                  jax.tree.leaves(nnx.state(grads["grouped"][0]))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_capacity_drops_beyond_capacity():
  D = 8
  m = MoE(MoEConfig(D, 8, num_experts=4, top_k=1, impl="capacity", capacity_factor=0.5),
          rngs=nnx.Rngs(0))
  m.router[...] = jnp.zeros((D, 4)).at[:, 0].set(10.0)  # every token wants expert 0
  x = jnp.abs(jax.random.normal(jax.random.key(1), (1, 16, D)))
  _, aux = m(x, jnp.ones((1, 16), bool))
  # capacity = ceil(0.5 * 16 / 4) = 2 tokens kept of 16.
  np.testing.assert_allclose(float(aux["dropped_fraction"]), 14 / 16)


def test_balance_loss_known_values():
  T, E, k = 64, 4, 2
  probs = jnp.full((T, E), 1 / E)
  ids = jnp.stack([jnp.arange(T) % E, (jnp.arange(T) + 1) % E], 1)
  np.testing.assert_allclose(balance_loss(probs, ids, jnp.ones(T, bool)), 1.0, rtol=1e-6)
  collapsed = jnp.zeros((T, E)).at[:, 0].set(1.0)
  ids0 = jnp.zeros((T, 1), jnp.int32)
  np.testing.assert_allclose(balance_loss(collapsed, ids0, jnp.ones(T, bool)), E, rtol=1e-6)


def test_flow_head_learns_bimodal_target(rng):
  """Two modes per condition: more Euler steps must land closer to a mode than one step
  (which can only reach the conditional mean, between the modes)."""
  head = FlowHead(FlowConfig(cond_dim=2, out_dim=2, width=64, num_layers=2), rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(head, optax.adam(3e-3), wrt=nnx.Param)

  def sample_data(key, n):
    kc, km = jax.random.split(key)
    c = jnp.where(jax.random.bernoulli(kc, 0.5, (n,)), 1.5, -1.5)
    m = jnp.where(jax.random.bernoulli(km, 0.5, (n,)), 1.0, -1.0)
    return jnp.stack([c, -c], -1), jnp.stack([c, m], -1)

  @nnx.jit
  def step(head, opt, key):
    k1, k2 = jax.random.split(key)
    cond, x1 = sample_data(k1, 256)
    loss, g = nnx.value_and_grad(lambda h: flow_matching_loss(h, cond, x1, k2))(head)
    opt.update(head, g)
    return loss

  key = jax.random.key(int(rng.integers(1 << 30)))
  losses = [float(step(head, opt, k)) for k in jax.random.split(key, 600)]
  assert np.mean(losses[-50:]) < 0.6 * np.mean(losses[:20])
  cond, _ = sample_data(jax.random.key(7), 512)

  def mode_error(steps):
    x = head.sample(cond, jax.random.key(3), steps)
    return float(jnp.mean(jnp.abs(x[:, 0] - cond[:, 0]) + jnp.abs(jnp.abs(x[:, 1]) - 1.0)))
  e1, e8 = mode_error(1), mode_error(8)
  assert e8 < 0.6 * e1 and e8 < 0.35, (e1, e8)


def test_jit_matches_eager_and_bf16_runs(rng):
  config = tiny_config()
  cfg, model = build(config)
  batch = random_batch(cfg.layout, batch=2, num_chunks=4, num_docs=2, pad_chunks=1,
                       seed=int(rng.integers(1 << 30)))
  eager = model(batch)
  jitted = nnx.jit(lambda m, b: m(b))(model, batch)
  np.testing.assert_allclose(eager.text_logits, jitted.text_logits, rtol=1e-4, atol=1e-4)
  # bf16 numerics, on the dense FFN: with MoE, bf16 rounding flips a near-tied top-k choice
  # for some random batches, and one rerouted token moves the logits by ~5 % on its own
  # (0.004 typical, 0.03-0.06 with a flip; measured over seeds).
  config.model.ffn = "dense"
  cfg32, model32 = build(config)
  config.model.dtype = "bfloat16"
  cfg16 = ModelConfig.from_config(config)
  model16 = InteractionModel(cfg16, rngs=nnx.Rngs(0))
  f = nnx.jit(lambda m, b: m(b))
  out32, out16 = f(model32, batch), f(model16, batch)
  assert out16.hidden.dtype == jnp.bfloat16
  rel = jnp.linalg.norm(out16.text_logits - out32.text_logits) / jnp.linalg.norm(out32.text_logits)
  assert float(rel) < 2e-2, float(rel)


@pytest.mark.parametrize("field,value,match", [
    ("model.num_heads", 3, "num_kv_heads"),
    ("model.top_k", 9, "top_k"),
    ("layout.chunk_ms", 210, "chunk_ms=210"),
    ("mesh.expert", 3, "num_experts=8"),
    ("layout.video_size", (100, 80), "video_size"),
    ("layout.model_audio_slots", 3, "model_audio_slots"),
    ("model.moe_impl", "magic", "moe_impl"),
    ("layout.window", 0, "window"),
    ("model.remat", "some", "remat"),
])
def test_bad_configs_raise(field, value, match):
  c = get_config("tiny")
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError, match=match) as e:
    validate(c)
  assert "Fix:" in str(e.value)


def test_heads_not_dividing_width():
  c = get_config("tiny")
  c.model.update(dict(num_heads=5, num_kv_heads=1))
  with pytest.raises(ConfigError, match=f"d_model={c.model.d_model}"):
    validate(c)


def test_param_counts():
  total, active = count_params(ModelConfig.from_config(get_config("tml_small")))
  assert abs(total / 276e9 - 1) < 0.02 and abs(active / 12e9 - 1) < 0.05, (total, active)
  total, active = count_params(ModelConfig.from_config(get_config("tiny")))
  assert 5e6 <= total <= 30e6 and active < total  # CPU-sized: a few million parameters
  dense_total, dense_active = count_params(ModelConfig.from_config(get_config("tiny,dense")))
  assert dense_total == dense_active


def test_pallas_attention_backend_matches_reference(rng):
  """Same loss and gradients with the Pallas kernel (interpret mode on CPU) as with the
  dense reference."""
  from tml_jax.train.losses import compute_losses
  weights = dict(text=1.0, audio=1.0, balance=0.01, z=1e-3, background=1.0)
  results = {}
  seed = int(rng.integers(1 << 30))
  for backend in ("reference", "pallas"):
    config = tiny_config(attention_backend=backend, moe_impl="grouped")
    cfg, model = build(config, seed=seed)
    batch = random_batch(cfg.layout, batch=1, num_chunks=4, num_docs=2, pad_chunks=1, seed=seed)
    loss, grads = nnx.value_and_grad(
        lambda m: compute_losses(m, batch, jax.random.key(0), weights)[0])(model)
    results[backend] = (float(loss), jax.tree.leaves(nnx.state(grads)))
  (l_ref, g_ref), (l_pal, g_pal) = results["reference"], results["pallas"]
  np.testing.assert_allclose(l_pal, l_ref, rtol=1e-5)
  for a, b in zip(g_pal, g_ref):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("policy", ["dots", "full"])
def test_remat_changes_memory_not_gradients(rng, policy):
  """model.remat recomputes activations in the backward pass: the loss gradients of every
  parameter equal those of the un-rematerialised model, on the same random batch."""
  from tml_jax.train.losses import compute_losses
  seed = int(rng.integers(1 << 30))
  grads = {}
  for remat in ("none", policy):
    config = get_config("tiny,smoke")
    config.model.remat = remat
    cfg = ModelConfig.from_config(config)
    graphdef, state = nnx.split(InteractionModel(cfg, rngs=nnx.Rngs(0)))
    batch = random_batch(cfg.layout, batch=2, num_chunks=5, seed=seed)
    weights = {k: float(v) for k, v in config.train.loss_weights.items()}
    loss = lambda s: compute_losses(nnx.merge(graphdef, s), batch, jax.random.key(0),
                                    weights)[0]
    grads[remat] = jax.jit(jax.grad(loss))(state)
  for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[policy])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gate", [True, False])
def test_flow_head_learns_only_speech_under_a_speak_gate(rng, gate):
  """With a speak gate the flow loss (and the sampled-mel score) reads only the chunks whose
  target holds the model's speech: changing the target anywhere else changes nothing.
  Without a gate the flow head owns silence too, and every chunk counts."""
  from tml_jax.train.losses import audio_loss, sampled_audio_l1
  config = tiny_config(speak_gate=gate)
  cfg, model = build(config, seed=int(rng.integers(1 << 30)))
  batch = random_batch(cfg.layout, batch=2, num_chunks=5, seed=int(rng.integers(1 << 30)))
  voiced = np.asarray(batch["audio_voiced"])
  assert voiced.any() and (~voiced & np.asarray(batch["audio_mask"])).any()
  cond = model(batch).audio_cond
  key = jax.random.key(int(rng.integers(1 << 30)))
  other = dict(batch, audio_target=np.where(voiced[..., None, None], batch["audio_target"],
                                            rng.uniform(-7, 2, batch["audio_target"].shape)
                                            ).astype(np.float32))
  for fn in (lambda b: audio_loss(model, cond, b, key),
             lambda b: sampled_audio_l1(model, cond, b, key, 2)):
    same = float(fn(batch)) == float(fn(other))
    assert same == gate, (gate, float(fn(batch)), float(fn(other)))
