"""The MoE impls ('capacity' without drops, 'grouped') equal an explicit loop over experts.

Outputs and gradients w.r.t. x and every parameter, on skewed routing with one expert that
receives no token. 'grouped' runs the platform's grouped matmul (on CPU gmm's XLA tile
scan); 'grouped-interpret' swaps in the Triton kernel under the Pallas interpreter, so the
real kernel runs inside the model; 'grouped-ragged_dot' swaps in XLA's lax.ragged_dot.
Also: the deprecated impl names, and the routing primitives' round trip (sort_by_expert,
permute, combine).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels_pallas import gmm as gmm_lib
from tml_jax.model import experts as experts_lib
from tml_jax.model import router
from tml_jax.model.moe import MoE, MoEConfig, resolve_impl

D, F, E, K = 16, 24, 6, 2
B, L = 2, 20
DEAD = 5  # the expert that receives no token


def _model(impl, seed=0):
  # capacity_factor=E makes the capacity L*k: nothing can be dropped.
  cfg = MoEConfig(d_model=D, hidden=F, num_experts=E, top_k=K, impl=impl,
                  capacity_factor=float(E))
  model = MoE(cfg, rngs=nnx.Rngs(seed))
  # Feature 0 of x is made >= 1 below: it pushes every token towards expert 0, away from DEAD.
  model.router[...] = model.router[...].at[0, 0].add(1.0).at[0, DEAD].add(-20.0)
  return model


def _inputs(seed):
  kx, kc = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (B, L, D))
  x = x.at[..., 0].set(jnp.abs(x[..., 0]) + 1.0)
  return x, jax.random.normal(kc, (B, L, D))


def dense_loop_moe(model, x_BLD):
  """Σ_j w_j · expert_{id_j}(x), one expert at a time over all tokens."""
  _, weights_BLk, ids_BLk, _ = model.route(x_BLD)
  wg, wu, wd = model.expert_weights()
  y = jnp.zeros_like(x_BLD)
  for e in range(E):
    gate_BL = jnp.sum(jnp.where(ids_BLk == e, weights_BLk, 0.0), axis=-1)
    h = jax.nn.silu(x_BLD @ wg[e]) * (x_BLD @ wu[e])
    y = y + gate_BL[..., None] * (h @ wd[e])
  return y


def _interpret_gmm(lhs, rhs, group_sizes):
  return gmm_lib.gmm(lhs, rhs, group_sizes, interpret=True, backend="triton",
                     block_sizes=gmm_lib.BlockSizes(block_m=16, block_k=16, block_n=16))


def _ragged_dot_gmm(lhs, rhs, group_sizes):
  return gmm_lib.gmm(lhs, rhs, group_sizes, backend="ragged_dot")


SWAPPED_MATMULS = {"grouped-interpret": _interpret_gmm, "grouped-ragged_dot": _ragged_dot_gmm}


def _value_and_grads(impl, x, cot, monkeypatch):
  if impl in SWAPPED_MATMULS:
    monkeypatch.setattr(experts_lib, "grouped_matmul", SWAPPED_MATMULS[impl])
  model = _model("capacity" if impl == "capacity" else "grouped")
  graphdef, params = nnx.split(model)

  def loss(params, x):
    m = nnx.merge(graphdef, params)
    y = dense_loop_moe(m, x) if impl == "loop" else m(x, jnp.ones((B, L), bool))[0]
    return jnp.sum(y * cot), y

  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return y, grads, model


@pytest.fixture(scope="module")
def reference():
  x, cot = _inputs(seed=7)
  y, grads, model = _value_and_grads("loop", x, cot, None)
  ids = np.asarray(model.route(x)[2]).reshape(-1)
  counts = np.bincount(ids, minlength=E)
  assert counts[DEAD] == 0 and counts.max() > 2 * np.sort(counts)[1], counts  # skewed
  return x, cot, y, grads


@pytest.mark.parametrize("impl", ["capacity", "grouped", "grouped-interpret",
                                  "grouped-ragged_dot"])
def test_impl_matches_dense_loop(impl, reference, monkeypatch):
  x, cot, y_ref, (dparams_ref, dx_ref) = reference
  y, (dparams, dx), _ = _value_and_grads(impl, x, cot, monkeypatch)
  scale = float(jnp.max(jnp.abs(y_ref)))
  np.testing.assert_allclose(y, y_ref, atol=2e-5 * scale, rtol=0)
  np.testing.assert_allclose(dx, dx_ref, atol=2e-5, rtol=1e-4)
  flat = jax.tree_util.tree_leaves_with_path(dparams)
  for (path, g), g_ref in zip(flat, jax.tree_util.tree_leaves(dparams_ref)):
    np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=1e-4,
                               err_msg=f"{impl} d{jax.tree_util.keystr(path)}")
  # The dead expert's weights get exactly zero gradient: no row reached it.
  for name in ("w_gate", "w_up", "w_down"):
    assert not np.any(np.asarray(dparams[name][...])[DEAD]), (impl, name)


def test_grouped_equals_ragged_dot_bfloat16(monkeypatch):
  x, _ = _inputs(seed=3)
  cfg = MoEConfig(d_model=D, hidden=F, num_experts=E, top_k=K, impl="grouped",
                  dtype="bfloat16", param_dtype="bfloat16")
  run = lambda: MoE(cfg, rngs=nnx.Rngs(1))(x, jnp.ones((B, L), bool))[0]
  out = run()
  monkeypatch.setattr(experts_lib, "grouped_matmul", _ragged_dot_gmm)
  want = run()
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                             atol=3e-2, rtol=3e-2)


def test_deprecated_impl_names_resolve():
  for old, new in (("einsum", "capacity"), ("ragged", "grouped"), ("ragged_dot", "grouped"),
                   ("pallas", "grouped"), ("capacity", "capacity"), ("grouped", "grouped")):
    assert resolve_impl(old) == new
    assert MoEConfig(D, F, num_experts=E, top_k=K, impl=old).impl == new
  with pytest.raises(ValueError, match="'magic'.*Fix: use 'capacity'"):
    MoEConfig(D, F, num_experts=E, top_k=K, impl="magic")


# ------------------------------------------------------------------------------ routing


def test_routing_round_trip_equals_dense():
  """sort_by_expert -> permute -> per-expert linear map -> combine == Σ_k w_k · W_{id_k} x."""
  T, k, n_exp, d = 37, 3, 5, 8
  kl, kx, kw = jax.random.split(jax.random.key(11), 3)
  logits = jax.random.normal(kl, (T, n_exp)).at[:, 4].add(-50.0)  # expert 4: no token
  x_TD = jax.random.normal(kx, (T, d))
  w_EDD = jax.random.normal(kw, (n_exp, d, d))
  weights_Tk, ids_Tk, probs_TE = router.top_k_routing(logits, k)
  np.testing.assert_allclose(jnp.sum(weights_Tk, -1), 1.0, rtol=1e-6)
  order_A, sizes_E, inverse_A = router.sort_by_expert(ids_Tk, n_exp)
  assert int(sizes_E[4]) == 0 and int(jnp.sum(sizes_E)) == T * k
  x_AD = router.permute(x_TD, order_A, k)
  # Sorted rows really are grouped by expert, tokens in order inside a group.
  sorted_ids = ids_Tk.reshape(-1)[order_A]
  assert np.all(np.diff(np.asarray(sorted_ids)) >= 0)
  np.testing.assert_array_equal(jnp.take(order_A, inverse_A), jnp.arange(T * k))
  y_AD = jax.lax.ragged_dot(x_AD, w_EDD, sizes_E)
  y_TD = router.combine(y_AD, inverse_A, weights_Tk)
  dense = jnp.einsum("td,tkde,tk->te", x_TD, w_EDD[ids_Tk], weights_Tk)
  np.testing.assert_allclose(y_TD, dense, atol=1e-5, rtol=1e-5)
