"""A Llama-family decoder-only transformer in Flax NNX.

What it is: token embedding, RMSNorm (pre-norm), rotary position embeddings in the
Hugging Face Llama "rotate_half" layout (optionally with Llama 3.1's long-context
frequency rescaling), grouped-query attention, SwiGLU MLP and
optional tied input/output embeddings. Optional q/k/v biases (Qwen2) and per-head
q/k RMSNorm (Qwen3) are config flags so those checkpoints map onto the same tree.

What it does here: the dense no-cache forward (`Transformer.__call__`), the reference
that every cached/paged path must match, and the paged forward (`forward_packed`) that
the engine jits: one packed batch of decode tokens and prefill chunks, each layer writing
its new K/V into the paged cache before attending through the attention dispatch (xla |
pallas). `Attention.qkv` (projections + rope) and
`Attention.out` are separate methods so a paged forward reuses them unchanged and
differs only in where K/V live.

What it does not do: block allocation, sampling or batching (the engine's job), weight
files (pagedjax.weights.checkpoint, pagedjax.weights.hf), and no dropout (training here is small enough
not to need it).

Parameter layout (all float32; computation in `ModelConfig.dtype`):
  embed.embedding                 [V, dim]
  layers.{i}.attn_norm.scale      [dim]
  layers.{i}.attn.q_proj.kernel   [dim, H * D]      (+ .bias [H * D] if qkv_bias)
  layers.{i}.attn.k_proj.kernel   [dim, Hkv * D]    (+ .bias)
  layers.{i}.attn.v_proj.kernel   [dim, Hkv * D]    (+ .bias)
  layers.{i}.attn.q_norm.scale    [D]               (if qk_norm; k_norm likewise)
  layers.{i}.attn.o_proj.kernel   [H * D, dim]
  layers.{i}.mlp_norm.scale       [dim]
  layers.{i}.mlp.{gate,up}_proj.kernel [dim, F];  layers.{i}.mlp.down_proj.kernel [F, dim]
  final_norm.scale                [dim]
  lm_head.kernel                  [dim, V]          (absent if tie_embeddings)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pagedjax.runner import cpu_matmul
from pagedjax.runner import kv_cache as kvc
from pagedjax.runner.attention import ROW_IMPLS, AttentionMetadata, ragged_paged_attention
from pagedjax.runner.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama 3.1+ rope frequency rescaling (HF ``rope_scaling`` with rope_type "llama3").

  Wavelengths longer than original_max_len / low_freq_factor are stretched by `factor`,
  those shorter than original_max_len / high_freq_factor are kept, and the band between
  is interpolated smoothly.
  """

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_len: int

  def __post_init__(self):
    if self.factor <= 0 or self.original_max_len < 1:
      raise ValueError(f"rope scaling needs factor > 0 and original_max_len >= 1, got {self}")
    if not 0 < self.low_freq_factor < self.high_freq_factor:
      raise ValueError(f"rope scaling needs 0 < low_freq_factor < high_freq_factor, got {self}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of a `Transformer`; JSON-friendly via `to_dict`/`from_dict`."""

  # Rows of the embedding / columns of the logits. May exceed the tokenizer's
  # vocabulary (padded to a multiple of 64 for matmul speed); ids beyond the
  # tokenizer's vocabulary are never produced by it and must never be sampled.
  vocab_size: int = 320
  # Width of the residual stream.
  dim: int = 256
  num_layers: int = 4
  # Query heads; must be a multiple of num_kv_heads (grouped-query attention).
  num_heads: int = 8
  num_kv_heads: int = 4
  head_dim: int = 32
  # SwiGLU inner width.
  hidden_dim: int = 704
  # Longest context the model is meant for (positions 0..max_seq_len-1).
  max_seq_len: int = 512
  rope_theta: float = 10000.0
  # Llama 3.1+ long-context rescaling of the rope frequencies; None = plain theta^(-2i/D).
  rope_scaling: Llama3RopeScaling | None = None
  norm_eps: float = 1e-5
  # Output projection = transposed input embedding.
  tie_embeddings: bool = True
  # Biases on q/k/v projections (Qwen2-style).
  qkv_bias: bool = False
  # RMSNorm on each q/k head before rope (Qwen3-style).
  qk_norm: bool = False
  # Compute dtype ("float32" or "bfloat16"); parameters are always stored float32.
  dtype: str = "float32"

  def __post_init__(self):
    for name in (
      "vocab_size",
      "dim",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "hidden_dim",
      "max_seq_len",
    ):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    """Builds a config from `to_dict` output; unknown keys raise ValueError."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown ModelConfig keys: {sorted(unknown)}")
    if isinstance(d.get("rope_scaling"), dict):
      fields = {f.name for f in dataclasses.fields(Llama3RopeScaling)}
      if set(d["rope_scaling"]) != fields:
        raise ValueError(f"rope_scaling must have keys {sorted(fields)}, got {d['rope_scaling']}")
      d = {**d, "rope_scaling": Llama3RopeScaling(**d["rope_scaling"])}
    return cls(**d)


def _normal(std: float):
  return nnx.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


def rope_cos_sin(
  positions: jax.Array, head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None
) -> tuple[jax.Array, jax.Array]:
  """Rotary tables for integer `positions` [...]; returns cos, sin [..., head_dim] float32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [D/2]
  if scaling is not None:  # as HF's _compute_llama3_parameters
    s = scaling
    wavelen = 2 * math.pi / inv_freq
    stretched = jnp.where(
      wavelen > s.original_max_len / s.low_freq_factor, inv_freq / s.factor, inv_freq
    )
    smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * stretched / s.factor + smooth * stretched
    medium = (wavelen >= s.original_max_len / s.high_freq_factor) & (
      wavelen <= s.original_max_len / s.low_freq_factor
    )
    inv_freq = jnp.where(medium, smoothed, stretched)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [..., D] (HF duplicated halves)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """HF Llama rotation: x * cos + rotate_half(x) * sin. x [B, T, N, D]; cos/sin [B, T, D]."""
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention; `qkv` and `out` are shared by dense and paged forwards."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, std = cfg.compute_dtype, 0.02
    lin = lambda i, o, bias, s: nnx.Linear(
      i, o, use_bias=bias, dtype=dt, kernel_init=_normal(s), rngs=rngs,
      dot_general=cpu_matmul.dot_general,
    )
    self.q_proj = lin(cfg.dim, cfg.num_heads * cfg.head_dim, cfg.qkv_bias, std)
    self.k_proj = lin(cfg.dim, cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, std)
    self.v_proj = lin(cfg.dim, cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, std)
    # Residual-branch outputs scaled down with depth (GPT-2 init).
    self.o_proj = lin(
      cfg.num_heads * cfg.head_dim, cfg.dim, False, std / math.sqrt(2 * cfg.num_layers)
    )
    if cfg.qk_norm:
      self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
      self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

  @property
  def sm_scale(self) -> float:
    return 1.0 / math.sqrt(self.cfg.head_dim)

  def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projects and rotates. x [B, T, dim], positions int [B, T].

    Returns:
      q [B, T, H, D], k [B, T, Hkv, D] (both rotated), v [B, T, Hkv, D].
    """
    cfg = self.cfg
    b, t, _ = x.shape
    # Heads from the projections' widths: under tensor parallelism each device holds
    # its own heads' columns (pagedjax.runner.sharding).
    q = self.q_proj(x).reshape(b, t, -1, cfg.head_dim)  # [B, T, H, D]
    k = self.k_proj(x).reshape(b, t, -1, cfg.head_dim)  # [B, T, Hkv, D]
    v = self.v_proj(x).reshape(b, t, -1, cfg.head_dim)  # [B, T, Hkv, D]
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # [B, T, D]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def out(self, o: jax.Array) -> jax.Array:
    """Output projection: o [B, T, H, D] -> [B, T, dim]."""
    b, t = o.shape[:2]
    return self.o_proj(o.reshape(b, t, -1).astype(self.cfg.compute_dtype))

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Dense causal attention over the whole sequence: x [B, T, dim] -> [B, T, dim]."""
    q, k, v = self.qkv(x, positions)
    t, groups = q.shape[1], q.shape[2] // k.shape[2]
    # Each kv head serves `groups` consecutive query heads. Repeating K/V and using a
    # plain per-head einsum measured ~1.4x faster on CPU than a grouped 5-D einsum.
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)  # [B, S, H, D]
    s = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    s = s * self.sm_scale  # [B, H, T, S]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    s = jnp.where(causal, s, -jnp.inf)  # the diagonal is always kept: no row is all -inf
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhts,bshd->bthd", p, v.astype(jnp.float32))  # [B, T, H, D]
    return self.out(o)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = cfg.compute_dtype
    lin = lambda i, o, s: nnx.Linear(
      i, o, use_bias=False, dtype=dt, kernel_init=_normal(s), rngs=rngs,
      dot_general=cpu_matmul.dot_general,
    )
    self.gate_proj = lin(cfg.dim, cfg.hidden_dim, 0.02)
    self.up_proj = lin(cfg.dim, cfg.hidden_dim, 0.02)
    self.down_proj = lin(cfg.hidden_dim, cfg.dim, 0.02 / math.sqrt(2 * cfg.num_layers))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), positions)
    return x + self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
  """Decoder-only Llama-family language model."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(
      cfg.vocab_size, cfg.dim, dtype=cfg.compute_dtype, embedding_init=_normal(0.02), rngs=rngs
    )
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Linear(
        cfg.dim,
        cfg.vocab_size,
        use_bias=False,
        dtype=cfg.compute_dtype,
        kernel_init=_normal(0.02),
        rngs=rngs,
      )

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens int [B, T] -> [B, T, dim] in the compute dtype."""
    return self.embed(tokens).astype(self.cfg.compute_dtype)

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm + output projection: [B, T, dim] -> float32 [B, T, V]."""
    x = self.final_norm(x)
    out = self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
    return out.astype(jnp.float32)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Dense causal forward without a cache.

    Args:
      tokens: int [B, T] token ids in [0, vocab_size).
      positions: int [B, T] rope positions; defaults to 0..T-1 in every row.

    Returns:
      float32 logits [B, T, vocab_size]; row t depends only on tokens[:, :t+1].
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.embed_tokens(tokens)  # [B, T, dim]
    for layer in self.layers:
      x = layer(x, positions)
    return self.logits(x)

  def forward_packed(
    self,
    tokens: jax.Array,
    positions: jax.Array,
    kv: KVCache,
    *,
    slot_mapping: jax.Array,
    attn_meta: AttentionMetadata,
    logits_index: jax.Array,
    impl: str = "xla",
    tp_axis: str | None = None,
  ) -> tuple[jax.Array, KVCache]:
    """Paged forward of one packed batch: writes this step's K/V, attends, returns logits.

    The T tokens are decode tokens and prefill chunks of many sequences back to back
    (no per-sequence padding); `attn_meta` says which sequence each belongs to. Every
    layer writes the tokens' K/V into their slots before its attention reads the pages,
    so a chunk attends to itself causally. Padding tokens have slot -1 (nothing written)
    and their outputs are ignored.

    Args:
      tokens: int32 [T] token ids.
      positions: int32 [T] positions (rope).
      kv: the paged KV cache (all layers).
      slot_mapping: int32 [T] flat slot (block * block_size + offset); < 0 = padding.
      attn_meta: `attention.AttentionMetadata` for the impl.
      logits_index: int32 [R] token rows whose logits are returned.
      impl: attention implementation ("xla", "cpu", "pallas", "pallas_interpret").
      tp_axis: inside `shard_map` over a tensor-parallel mesh, its axis name: this
        device's parameters and pages are its heads' shards, and the o / down
        projections' partial outputs are summed over the axis (one all-reduce each).

    Returns:
      (logits float32 [R, V], the updated cache).
    """
    reduce = (lambda y: y) if tp_axis is None else (lambda y: jax.lax.psum(y, tp_axis))
    geometry = kvc.PoolGeometry.of(kv.k_pages)
    # The xla path works on the pool's row view from the first write to the last read
    # (see pagedjax.runner.attention); the Pallas kernels take the 5-D pages.
    rows = impl in ROW_IMPLS
    # Quantized pools carry per-token scales beside the pages, in the same view.
    if rows:
      pools = (kvc.to_rows(kv.k_pages), kvc.to_rows(kv.v_pages), kvc.scale_rows(kv.k_scales),
               kvc.scale_rows(kv.v_scales))
    else:
      pools = (kv.k_pages, kv.v_pages, kv.k_scales, kv.v_scales)
    x = self.embed_tokens(tokens[None])  # [1, T, dim]
    for i, layer in enumerate(self.layers):
      attn = layer.attn
      q, k, v = attn.qkv(layer.attn_norm(x), positions[None])  # [1, T, H|Hkv, D]
      k_pool, v_pool, k_sc, v_sc = pools
      if rows:
        pools = kvc.write_kv_rows(k_pool, v_pool, i, k[0], v[0], slot_mapping, geometry, k_sc,
                                  v_sc)
      else:
        pools = kvc.write_kv_layer(k_pool, v_pool, i, k[0], v[0], slot_mapping, k_sc, v_sc)
      k_pool, v_pool, k_sc, v_sc = pools
      o = ragged_paged_attention(q[0], k_pool, v_pool, attn_meta, layer=i,
                                 sm_scale=attn.sm_scale, impl=impl, geometry=geometry,
                                 k_scales=k_sc, v_scales=v_sc)
      x = x + reduce(attn.out(o[None]))
      x = x + reduce(layer.mlp(layer.mlp_norm(x)))
    logits = self.logits(x[:, logits_index])[0]  # [R, V]: only the rows that sample
    k_pool, v_pool, k_sc, v_sc = pools
    if rows:
      k_pool, v_pool = kvc.from_rows(k_pool, geometry), kvc.from_rows(v_pool, geometry)
      k_sc, v_sc = kvc.from_scale_rows(k_sc, geometry), kvc.from_scale_rows(v_sc, geometry)
    return logits, kv.replace(k_pages=k_pool, v_pages=v_pool, k_scales=k_sc, v_scales=v_sc)


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _dense_forward(
  graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, positions: jax.Array | None = None
) -> jax.Array:
  return nnx.merge(graphdef, state)(tokens, positions)


# Pure functional dense forward for jit: split the module once (nnx.split) and pass the
# static graphdef plus the state; this keeps NNX graph traversal out of every call and
# gives a much smaller HLO than jitting the bound module.
dense_forward = jax.jit(_dense_forward, static_argnums=0)


def greedy_generate_dense(
  model: Transformer,
  prompt: list[int],
  max_new_tokens: int,
  *,
  num_valid_tokens: int | None = None,
  stop_token_ids: tuple[int, ...] = (),
) -> list[int]:
  """Greedy decoding with the dense no-cache forward (the reference for cached decoding).

  Each step reruns the full forward on a fixed-length buffer (prompt + max_new_tokens,
  right-padded; causality makes the padding invisible), so one program is compiled
  per total length.

  Args:
    model: the transformer.
    prompt: non-empty list of token ids.
    max_new_tokens: number of tokens to generate (>= 1).
    num_valid_tokens: only ids < this are eligible (masks padded vocabulary rows);
      defaults to the model's vocab_size.
    stop_token_ids: generation stops after emitting one of these (it is included).

  Returns:
    The generated token ids (without the prompt).
  """
  total = len(prompt) + max_new_tokens
  if not prompt:
    raise ValueError("prompt must be non-empty")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if total > model.cfg.max_seq_len:
    raise ValueError(
      f"prompt length {len(prompt)} + max_new_tokens {max_new_tokens} "
      f"exceeds max_seq_len {model.cfg.max_seq_len}"
    )
  valid = model.cfg.vocab_size if num_valid_tokens is None else num_valid_tokens
  graphdef, state = nnx.split(model)
  buf = np.zeros((1, total), np.int32)
  buf[0, : len(prompt)] = prompt
  out = []
  for n in range(len(prompt), total):
    logits = dense_forward(graphdef, state, jnp.asarray(buf))  # [1, total, V]
    tok = int(jnp.argmax(logits[0, n - 1, :valid]))
    out.append(tok)
    buf[0, n] = tok
    if tok in stop_token_ids:
      break
  return out
