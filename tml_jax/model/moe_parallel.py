"""Expert parallelism: the MoE expert FFN with experts sharded over the mesh axis 'expert'.

Inside `jax.shard_map`, each device
  1. sorts its local assignments by global expert id (so they are also sorted by the device
     that owns the expert: device d owns experts [d*El, (d+1)*El)),
  2. exchanges per-(device, expert) counts with one small all_to_all,
  3. sends every assignment's row to the device owning its expert (all_to_all),
  4. runs its El local experts on what it received with a grouped matmul,
  5. sends the results back the same way and combines them with the routing weights.
Nothing is dropped: this is the dropless 'grouped' MoE, distributed.

Two exchanges, identical in result:
  padded  `all_to_all` of fixed-size buffers: per destination one buffer of A rows (A =
          this device's assignments, the most it can send anywhere). Exact on every
          backend including CPU, but moves ep*A rows instead of A: for tests and CPU.
  ragged  `jax.lax.ragged_all_to_all`: moves only real rows, and lands them directly in
          expert-major order on the receiver (one slice per (destination, expert)), so
          no local re-sort. The receive buffer is sized for the worst case ep*A (all
          tokens of all peers choose this device), which keeps it dropless.
The default is ragged on GPU/TPU and padded on CPU (XLA:CPU has no ragged_all_to_all).

If the mesh has a 'tensor' axis > 1 the expert hidden dimension F is split over it
(Megatron style: gate/up column-split, down row-split, one psum of the combined output).

Shapes: T tokens (global; Tl per device), k experts per token, A = Tl*k local assignments,
D model width, F expert hidden, E experts, El = E/ep experts per device, ep = expert-axis
size, S = ep sources.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels_pallas.platform import target_platform, varying_axes
from tml_jax.model import router
from tml_jax.model.experts import grouped_swiglu

TOKEN_AXES = ("data", "fsdp", "expert")  # tml_jax.config.BATCH_AXES (config imports this module)
EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


def _active_mesh(mesh):
  if mesh is not None:
    return mesh
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def kernel_needs_shard_map(mesh=None) -> bool:
  """A multi-device mesh on GPU/TPU: the Pallas gmm there is a custom call that XLA cannot
  partition, so it must run per device inside a shard_map (on CPU it is XLA ops)."""
  mesh = _active_mesh(mesh)
  return mesh is not None and mesh.size > 1 and target_platform() != "cpu"


def expert_parallel_size(mesh=None) -> int:
  """Size of the 'expert' axis of `mesh` (default: the mesh set by jax.set_mesh), else 1."""
  mesh = _active_mesh(mesh)
  return 1 if mesh is None else dict(mesh.shape).get(EXPERT_AXIS, 1)


def expert_parallel_moe(x_TD, weights_Tk, ids_Tk, w_gate_EDF, w_up_EDF, w_down_EFD, *,
                        mesh=None, matmul: Callable | None = None,
                        exchange: str | None = None, token_chunks: int = 1):
  """Σ_j weights[t, j] · expert_{ids[t, j]}(x[t]) with experts sharded over 'expert'.

  x_TD, weights_Tk, ids_Tk: global arrays, tokens sharded over the mesh axes of
  ("data", "fsdp", "expert") that exist (T must divide evenly). Expert weights: global,
  sharded over 'expert' on E (and over 'tensor' on F when that axis is > 1; any other
  sharding is resharded by shard_map on entry). Returns y_TD sharded like x_TD.
  matmul: the local grouped matmul `(lhs[m, k], rhs[g, k, n], group_sizes[g]) -> [m, n]`;
  None: `experts.grouped_matmul` (the platform's gmm).
  exchange: 'ragged' | 'padded' | None (ragged on GPU/TPU, padded on CPU).
  token_chunks: each device dispatches its tokens in this many sequential chunks (a
  rematerialised loop), so the exchange buffers, which are sized for the worst case (every
  peer's tokens choosing this device: ep x the local assignments), shrink by that factor.
  Exact: routing is per token. Tokens are padded to a multiple of shards x chunks.
  """
  mesh = _active_mesh(mesh)
  if mesh is None:
    raise ValueError("expert_parallel_moe needs a mesh: pass mesh= or call it under "
                     "jax.set_mesh(mesh)")
  axes = dict(mesh.shape)
  if EXPERT_AXIS not in axes:
    raise ValueError(f"expert_parallel_moe: mesh axes {tuple(axes)} have no {EXPERT_AXIS!r}")
  ep = axes[EXPERT_AXIS]
  E, _, F = w_gate_EDF.shape
  T, k = ids_Tk.shape
  token_axes = tuple(a for a in TOKEN_AXES if a in axes)
  token_shards = 1
  for a in token_axes:
    token_shards *= axes[a]
  if E % ep:
    raise ValueError(f"expert parallelism: {E} experts over expert={ep} devices must divide "
                     "evenly. Fix: make model.num_experts a multiple of mesh.expert")
  token_chunks = max(1, min(int(token_chunks), T // token_shards or 1))
  pad = -T % (token_shards * token_chunks)
  if pad:
    # Fewer tokens than shards (one micro-turn's text slot on a slice): pad with tokens of
    # weight 0 routed to expert 0, computed and dropped, so any T works on any mesh.
    out = expert_parallel_moe(
        jnp.pad(x_TD, ((0, pad), (0, 0))), jnp.pad(weights_Tk, ((0, pad), (0, 0))),
        jnp.pad(ids_Tk, ((0, pad), (0, 0))), w_gate_EDF, w_up_EDF, w_down_EFD, mesh=mesh,
        matmul=matmul, exchange=exchange, token_chunks=token_chunks)
    return out[:T]
  tp = axes.get(TENSOR_AXIS, 1)
  tensor_axis = TENSOR_AXIS if tp > 1 and F % tp == 0 else None
  if exchange is None:
    exchange = "padded" if target_platform() == "cpu" else "ragged"
  if exchange not in ("ragged", "padded"):
    raise ValueError(f"exchange={exchange!r}: use 'ragged', 'padded' or None")

  tok = P(token_axes, None)
  w_in = P(EXPERT_AXIS, None, tensor_axis)
  w_out = P(EXPERT_AXIS, tensor_axis, None)
  experts = functools.partial(grouped_swiglu, matmul=matmul)
  local = functools.partial(_local_moe, num_experts=E, ep=ep, tensor_axis=tensor_axis,
                            experts=experts, exchange=exchange)
  if token_chunks > 1:
    local = functools.partial(_chunked, local, token_chunks)
  in_specs = (tok, tok, tok, w_in, w_in, w_out)
  args = (x_TD, weights_Tk, ids_Tk, w_gate_EDF, w_up_EDF, w_down_EFD)
  if jax.sharding.AxisType.Explicit in tuple(mesh.axis_types):
    # Under Explicit axes shard_map checks (not converts) input shardings: reshard first.
    to = ((lambda spec: jax.sharding.NamedSharding(mesh, spec))
          if isinstance(mesh, jax.sharding.Mesh) else (lambda spec: spec))
    args = tuple(jax.reshard(a, to(spec)) for a, spec in zip(args, in_specs))
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=tok)(*args)


def _chunked(local, n, x_TD, weights_Tk, ids_Tk, *weights):
  """`local` on n consecutive chunks of this device's tokens, one after another. Each chunk
  is rematerialised, so its backward pass keeps only that chunk's buffers alive."""
  split = lambda a: a.reshape(n, a.shape[0] // n, *a.shape[1:])
  one = jax.checkpoint(lambda xs: local(*xs, *weights),
                       policy=jax.checkpoint_policies.nothing_saveable)
  y = jax.lax.map(one, (split(x_TD), split(weights_Tk), split(ids_Tk)))
  return y.reshape(x_TD.shape[0], *y.shape[2:])


def _local_moe(x_TD, weights_Tk, ids_Tk, wg_EDF, wu_EDF, wd_EFD, *, num_experts, ep,
               tensor_axis, experts, exchange):
  E, k = num_experts, ids_Tk.shape[1]
  El = E // ep
  order_A, sizes_E, inverse_A = router.sort_by_expert(ids_Tk, E)
  x_AD = router.permute(x_TD, order_A, k)
  # recv_SE[s, e]: rows source s sends for my local expert e.
  recv_SE = jax.lax.all_to_all(sizes_E.reshape(ep, El), EXPERT_AXIS, 0, 0, tiled=True)
  local_experts = lambda rows, sizes: experts(rows, wg_EDF, wu_EDF, wd_EFD, sizes)
  swap = _swap_ragged if exchange == "ragged" else _swap_padded
  y_AD = swap(x_AD, sizes_E.reshape(ep, El), recv_SE, local_experts)
  y_TD = router.combine(y_AD, inverse_A, weights_Tk)
  if tensor_axis is not None:  # partial sums over the F shards
    y_TD = jax.lax.psum(y_TD, tensor_axis)
  return y_TD


def _exclusive_cumsum(x, axis):
  return jnp.cumsum(x, axis=axis) - x


def _swap_ragged(x_AD, send_DE, recv_SE, experts):
  """ragged_all_to_all there (landing expert-major), experts, ragged_all_to_all back."""
  ep, El = send_DE.shape
  A, D = x_AD.shape
  sizes_El = jnp.sum(recv_SE, axis=0)
  # Where (source s, my expert e) lands in my receive buffer: expert-major, sources in order.
  recv_off_SE = (_exclusive_cumsum(sizes_El, 0)[None, :] + _exclusive_cumsum(recv_SE, 0))
  send_off_DE = _exclusive_cumsum(send_DE.reshape(-1), 0).reshape(ep, El)
  # Senders need the receiver's offsets (and, on the way back, the other way round).
  remote_off_DE = jax.lax.all_to_all(recv_off_SE, EXPERT_AXIS, 0, 0, tiled=True)
  home_off_SE = jax.lax.all_to_all(send_off_DE, EXPERT_AXIS, 0, 0, tiled=True)
  flat = lambda a: a.reshape(-1).astype(jnp.int32)
  there = tuple(map(flat, (send_off_DE, send_DE, remote_off_DE, recv_SE)))
  back = tuple(map(flat, (recv_off_SE, recv_SE, home_off_SE, send_DE)))
  rows = _exchange(x_AD, there, back, ep * A, _varying(x_AD))
  y_rows = experts(rows, sizes_El)
  return _exchange(y_rows, back, there, A, _varying(y_rows))


def _varying(a) -> tuple:
  return tuple(sorted(varying_axes(a)))  # hashable and ordered: a nondiff argument


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _exchange(x, route, reverse, out_rows, axes):
  """ragged_all_to_all of x's rows along `route` (input offsets, send sizes, output offsets,
  receive sizes) into a zero buffer of `out_rows` typed as varying over `axes` (x's);
  its gradient is the same exchange along `reverse`.

  Found by the plan of tml_small: with the buffer mesh-invariant, the backward pass held
  a psum of the receive buffer's cotangent over data and fsdp per layer and chunk (17.6
  GiB per device for 3 layers), i.e. the rows' gradients summed across shards of different
  tokens. XLA:CPU has no ragged_all_to_all, so tests run this with an emulation that types
  its result correctly by construction; the typing here does not depend on it."""
  del reverse
  buf = jnp.zeros((out_rows, x.shape[1]), x.dtype)
  if axes:
    # The result is typed like the output buffer: a mesh-invariant zero buffer would type
    # the received rows as equal on every data/fsdp shard, and autodiff would then sum
    # their cotangents over those shards (wrong gradients, and a psum of the whole buffer).
    buf = jax.lax.pcast(buf, axes, to="varying")
  return jax.lax.ragged_all_to_all(x, buf, *route, axis_name=EXPERT_AXIS)


def _exchange_fwd(x, route, reverse, out_rows, axes):
  return _exchange(x, route, reverse, out_rows, axes), (route, reverse, x.shape[0])


def _exchange_bwd(out_rows, axes, residuals, ct):
  route, reverse, in_rows = residuals
  del out_rows
  dx = _exchange(ct, reverse, route, in_rows, axes)
  missing = tuple(a for a in axes if a not in _varying(dx))
  if missing:  # the cotangent must be typed like x (varying over the same mesh axes)
    dx = jax.lax.pcast(dx, missing, to="varying")
  zeros = lambda t: tuple(None for _ in t)
  return dx, zeros(route), zeros(reverse)


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def _swap_padded(x_AD, send_DE, recv_SE, experts):
  """all_to_all of [ep, A, D] buffers (A rows per destination: capacity-free, exact)."""
  ep, El = send_DE.shape
  A, D = x_AD.shape
  j = jnp.arange(A, dtype=jnp.int32)
  count_D = jnp.sum(send_DE, axis=1)
  off_D = _exclusive_cumsum(count_D, 0)
  valid_DA = j[None, :] < count_D[:, None]
  src_DA = jnp.minimum(off_D[:, None] + j[None, :], A - 1)
  buf = jnp.where(valid_DA[..., None], jnp.take(x_AD, src_DA, axis=0), 0)
  recv_SAD = jax.lax.all_to_all(buf, EXPERT_AXIS, 0, 0, tiled=True)
  # Each source's rows arrive sorted by expert; a stable sort by local expert id makes
  # them expert-major (sources in order inside an expert), padding (id El) last.
  expert_SA = jax.vmap(lambda ends: jnp.searchsorted(ends, j, side="right"))(
      jnp.cumsum(recv_SE, axis=1))
  order = jnp.argsort(expert_SA.reshape(-1), stable=True)
  rows = jnp.take(recv_SAD.reshape(ep * A, D), order, axis=0)
  y_rows = experts(rows, jnp.sum(recv_SE, axis=0))
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  back_DAD = jax.lax.all_to_all(jnp.take(y_rows, inverse, axis=0).reshape(ep, A, D),
                                EXPERT_AXIS, 0, 0, tiled=True)
  dest_A = jnp.searchsorted(jnp.cumsum(count_D), j, side="right")
  return back_DAD[dest_A, j - off_D[dest_A]]
