"""Hugging Face Llama-family checkpoints from a local directory: config, weights, tokenizer.

What it reads: `config.json` (LlamaForCausalLM incl. rope_scaling "llama3",
MistralForCausalLM, Qwen2ForCausalLM with q/k/v biases, Qwen3ForCausalLM with per-head
q/k RMSNorm; both the older top-level rope_theta / rope_scaling / torch_dtype style and
the newer rope_parameters / dtype style), `model.safetensors` or sharded
`model-0000x-of-0000y.safetensors` with `model.safetensors.index.json` (float32,
bfloat16 or float16 tensors), `tokenizer.json` (the `tokenizers` library),
`tokenizer_config.json` (BOS) and `generation_config.json` (EOS ids) when present.

Weights map onto the project's tree (pagedjax.runner.model's docstring) with linear weights
transposed from HF's [out, in] to [in, out]; `HFWeights` reads them lazily, one tensor at
a time, so a checkpoint is never held twice in host memory.

What it does not do: reach the network (no hub, nothing is downloaded), import torch, or
run what the model does not implement: sliding-window attention shorter than the context,
biases on o_proj / the MLP, activations other than SiLU, rope types other than llama3,
quantized weights. Those, and every missing file, key or tensor, raise ValueError naming
the file, the key or the tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Self

import ml_dtypes  # noqa: F401  (registers numpy's bfloat16, which safetensors returns)
import numpy as np
import safetensors
import tokenizers

from pagedjax.runner.model import Llama3RopeScaling, ModelConfig

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Default context when a checkpoint allows more (Llama 3.1: 131072): the engine reserves a
# block table of max_seq_len / block_size per sequence and recomputes a preempted
# sequence in one prefill, so an unbounded default would cost memory nobody asked for.
DEFAULT_MAX_SEQ_LEN = 4096
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
_DTYPES = ("float32", "bfloat16", "float16")
_TENSOR_DTYPES = ("F32", "BF16", "F16")
# Stored by some exporters, recomputed here.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def read_json(directory: str | os.PathLike, name: str, *, required: bool = True) -> dict | None:
  """Parses `directory/name`; None if it is absent and not `required`.

  Raises:
    ValueError: the file is required and missing, or is not a JSON object.
  """
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    if required:
      raise ValueError(f"{path} not found")
    return None
  try:
    with open(path) as f:
      doc = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read JSON ({e})") from e
  if not isinstance(doc, dict):  # a bad file, not a bad argument: ValueError
    raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")  # noqa: TRY004
  return doc


def _required(doc: dict, key: str) -> int:
  if doc.get(key) is None:
    raise ValueError(f"{CONFIG_FILE}: missing required key {key!r}")
  return doc[key]


def _rope(doc: dict) -> tuple[float, Llama3RopeScaling | None]:
  """rope_theta and llama3 scaling from either config style."""
  params = doc.get("rope_parameters") or {}  # newer style holds rope_theta too
  key = "rope_parameters" if params else "rope_scaling"
  params = params or doc.get("rope_scaling") or {}
  theta = float(params.get("rope_theta", doc.get("rope_theta", 10000.0)))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise ValueError(
      f"{CONFIG_FILE}: {key}.rope_type {rope_type!r} is not supported (only 'default', 'llama3')"
    )
  names = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [n for n in names if params.get(n) is None]
  if missing:
    raise ValueError(f"{CONFIG_FILE}: {key} of type 'llama3' is missing {missing}")
  values = [params[n] for n in names]
  return theta, Llama3RopeScaling(*map(float, values[:3]), original_max_len=int(values[3]))


def config_from_hf(doc: dict, *, max_seq_len: int | None = None) -> ModelConfig:
  """Maps a Hugging Face config.json document onto a `ModelConfig`.

  Args:
    doc: the parsed config.json.
    max_seq_len: context length; default min(max_position_embeddings,
      DEFAULT_MAX_SEQ_LEN). Larger than max_position_embeddings is an error.

  Returns:
    The config (compute dtype float32; the engine's `dtype` picks bfloat16).

  Raises:
    ValueError: naming the unsupported or missing config key.
  """
  archs = doc.get("architectures") or []
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ValueError(
      f"{CONFIG_FILE}: architectures {archs} not supported; expected one of {ARCHITECTURES}"
    )
  arch = archs[0]
  unsupported = {
    "quantization_config": doc.get("quantization_config") is not None,
    "hidden_act": doc.get("hidden_act", "silu") != "silu",
    # Qwen2's q/k/v biases are fixed by the architecture; attention_bias elsewhere adds
    # an o_proj bias too, which the model does not have.
    "attention_bias": bool(doc.get("attention_bias", False)),
    "mlp_bias": bool(doc.get("mlp_bias", False)),
    "partial_rotary_factor": doc.get("partial_rotary_factor", 1.0) != 1.0,
  }
  for key, bad in unsupported.items():
    if bad:
      raise ValueError(f"{CONFIG_FILE}: {key}={doc[key]!r} is not supported")
  for key in ("dtype", "torch_dtype"):  # newer / older name; tensors are converted anyway
    if doc.get(key) is not None and doc[key] not in _DTYPES:
      raise ValueError(f"{CONFIG_FILE}: {key}={doc[key]!r} is not supported; expected {_DTYPES}")

  num_heads = _required(doc, "num_attention_heads")
  dim = _required(doc, "hidden_size")
  head_dim = doc.get("head_dim") or dim // num_heads  # Mistral may write head_dim: null
  if not doc.get("head_dim") and dim % num_heads:
    raise ValueError(f"{CONFIG_FILE}: hidden_size {dim} not divisible by num_attention_heads")
  max_pos = _required(doc, "max_position_embeddings")
  if max_seq_len is None:
    max_seq_len = min(max_pos, DEFAULT_MAX_SEQ_LEN)
  elif not 1 <= max_seq_len <= max_pos:
    raise ValueError(f"max_seq_len={max_seq_len} outside [1, max_position_embeddings={max_pos}]")
  window = doc.get("sliding_window")
  uses_window = (  # Mistral always; Qwen when switched on, in either config style
    arch == "MistralForCausalLM"
    or doc.get("use_sliding_window", False)
    or "sliding_attention" in (doc.get("layer_types") or [])
  )
  if uses_window and window is not None and window < max_seq_len:
    raise ValueError(
      f"{CONFIG_FILE}: sliding_window={window} < max_seq_len={max_seq_len}: sliding-window "
      f"attention is not supported; load with max_seq_len <= {window}"
    )
  theta, scaling = _rope(doc)
  return ModelConfig(
    vocab_size=_required(doc, "vocab_size"),
    dim=dim,
    num_layers=_required(doc, "num_hidden_layers"),
    num_heads=num_heads,
    num_kv_heads=doc.get("num_key_value_heads") or num_heads,
    head_dim=head_dim,
    hidden_dim=_required(doc, "intermediate_size"),
    max_seq_len=max_seq_len,
    rope_theta=theta,
    rope_scaling=scaling,
    norm_eps=float(doc.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(doc.get("tie_word_embeddings", False)),
    qkv_bias=arch == "Qwen2ForCausalLM",
    qk_norm=arch == "Qwen3ForCausalLM",
  )


def tensor_map(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], bool]]:
  """Project key -> (HF tensor name, HF shape, transpose) for every parameter of `cfg`."""
  d, dim, f, v = cfg.head_dim, cfg.dim, cfg.hidden_dim, cfg.vocab_size
  q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
  out = {
    "embed.embedding": ("model.embed_tokens.weight", (v, dim), False),
    "final_norm.scale": ("model.norm.weight", (dim,), False),
  }
  if not cfg.tie_embeddings:
    out["lm_head.kernel"] = ("lm_head.weight", (v, dim), True)
  for i in range(cfg.num_layers):
    ours, theirs = f"layers.{i}", f"model.layers.{i}"
    linears = {  # ours -> (theirs, HF [out, in])
      "attn.q_proj": ("self_attn.q_proj", (q, dim)),
      "attn.k_proj": ("self_attn.k_proj", (kv, dim)),
      "attn.v_proj": ("self_attn.v_proj", (kv, dim)),
      "attn.o_proj": ("self_attn.o_proj", (dim, q)),
      "mlp.gate_proj": ("mlp.gate_proj", (f, dim)),
      "mlp.up_proj": ("mlp.up_proj", (f, dim)),
      "mlp.down_proj": ("mlp.down_proj", (dim, f)),
    }
    for name, (hf_name, shape) in linears.items():
      out[f"{ours}.{name}.kernel"] = (f"{theirs}.{hf_name}.weight", shape, True)
    out[f"{ours}.attn_norm.scale"] = (f"{theirs}.input_layernorm.weight", (dim,), False)
    out[f"{ours}.mlp_norm.scale"] = (f"{theirs}.post_attention_layernorm.weight", (dim,), False)
    if cfg.qkv_bias:
      for name, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        out[f"{ours}.attn.{name}.bias"] = (f"{theirs}.self_attn.{name}.bias", (size,), False)
    if cfg.qk_norm:
      for name in ("q_norm", "k_norm"):
        out[f"{ours}.attn.{name}.scale"] = (f"{theirs}.self_attn.{name}.weight", (d,), False)
  return out


class HFWeights(Mapping):
  """Lazy {project key: array} view of a directory's safetensors files; a context manager.

  Opening checks that every needed tensor exists with its expected shape and dtype and
  that no unknown tensor is present (e.g. a bias the model would silently drop); each
  `[key]` then reads one tensor (memory-mapped file) and returns it in the project's
  layout, in its stored dtype.
  """

  def __init__(self, directory: str | os.PathLike, cfg: ModelConfig):
    self._map = tensor_map(cfg)
    single = os.path.join(directory, WEIGHTS_FILE)
    index = None if os.path.isfile(single) else read_json(directory, INDEX_FILE, required=False)
    if index is None and os.path.isfile(single):
      self._files = {single: _open(single)}
      where = {name: single for name in self._files[single].keys()}  # noqa: SIM118 (not a dict)
    elif index is not None:
      weight_map = index.get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{os.path.join(directory, INDEX_FILE)}: missing 'weight_map'")
      paths = {os.path.join(directory, name) for name in weight_map.values()}
      self._files = {p: _open(p) for p in sorted(paths)}
      where = {name: os.path.join(directory, file) for name, file in weight_map.items()}
    else:
      raise ValueError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {os.fspath(directory)!r}")
    used = {hf_name for hf_name, _, _ in self._map.values()}
    if cfg.tie_embeddings:
      used.add("lm_head.weight")  # some exporters store the tied copy too
    unknown = sorted(n for n in where if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if unknown:
      raise ValueError(f"{where[unknown[0]]}: unexpected tensors {unknown[:8]}")
    self._where = where
    for hf_name, shape, _ in self._map.values():
      if hf_name not in where:
        raise ValueError(f"tensor {hf_name!r} not found in {os.fspath(directory)!r}")
      info = self._files[where[hf_name]].get_slice(hf_name)
      if tuple(info.get_shape()) != shape:
        raise ValueError(
          f"{where[hf_name]}: tensor {hf_name!r} has shape {tuple(info.get_shape())}, "
          f"expected {shape}"
        )
      if info.get_dtype() not in _TENSOR_DTYPES:
        raise ValueError(
          f"{where[hf_name]}: tensor {hf_name!r} has dtype {info.get_dtype()}, "
          f"expected one of {_TENSOR_DTYPES}"
        )

  def __getitem__(self, key: str) -> np.ndarray:
    hf_name, _, transpose = self._map[key]
    array = self._files[self._where[hf_name]].get_tensor(hf_name)
    return array.T if transpose else array  # HF [out, in] -> [in, out]

  def __iter__(self) -> Iterator[str]:
    return iter(self._map)

  def __len__(self) -> int:
    return len(self._map)

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc) -> None:
    for f in self._files.values():
      f.__exit__(None, None, None)
    self._files = {}


def _open(path: str):
  if not os.path.isfile(path):
    raise ValueError(f"{path} not found")
  try:
    return safetensors.safe_open(path, framework="numpy")
  except Exception as e:  # SafetensorError is not exported under a stable name
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def _ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def _token_content(value) -> str | None:
  return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
  """A `tokenizers.Tokenizer` behind the engine's tokenizer interface (see checkpoint.py).

  Args:
    tokenizer: the tokenizer built from tokenizer.json.
    vocab_size: valid ids are [0, vocab_size).
    bos_id: the BOS id, or None if the model has none.
    add_bos: whether `encode` prepends BOS by default (as the HF tokenizer does).
    eos_token_ids: ids that end generation.
  """

  def __init__(
    self,
    tokenizer: tokenizers.Tokenizer,
    *,
    vocab_size: int,
    bos_id: int | None,
    add_bos: bool,
    eos_token_ids: tuple[int, ...],
  ):
    self.tokenizer = tokenizer
    self.vocab_size = vocab_size
    self.bos_id = bos_id
    self.add_bos = add_bos and bos_id is not None
    self.eos_token_ids = eos_token_ids

  @classmethod
  def from_dir(cls, directory: str | os.PathLike, cfg: ModelConfig) -> HFTokenizer:
    """Reads tokenizer.json, tokenizer_config.json and the EOS ids of a checkpoint.

    BOS: tokenizer_config.json's bos_token (if absent, config.json's bos_token_id); it is
    prepended when tokenizer_config.json says add_bos_token, or, without that key, when
    tokenizer.json's post-processor adds it. EOS ids: generation_config.json's
    eos_token_id (int or list), else config.json's, else tokenizer_config.json's eos_token.

    Raises:
      ValueError: tokenizer.json missing or unreadable, or ids beyond the model's vocab.
    """
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
      raise ValueError(f"{path} not found")
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception
      raise ValueError(f"{path}: cannot load tokenizer ({e})") from e
    vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    if vocab_size > cfg.vocab_size:
      raise ValueError(
        f"{path}: {vocab_size} tokens exceed the model's vocab_size {cfg.vocab_size}"
      )
    config = read_json(directory, CONFIG_FILE)
    tok_config = read_json(directory, TOKENIZER_CONFIG_FILE, required=False) or {}
    gen_config = read_json(directory, GENERATION_CONFIG_FILE, required=False) or {}
    if "bos_token" in tok_config:  # null there means no BOS, whatever config.json says
      bos = _token_content(tok_config["bos_token"])
      bos_id = tok.token_to_id(bos) if bos is not None else None
    else:
      bos_id = config.get("bos_token_id")
    if "add_bos_token" in tok_config:
      add_bos = bool(tok_config["add_bos_token"])
    else:
      probe = tok.encode("a", add_special_tokens=True).ids
      add_bos = bool(probe) and probe[0] == bos_id
    eos = _ids(gen_config.get("eos_token_id")) or _ids(config.get("eos_token_id"))
    if not eos and _token_content(tok_config.get("eos_token")) is not None:
      eos = _ids(tok.token_to_id(_token_content(tok_config["eos_token"])))
    return cls(tok, vocab_size=vocab_size, bos_id=bos_id, add_bos=add_bos, eos_token_ids=eos)

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text`, with BOS prepended if `add_bos` (default: as the model expects)."""
    if not isinstance(text, str):
      raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    add = self.add_bos if add_bos is None else add_bos and self.bos_id is not None
    return ([self.bos_id] if add else []) + ids

  def decode(self, ids) -> str:
    """Text of `ids`, special tokens skipped."""
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
