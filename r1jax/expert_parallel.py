"""Expert parallelism: the routed experts inside `shard_map`, the one place collectives live.

Dims: T tokens (global), T_l = T / (batch shards) local tokens, n = expert-axis size,
E experts, E_l = E / n local experts, K top-k, m model dim.

The MoE layer hands routing and the routed experts to `route_and_run` here. Without a mesh in
context (`jax.set_mesh`), or on a 1-device mesh, that is the local dispatch path as is. On a
mesh, each shard routes its own tokens (the per-expert counts for the balancing bias are then
summed over all batch shards with psum: the whole batch's counts, never one shard's). On a mesh, tokens are split over the batch axes (data, fsdp, expert) and
routed experts over `expert`, and each shard exchanges tokens with its expert-axis peers:

  all_gather (runs everywhere, CPU included):
    x_n = all_gather(x_l over expert)                        [n T_l, m]
    y_n = local experts on the pairs routed to them; every other pair gets the drop id E_l
    y_l = psum_scatter(y_n over expert)                      [T_l, m]
  Traffic per device and step: 2 (n - 1) T_l m values, against ~2 K T_l m for an all-to-all
  exchange; compute: only the rows of local experts reach the grouped matmuls.

  ragged_all_to_all (TPU v4+ and GPU: `lax.ragged_all_to_all` has no CPU lowering):
    sort local pairs by expert, send each expert shard exactly its rows, compute, send back.
    See `_ragged_exchange`.

Gradients flow through the collectives (all_gather <-> psum_scatter are each other's transpose).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

import pallas_kernels
from r1jax.config import EXPERT_EXCHANGES
from r1jax.layers.experts import routed_experts as local_routed_experts

BATCH_AXES = ("data", "fsdp", "expert")
EXCHANGES = EXPERT_EXCHANGES


def context_mesh():
  """The mesh set with `jax.set_mesh`, or None when there is none or it has one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  return mesh


def _batch_axes(mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def resolve_exchange(exchange: str) -> str:
  """ "auto" is the all_gather path everywhere until ragged_all_to_all has been checked on a GPU."""
  if exchange not in EXCHANGES:
    raise ValueError(f"expert_exchange: {exchange!r}; allowed values are {', '.join(EXCHANGES)}")
  return "all_gather" if exchange == "auto" else exchange


def _check_mesh(mesh, tokens: int, num_experts: int, capacity_factor) -> tuple[tuple, int]:
  """(batch axes, expert-axis size) of the mesh, with its constraints checked."""
  if capacity_factor is not None:
    raise ValueError("capacity_factor: not supported on a sharded mesh; use None (dropless)")
  batch = _batch_axes(mesh)
  shards = math.prod(mesh.shape[a] for a in batch)
  if tokens % shards:
    raise ValueError(f"batch: {tokens} tokens do not split over the {shards} batch shards")
  n = mesh.shape["expert"] if "expert" in mesh.axis_names else 1
  if num_experts % n:
    raise ValueError(f"--mesh: expert={n} does not divide n_routed_experts={num_experts}")
  return batch, n


def route_and_run(
  x: jax.Array,
  logits: jax.Array,
  bias: jax.Array | None,
  wi: jax.Array,
  wo: jax.Array,
  *,
  route: Callable,
  impl: str = "auto",
  capacity_factor: float | None = None,
  exchange: str = "auto",
  cpu_kernel: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Routes the tokens and runs their routed experts, sharded over the context mesh if any.

  Routing runs inside the shard_map too, on each shard's own tokens: a Pallas kernel cannot be
  partitioned by XLA, and the per-expert counts are then summed over every batch shard
  explicitly (psum), so the balancing bias sees the whole batch.

  Args:
    x: [T, D] tokens; logits: [T, E] router logits; bias: [E] correction bias or None.
    wi: [E, D, 2F]; wo: [E, F, D].
    route: (logits, bias) -> (weights [T, K], experts [T, K] int32, counts [E] int32).
    impl: dispatch-op implementation.
    capacity_factor: None (dropless); a capacity works only without a mesh.
    exchange: "auto" | "all_gather" | "ragged_all_to_all".
    cpu_kernel: without a mesh, decode sizes on XLA:CPU run the C++ kernel
      (`r1jax.layers.experts.routed_experts`); the sharded paths keep XLA's ops.

  Returns:
    out [T, D] in x.dtype, experts [T, K] and counts [E] (over the whole batch).
  """
  mesh = context_mesh()
  if mesh is None:
    weights, experts, counts = route(logits, bias)
    out = local_routed_experts(
      x, weights, experts, wi, wo, impl=impl, capacity_factor=capacity_factor, cpu_kernel=cpu_kernel
    )
    return out, experts, counts
  batch, n = _check_mesh(mesh, x.shape[0], wi.shape[0], capacity_factor)
  local = (
    _ragged_exchange if resolve_exchange(exchange) == "ragged_all_to_all" else _gather_exchange
  )

  def body(x, logits, bias, wi, wo):
    weights, experts, counts = route(logits, bias)
    if batch:
      counts = lax.psum(counts, batch)
    return local(x, weights, experts, wi, wo, impl=impl, n=n), experts, counts

  tokens = P(batch or None)
  expert_axis = P("expert") if n > 1 else P()
  bias_spec = None if bias is None else P()
  return jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(tokens, tokens, bias_spec, expert_axis, expert_axis),
    out_specs=(tokens, tokens, P()),
    check_vma=False,
  )(x, logits, bias, wi, wo)


def routed_experts(
  x: jax.Array,
  weights: jax.Array,
  experts: jax.Array,
  wi: jax.Array,
  wo: jax.Array,
  *,
  impl: str = "auto",
  capacity_factor: float | None = None,
  exchange: str = "auto",
) -> jax.Array:
  """`r1jax.layers.experts.routed_experts` (routing already done), sharded over the context mesh.

  Args and result as `route_and_run`, with weights, experts [T, K] given.
  """
  mesh = context_mesh()
  if mesh is None:
    return local_routed_experts(
      x, weights, experts, wi, wo, impl=impl, capacity_factor=capacity_factor
    )
  batch, n = _check_mesh(mesh, x.shape[0], wi.shape[0], capacity_factor)
  local = (
    _ragged_exchange if resolve_exchange(exchange) == "ragged_all_to_all" else _gather_exchange
  )
  tokens = P(batch or None)
  expert_axis = P("expert") if n > 1 else P()
  return jax.shard_map(
    lambda *a: local(*a, impl=impl, n=n),
    mesh=mesh,
    in_specs=(tokens, tokens, tokens, expert_axis, expert_axis),
    out_specs=tokens,
    check_vma=False,
  )(x, weights, experts, wi, wo)


def _local_ids(experts, weights, e_local: int, shard):
  """Global expert ids -> ids of this shard's experts; other shards' pairs get id E_l, weight 0."""
  lo = shard * e_local
  mine = (experts >= lo) & (experts < lo + e_local)
  return jnp.where(mine, experts - lo, e_local), jnp.where(mine, weights, 0)


def _gather_exchange(x, weights, experts, wi, wo, *, impl: str, n: int):
  """All-gather the expert group's tokens, run the local experts, reduce-scatter the outputs."""
  if n == 1:
    return local_routed_experts(x, weights, experts, wi, wo, impl=impl)
  shard = lax.axis_index("expert")
  x_n, w_n, e_n = (lax.all_gather(a, "expert", tiled=True) for a in (x, weights, experts))
  ids, w_n = _local_ids(e_n, w_n, wi.shape[0], shard)
  y_n = local_routed_experts(x_n, w_n, ids, wi, wo, impl=impl, drop_id=True)
  return lax.psum_scatter(y_n, "expert", scatter_dimension=0, tiled=True)


def _exclusive_cumsum(a):
  return jnp.cumsum(a) - a


def _ragged_exchange(x, weights, experts, wi, wo, *, impl: str, n: int):
  """Send each expert shard exactly the rows routed to it with `lax.ragged_all_to_all`.

  1. Sort the T_l*K local pairs by global expert: contiguous runs per destination shard.
  2. Exchange the per-expert counts (all_to_all of [n, E_l]) so every receiver knows how many
     rows each source sends to each of its experts, and where each source's rows land.
  3. ragged_all_to_all the rows into a buffer of n*T_l*K rows (the most one shard can receive:
     dropless), run the local experts over it (rows sorted by local expert, padding rows get
     the drop id), and send the outputs back the same way; unpermute and combine locally.
  """
  if n == 1:
    return local_routed_experts(x, weights, experts, wi, wo, impl=impl)
  t, k = experts.shape
  e_local = wi.shape[0]
  x_sorted, group_sizes, perm = pallas_kernels.permute(x, experts, n * e_local, impl=impl)
  send_counts = group_sizes.reshape(n, e_local)  # [destination, its local expert]
  recv_counts = lax.all_to_all(send_counts, "expert", 0, 0, tiled=True)  # [source, local expert]
  send_sizes, recv_sizes = send_counts.sum(axis=1), recv_counts.sum(axis=1)
  input_offsets = _exclusive_cumsum(send_sizes)
  recv_offsets = _exclusive_cumsum(recv_sizes)  # where each source's rows land here
  # ... which each source needs as its output_offsets for this destination.
  output_offsets = lax.all_to_all(recv_offsets, "expert", 0, 0, tiled=True)
  capacity = n * t * k
  buffer = jnp.zeros((capacity, x.shape[1]), x.dtype)
  received = lax.ragged_all_to_all(
    x_sorted, buffer, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name="expert"
  )
  # Local expert id of every received row (source-major, expert-minor runs); padding: E_l.
  row = jnp.arange(capacity, dtype=jnp.int32)
  run_ends = jnp.cumsum(recv_counts.reshape(-1))
  run = jnp.searchsorted(run_ends, row, side="right")
  ids = jnp.where(run < n * e_local, run % e_local, e_local).astype(jnp.int32)
  y = local_routed_experts(
    received, jnp.ones((capacity, 1), jnp.float32), ids[:, None], wi, wo, impl=impl, drop_id=True
  )
  back = lax.ragged_all_to_all(
    y,
    jnp.zeros_like(x_sorted),
    recv_offsets,
    recv_sizes,
    lax.all_to_all(input_offsets, "expert", 0, 0, tiled=True),
    send_sizes,
    axis_name="expert",
  )
  return pallas_kernels.unpermute(back, perm, weights, impl=impl)
