"""Tensor parallelism over attention heads on jax.sharding (Megatron-style, as vLLM).

A 1-D mesh with axis "tp" of k devices. What each device holds:

* q / k / v projections: the columns of its heads; gate / up: 1/k of the SwiGLU columns.
  o and down projections: the matching rows, so each device's partial output is summed
  by one all-reduce (`psum`) per attention block and one per MLP block.
* Embedding, norms and the LM head: replicated. The step samples on replicated logits
  anyway (every process must see every sampled token), and sharding the LM head by vocab
  would add an all-gather of the logits to save `vocab * dim` weights per device: a good
  trade for 128k-vocab checkpoints on GPUs, not for the models this runs on CPU. Say so
  when that changes.
* The KV pool `[L, Hkv, N, bs, D]` (and its scales `[L, Hkv, N, bs]`): sharded on the kv
  heads, so every device holds 1/k of every block and block ids stay global: the
  host-side manager, scheduler, COW, swap and prefix caching are unchanged. With more
  devices than kv heads (k > Hkv, k a multiple of Hkv), each kv head is replicated k / Hkv
  times, as vLLM does: the k / v projections' columns are repeated before sharding, so
  the pool has k kv heads, one per device, and device r's query heads read the copy of
  their own kv head.

The step wraps the model's packed forward in `jax.shard_map` over this mesh (attention,
the xla path or the Pallas kernels, runs on each device's heads alone: no collective
touches the pool); sampling runs on the replicated logits after it.

Multi-host: the same code under `jax.distributed.initialize`; every process runs the same
deterministic scheduler on the same requests (JAX's multi-controller model: every process
issues the same programs in the same order; the sampled tokens are replicated, so each
process reads them from its own devices and makes the same decisions), no plan is
broadcast. See `initialize_distributed` and the README.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "tp"
# The KV pool and its scales: kv heads on axis 1, the rest whole on every device.
KV_SPEC = P(None, AXIS)

# Parameter path (joined by ".") -> spec; anything else is replicated.
_COLUMN = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(kernel|bias)$")
_ROW = re.compile(r"\.(o_proj|down_proj)\.kernel$")
_KV = re.compile(r"\.(k_proj|v_proj)\.(kernel|bias)$")


def check_tensor_parallel_size(tp: int, *, num_heads: int, num_kv_heads: int, hidden_dim: int,
                               num_devices: int) -> None:
  """ValueErrors naming the field when `tp` cannot shard this model on these devices."""
  if isinstance(tp, bool) or not isinstance(tp, int):
    raise TypeError(f"tensor_parallel_size must be an int, got {tp!r}")
  if tp < 1:
    raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
  if tp > num_devices:
    raise ValueError(f"tensor_parallel_size={tp} exceeds the {num_devices} devices available")
  if num_heads % tp:
    raise ValueError(f"tensor_parallel_size={tp} must divide num_heads={num_heads}")
  if num_kv_heads % tp and tp % num_kv_heads:
    raise ValueError(f"tensor_parallel_size={tp} must divide num_kv_heads={num_kv_heads} or be a "
                     f"multiple of it (kv heads are then replicated)")
  if hidden_dim % tp:
    raise ValueError(f"tensor_parallel_size={tp} must divide the MLP width "
                     f"hidden_dim={hidden_dim}")


def make_mesh(tp: int, devices=None) -> Mesh:
  """A 1-D mesh ("tp",) of the first `tp` devices (of `devices`, default all)."""
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) < tp:
    raise ValueError(f"tensor_parallel_size={tp} exceeds the {len(devices)} devices given")
  return Mesh(np.array(devices[:tp]), (AXIS,))


def kv_heads_stored(num_kv_heads: int, tp: int) -> int:
  """kv heads in the pool: the model's, or tp when each is replicated (tp > Hkv)."""
  return max(num_kv_heads, tp)


def kv_heads_per_device(num_kv_heads: int, tp: int) -> int:
  """kv heads each device holds of every block."""
  return kv_heads_stored(num_kv_heads, tp) // tp


def _path(path) -> str:
  """".layers.0.attn.q_proj.kernel" from a pytree key path (nnx's trailing "value" dropped)."""
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
  names = [n for n in names if n]
  if names and names[-1] == "value":
    names.pop()
  return "." + ".".join(names)


def param_spec(path: str, ndim: int) -> P:
  """The spec of one parameter, by its path (`count_params`' tree, see model.py's layout)."""
  if _COLUMN.search(path):
    return P(AXIS) if ndim == 1 else P(None, AXIS)
  if _ROW.search(path):
    return P(AXIS, None)
  return P()


def param_specs(params):
  """Specs for an nnx parameter state (works on arrays, tracers and shape structs)."""
  return jax.tree.map_with_path(lambda path, x: param_spec(_path(path), np.ndim(x)), params)


def replicate_kv_heads(params, *, num_kv_heads: int, head_dim: int, tp: int):
  """k / v projection columns repeated head by head to `kv_heads_stored` heads (no-op
  when tp <= num_kv_heads): kv head h becomes heads h * r .. h * r + r - 1, r = tp / Hkv."""
  reps = kv_heads_stored(num_kv_heads, tp) // num_kv_heads
  if reps == 1:
    return params

  def expand(path, x):
    if not _KV.search(_path(path)):
      return x
    lead = x.shape[:-1]
    heads = np.asarray(x).reshape(*lead, num_kv_heads, head_dim)
    return np.repeat(heads, reps, axis=-2).reshape(*lead, num_kv_heads * reps * head_dim)

  return jax.tree.map_with_path(expand, params)


def put_global(tree, mesh: Mesh, specs):
  """Places host values (the same on every process) onto the mesh with `specs`: each
  device receives only its slice (`make_array_from_callback` also works when the mesh
  spans processes)."""
  def put(x, spec):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])

  return jax.tree.map(put, tree, specs)


def zeros(shape, dtype, sharding) -> jax.Array:
  """A zero array created in place with `sharding` (each device allocates its shard)."""
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def per_device_nbytes(tree) -> int:
  """Bytes one device holds of a tree of arrays, from each array's shard shape: metadata
  only, so it is safe beside a step that donates the arrays (e.g. the server's metrics
  thread), unlike `addressable_shards`, which makes new views of the buffers."""
  total = 0
  for x in jax.tree.leaves(tree):
    if isinstance(x, jax.Array):
      total += int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
    else:
      total += np.asarray(x).nbytes
  return total


_COLLECTIVE = re.compile(
  r"=\s*(?P<shape>\(?[a-z0-9]+\[[^=]*?\]\S*\)?)\s+(?P<op>all-reduce|all-gather|all-to-all|"
  r"reduce-scatter|collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Collective ops of a compiled (per-device) HLO module: {op: {"count", "bytes"}}, bytes
  being the size of each op's result on one device (what it moves, up to the algorithm's
  constant factor)."""
  out: dict[str, dict[str, int]] = {}
  for m in _COLLECTIVE.finditer(hlo_text):
    nbytes = 0
    for dtype, dims in _ARRAY.findall(m.group("shape")):
      size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      nbytes += size * _BYTES.get(dtype, 4)
    entry = out.setdefault(m.group("op"), {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += nbytes
  return out


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int) -> None:
  """`jax.distributed.initialize` for one process of a multi-host engine; on CPU it selects
  the gloo collectives first (the CPU backend has none by default). Call it before any
  other JAX call, in every process, with the same coordinator (e.g. "127.0.0.1:12345" for
  processes on one machine)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU client only
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
