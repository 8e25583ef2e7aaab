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

What it trusts: nothing. Every file it opens must resolve (symlinks followed) inside the
checkpoint directory, or inside the `blobs` folder of a Hugging Face cache snapshot
(`<repo>/snapshots/<rev>/` whose files link to `<repo>/blobs/`); a `weight_map` entry
may not be absolute or escape with `..`; a symlink loop is refused. Config values are
type and range checked (an int is an int, not a bool or a float; floats are finite),
weights must be finite, and only JSON and safetensors are parsed (no pickle). Without
a `tokenizer.json` the checkpoint loads with a `TokenIdTokenizer`: token-id prompts only.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Self

import ml_dtypes  # noqa: F401  (registers numpy's bfloat16, which safetensors returns)
import numpy as np
import safetensors
import tokenizers

from pagedjax.runner.model import Llama3RopeScaling, ModelConfig
from pagedjax.weights.tokenizer import TokenIdTokenizer

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
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
_DTYPES = ("float32", "bfloat16", "float16")
_TENSOR_DTYPES = ("F32", "BF16", "F16")
# Stored by some exporters, recomputed here.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Elements per np.isfinite pass: bounds the temporary mask, not the tensor size.
_FINITE_CHUNK = 1 << 24


def _roots(directory: str | os.PathLike) -> tuple[str, ...]:
  """Real paths a checkpoint's files may resolve into: the directory itself, and the
  `blobs` folder of a Hugging Face cache repo when the directory is one of its snapshots."""
  root = os.path.realpath(directory)
  snapshots = os.path.dirname(root)
  blobs = os.path.join(os.path.dirname(snapshots), "blobs")
  if os.path.basename(snapshots) == "snapshots" and os.path.isdir(blobs):
    return root, os.path.realpath(blobs)
  return (root,)


def resolve(
  directory: str | os.PathLike, name: str, *, required: bool = True, label: str | None = None
) -> str | None:
  """The real path of the regular file `directory/name`, checked to lie in the checkpoint.

  Args:
    directory: the checkpoint directory.
    name: a path relative to it.
    required: whether a missing file is an error (else None is returned).
    label: how errors other than a symlink loop name the file (default its path).

  Raises:
    ValueError: the file is missing (and `required`), is a symlink loop, is not a regular
      file, or resolves outside `directory` (see `_roots`).
  """
  path = os.path.join(directory, name)
  label = label or path
  try:
    os.stat(path)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise ValueError(f"{path}: symlink loop") from e
    if e.errno not in (errno.ENOENT, errno.ENOTDIR):
      raise ValueError(f"{label}: cannot access ({e})") from e
    if required or os.path.lexists(path):  # a dangling symlink is a broken download
      dangling = " (a dangling symlink)" if os.path.lexists(path) else ""
      raise ValueError(f"{label} not found{dangling}") from e
    return None
  real = os.path.realpath(path)  # no loop: stat succeeded
  roots = _roots(directory)
  if not any(os.path.commonpath([root, real]) == root for root in roots):
    raise ValueError(f"{label} resolves to {real}, outside the checkpoint directory {roots[0]}")
  if not os.path.isfile(real):
    raise ValueError(f"{label} is not a regular file")
  return real


def read_json(directory: str | os.PathLike, name: str, *, required: bool = True) -> dict | None:
  """Parses `directory/name` (see `resolve`); None if it is absent and not `required`.

  Raises:
    ValueError: the file is required and missing, lies outside `directory`, is not
      UTF-8 JSON, or is not a JSON object.
  """
  path = os.path.join(directory, name)
  real = resolve(directory, name, required=required)
  if real is None:
    return None
  try:
    with open(real, "rb") as f:
      doc = json.loads(f.read().decode("utf-8"))
  except (OSError, ValueError, RecursionError) as e:  # incl. UnicodeDecodeError, JSONDecodeError
    raise ValueError(f"{path}: cannot read JSON ({e})") from e
  if not isinstance(doc, dict):  # a bad file, not a bad argument: ValueError
    raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")  # noqa: TRY004
  return doc


# ------------------------------------------------------------------ config values
# Each raises ValueError "<file>: <key> must be ..., got <value>" and returns the value.
def check_int(file: str, key: str, value, *, none_ok: bool = False) -> int | None:
  """A positive int (not a bool, not a float such as 32.0); None too if `none_ok`."""
  if value is None and none_ok:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    null = " or null" if none_ok else ""
    raise ValueError(f"{file}: {key} must be a positive int{null}, got {value!r}")
  return value


def check_float(file: str, key: str, value) -> float:
  """A finite positive number (an int is accepted; a bool or a string is not)."""
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not number or not 0 < value <= sys.float_info.max:  # not math.isfinite: ints overflow it
    raise ValueError(f"{file}: {key} must be a finite positive number, got {value!r}")
  return float(value)


def check_bool(file: str, key: str, value) -> bool:
  """true or false (not 0 / 1, not "false")."""
  if not isinstance(value, bool):
    raise ValueError(f"{file}: {key} must be true or false, got {value!r}")
  return value


def token_id(file: str, key: str, value, vocab_size: int) -> int | None:
  """None or one id in [0, vocab_size)."""
  if value is not None and (
    isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size
  ):
    raise ValueError(
      f"{file}: {key} must be a token id in [0, {vocab_size}) or null, got {value!r}"
    )
  return value


def token_ids(file: str, key: str, value, vocab_size: int) -> tuple[int, ...]:
  """None (no ids), one id or a list of ids, each in [0, vocab_size)."""
  values = [] if value is None else value if isinstance(value, list) else [value]
  for v in values:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab_size:
      raise ValueError(
        f"{file}: {key} must be a token id in [0, {vocab_size}) or a list of them, got {value!r}"
      )
  return tuple(values)


def _get(doc: dict, key: str, default):
  """doc[key], or `default` when it is absent or null (HF writes nulls for defaults)."""
  value = doc.get(key)
  return default if value is None else value


def _required(doc: dict, key: str):
  if doc.get(key) is None:
    raise ValueError(f"{CONFIG_FILE}: missing required key {key!r}")
  return doc[key]


def _rope(doc: dict) -> tuple[float, Llama3RopeScaling | None]:
  """rope_theta and llama3 scaling from either config style."""
  f = CONFIG_FILE
  # The newer style holds rope_theta too; an empty rope_parameters defers to the older one.
  key = "rope_parameters" if doc.get("rope_parameters") not in (None, {}) else "rope_scaling"
  params = _get(doc, key, {})
  if not isinstance(params, dict):
    raise ValueError(f"{f}: {key} must be an object or null, got {params!r}")
  if params.get("rope_theta") is not None:
    theta = check_float(f, f"{key}.rope_theta", params["rope_theta"])
  else:
    theta = check_float(f, "rope_theta", _get(doc, "rope_theta", 10000.0))
  rope_type = _get(params, "rope_type", _get(params, "type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise ValueError(
      f"{f}: {key}.rope_type {rope_type!r} is not supported (only 'default', 'llama3')"
    )
  names = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [n for n in names if params.get(n) is None]
  if missing:
    raise ValueError(f"{f}: {key} of type 'llama3' is missing {missing}")
  factor, low, high = (check_float(f, f"{key}.{n}", params[n]) for n in names[:3])
  original = check_int(f, f"{key}.{names[3]}", params[names[3]])
  if high <= low:
    raise ValueError(
      f"{f}: {key}.high_freq_factor must be greater than low_freq_factor, got {high} <= {low}"
    )
  return theta, Llama3RopeScaling(factor, low, high, original_max_len=original)


def config_from_hf(doc: dict, *, max_seq_len: int | None = None) -> ModelConfig:
  """Maps a Hugging Face config.json document onto a `ModelConfig`.

  Args:
    doc: the parsed config.json.
    max_seq_len: context length; default min(max_position_embeddings,
      DEFAULT_MAX_SEQ_LEN). Larger than max_position_embeddings is an error.

  Returns:
    The config (compute dtype float32; the engine's `dtype` picks bfloat16).

  Raises:
    ValueError: naming the unsupported, missing or ill-typed config key (and its value).
    TypeError: `max_seq_len` is not an int.
  """
  f = CONFIG_FILE
  archs = doc.get("architectures")
  if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ValueError(
      f"{f}: architectures {archs!r} not supported; expected a list of one of {ARCHITECTURES}"
    )
  arch = archs[0]
  # Qwen2's q/k/v biases are fixed by the architecture; attention_bias elsewhere adds an
  # o_proj bias too, which the model does not have.
  bias = {key: check_bool(f, key, _get(doc, key, False)) for key in ("attention_bias", "mlp_bias")}
  unsupported = {
    "quantization_config": doc.get("quantization_config") is not None,
    "hidden_act": _get(doc, "hidden_act", "silu") != "silu",
    **bias,
    "partial_rotary_factor": check_float(f, "partial_rotary_factor",
                                         _get(doc, "partial_rotary_factor", 1.0)) != 1.0,
  }  # fmt: skip
  for key, bad in unsupported.items():
    if bad:
      raise ValueError(f"{f}: {key}={doc[key]!r} is not supported")
  for key in ("dtype", "torch_dtype"):  # newer / older name; tensors are converted anyway
    if doc.get(key) is not None and doc[key] not in _DTYPES:
      raise ValueError(f"{f}: {key}={doc[key]!r} is not supported; expected {_DTYPES}")

  vocab_size = check_int(f, "vocab_size", _required(doc, "vocab_size"))
  dim = check_int(f, "hidden_size", _required(doc, "hidden_size"))
  num_layers = check_int(f, "num_hidden_layers", _required(doc, "num_hidden_layers"))
  hidden_dim = check_int(f, "intermediate_size", _required(doc, "intermediate_size"))
  num_heads = check_int(f, "num_attention_heads", _required(doc, "num_attention_heads"))
  num_kv_heads = check_int(f, "num_key_value_heads", _get(doc, "num_key_value_heads", num_heads))
  if num_heads % num_kv_heads:
    raise ValueError(
      f"{f}: num_attention_heads={num_heads} is not divisible by "
      f"num_key_value_heads={num_kv_heads}"
    )
  head_dim = check_int(f, "head_dim", doc.get("head_dim"), none_ok=True)  # Mistral: may be null
  if head_dim is None:
    if dim % num_heads:
      raise ValueError(
        f"{f}: hidden_size={dim} is not divisible by num_attention_heads={num_heads} "
        "(and there is no head_dim)"
      )
    head_dim = dim // num_heads
  if head_dim % 2:
    raise ValueError(f"{f}: head_dim={head_dim} must be even (rotary embeddings rotate pairs)")
  max_pos = check_int(f, "max_position_embeddings", _required(doc, "max_position_embeddings"))
  if max_seq_len is None:
    max_seq_len = min(max_pos, DEFAULT_MAX_SEQ_LEN)
  elif isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int):
    raise TypeError(f"max_seq_len must be an int or None, got {max_seq_len!r}")
  elif not 1 <= max_seq_len <= max_pos:
    raise ValueError(f"max_seq_len={max_seq_len} outside [1, max_position_embeddings={max_pos}]")
  window = check_int(f, "sliding_window", doc.get("sliding_window"), none_ok=True)
  use_window = check_bool(f, "use_sliding_window", _get(doc, "use_sliding_window", False))
  layer_types = _get(doc, "layer_types", [])
  if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
    raise ValueError(f"{f}: layer_types must be a list of strings, got {layer_types!r}")
  uses_window = (  # Mistral always; Qwen when switched on, in either config style
    arch == "MistralForCausalLM" or use_window or "sliding_attention" in layer_types
  )
  if uses_window and window is not None and window < max_seq_len:
    raise ValueError(
      f"{f}: sliding_window={window} < max_seq_len={max_seq_len}: sliding-window "
      f"attention is not supported; load with max_seq_len <= {window}"
    )
  # Read by the tokenizers, checked here so that a bad config.json fails whichever loads.
  token_id(f, "bos_token_id", doc.get("bos_token_id"), vocab_size)
  token_ids(f, "eos_token_id", doc.get("eos_token_id"), vocab_size)
  theta, scaling = _rope(doc)
  return ModelConfig(
    vocab_size=vocab_size,
    dim=dim,
    num_layers=num_layers,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    hidden_dim=hidden_dim,
    max_seq_len=max_seq_len,
    rope_theta=theta,
    rope_scaling=scaling,
    norm_eps=check_float(f, "rms_norm_eps", _get(doc, "rms_norm_eps", 1e-6)),
    tie_embeddings=check_bool(f, "tie_word_embeddings", _get(doc, "tie_word_embeddings", False)),
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

  Opening checks that every file lies in the checkpoint directory (`resolve`; an index
  entry may not be absolute), that every needed tensor exists with its expected shape and
  dtype and that no unknown tensor is present (e.g. a bias the model would silently drop);
  each `[key]` then reads one tensor (memory-mapped file), refuses it if any value is not
  finite, and returns it in the project's layout, in its stored dtype.
  """

  def __init__(self, directory: str | os.PathLike, cfg: ModelConfig):
    self._map = tensor_map(cfg)
    self._files = {}  # display path (directory/entry) -> open safetensors file
    single = resolve(directory, WEIGHTS_FILE, required=False)
    index = None if single else read_json(directory, INDEX_FILE, required=False)
    if single is not None:
      path = os.path.join(directory, WEIGHTS_FILE)
      self._files[path] = _open(path, single)
      where = {name: path for name in self._files[path].keys()}  # noqa: SIM118 (not a dict)
    elif index is not None:
      where = self._open_shards(directory, index)
    else:
      raise ValueError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {os.fspath(directory)!r}")
    used = {hf_name for hf_name, _, _ in self._map.values()}
    if cfg.tie_embeddings:
      used.add("lm_head.weight")  # some exporters store the tied copy too
    unknown = sorted(n for n in where if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if unknown:
      raise ValueError(f"{where[unknown[0]]}: unexpected tensors {unknown[:8]}")
    self._where = where
    stored = {path: set(f.keys()) for path, f in self._files.items()}
    for hf_name, shape, _ in self._map.values():
      if hf_name not in where:
        raise ValueError(f"tensor {hf_name!r} not found in {os.fspath(directory)!r}")
      if hf_name not in stored[where[hf_name]]:
        raise ValueError(f"{where[hf_name]}: tensor {hf_name!r} (listed in {INDEX_FILE}) not found")
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

  def _open_shards(self, directory: str | os.PathLike, index: dict) -> dict[str, str]:
    """Opens the files of an index's weight_map; returns {tensor name: display path}."""
    index_path = os.path.join(directory, INDEX_FILE)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index_path}: missing 'weight_map' object")
    for name, entry in weight_map.items():
      label = f"{index_path}: weight_map entry {entry!r} (tensor {name!r})"
      if not isinstance(entry, str) or not entry:
        raise ValueError(f"{label} is not a file name")
      if os.path.isabs(entry):
        raise ValueError(f"{label} is an absolute path; entries are relative to the checkpoint")
    for entry in sorted(set(weight_map.values())):
      path = os.path.join(directory, entry)
      real = resolve(directory, entry, label=f"{index_path}: weight_map entry {entry!r}")
      self._files[path] = _open(path, real)
    return {name: os.path.join(directory, entry) for name, entry in weight_map.items()}

  def __getitem__(self, key: str) -> np.ndarray:
    hf_name, _, transpose = self._map[key]
    where = self._where[hf_name]
    array = self._files[where].get_tensor(hf_name)
    check_finite(array, f"{where}: tensor {hf_name!r}")
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


def _open(path: str, real: str):
  """safetensors.safe_open of `real` (resolved), errors naming `path`."""
  try:
    return safetensors.safe_open(real, framework="numpy")
  except Exception as e:  # SafetensorError is not exported under a stable name
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def check_finite(array: np.ndarray, label: str) -> None:
  """Raises ValueError "<label> has N non-finite values, the first ... at index ..."."""
  flat = array.reshape(-1)
  for start in range(0, flat.size, _FINITE_CHUNK):
    if np.isfinite(flat[start : start + _FINITE_CHUNK]).all():
      continue
    bad = np.flatnonzero(~np.isfinite(flat))
    at = tuple(int(i) for i in np.unravel_index(bad[0], array.shape))
    raise ValueError(
      f"{label} has {bad.size} non-finite value{'s' if bad.size > 1 else ''}, "
      f"the first {float(flat[bad[0]])} at index {at}"
    )


def _token_content(file: str, key: str, value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {"content": string}."""
  content = value.get("content") if isinstance(value, dict) else value
  if content is not None and not isinstance(content, str):
    raise ValueError(
      f"{file}: {key} must be a token string, an object with a 'content' string, or null, "
      f"got {value!r}"
    )
  return content


def _config_ids(directory, vocab_size: int) -> tuple[int | None, tuple[int, ...]]:
  """(BOS id, EOS ids) from config.json and generation_config.json (validated): EOS is
  generation_config.json's eos_token_id, else config.json's; () when neither has one."""
  config = read_json(directory, CONFIG_FILE)
  gen_config = read_json(directory, GENERATION_CONFIG_FILE, required=False) or {}
  bos_id = token_id(CONFIG_FILE, "bos_token_id", config.get("bos_token_id"), vocab_size)
  eos = token_ids(CONFIG_FILE, "eos_token_id", config.get("eos_token_id"), vocab_size)
  gen_eos = token_ids(
    GENERATION_CONFIG_FILE, "eos_token_id", gen_config.get("eos_token_id"), vocab_size
  )
  return bos_id, gen_eos or eos


def token_id_tokenizer(
  directory: str | os.PathLike, cfg: ModelConfig, *, reason: str
) -> TokenIdTokenizer:
  """The tokenizer of a checkpoint loaded without its text tokenizer: token ids only.

  Reads config.json and generation_config.json (BOS / EOS ids), never tokenizer.json or
  tokenizer_config.json; valid ids are the model's [0, cfg.vocab_size).
  """
  bos_id, eos = _config_ids(directory, cfg.vocab_size)
  return TokenIdTokenizer(vocab_size=cfg.vocab_size, bos_id=bos_id, eos_token_ids=eos,
                          reason=reason)  # fmt: skip


def tokenizer_from_dir(
  directory: str | os.PathLike, cfg: ModelConfig, *, skip_tokenizer_init: bool = False
) -> HFTokenizer | TokenIdTokenizer:
  """An `HFTokenizer`, or a `TokenIdTokenizer` when asked to skip the tokenizer or when
  the checkpoint has no tokenizer.json (a present but broken one is an error)."""
  if skip_tokenizer_init:
    return token_id_tokenizer(directory, cfg, reason="loaded with skip_tokenizer_init=True")
  if resolve(directory, TOKENIZER_FILE, required=False) is None:
    reason = f"no {TOKENIZER_FILE} in {os.fspath(directory)!r}"
    return token_id_tokenizer(directory, cfg, reason=reason)
  return HFTokenizer.from_dir(directory, cfg)


def _chat_template(directory, tok_config: dict) -> str | None:
  """tokenizer_config.json's chat_template (a string, or a list of {"name", "template"}:
  the "default" one), else chat_template.jinja in the checkpoint, else None."""
  t = tok_config.get("chat_template")
  if isinstance(t, list):
    named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
    t = named.get("default")
  if t is not None and not isinstance(t, str):
    raise ValueError(f"{TOKENIZER_CONFIG_FILE}: chat_template must be a string or a list of "
                     f"{{name, template}}, got {type(t).__name__}")
  if t is None:
    real = resolve(directory, CHAT_TEMPLATE_FILE, required=False)
    if real is not None:
      try:
        with open(real, "rb") as f:
          t = f.read().decode("utf-8")
      except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{os.path.join(directory, CHAT_TEMPLATE_FILE)}: cannot read ({e})") from e
  return t or None


class HFTokenizer:
  """A `tokenizers.Tokenizer` behind the engine's tokenizer interface (see checkpoint.py).

  Args:
    tokenizer: the tokenizer built from tokenizer.json.
    vocab_size: valid ids are [0, vocab_size).
    bos_id: the BOS id, or None if the model has none.
    add_bos: whether `encode` prepends BOS by default (as the HF tokenizer does).
    eos_token_ids: ids that end generation.
  """

  has_text = True  # encodes and decodes text (a TokenIdTokenizer does not)

  def __init__(
    self,
    tokenizer: tokenizers.Tokenizer,
    *,
    vocab_size: int,
    bos_id: int | None,
    add_bos: bool,
    eos_token_ids: tuple[int, ...],
    chat_template: str | None = None,
  ):
    self.tokenizer = tokenizer
    self.vocab_size = vocab_size
    self.bos_id = bos_id
    self.add_bos = add_bos and bos_id is not None
    self.eos_token_ids = eos_token_ids
    self.chat_template = chat_template  # Jinja2 source, rendered by entrypoints/openai/chat.py
    self.bos_token = None if bos_id is None else tokenizer.id_to_token(bos_id)
    self.eos_token = tokenizer.id_to_token(eos_token_ids[0]) if eos_token_ids else None

  @classmethod
  def from_dir(cls, directory: str | os.PathLike, cfg: ModelConfig) -> HFTokenizer:
    """Reads tokenizer.json, tokenizer_config.json and the EOS ids of a checkpoint.

    BOS: tokenizer_config.json's bos_token (if absent, config.json's bos_token_id); it is
    prepended when tokenizer_config.json says add_bos_token, or, without that key, when
    tokenizer.json's post-processor adds it. EOS ids: generation_config.json's
    eos_token_id (int or list), else config.json's, else tokenizer_config.json's eos_token.

    Raises:
      ValueError: tokenizer.json missing or unreadable, a file outside the checkpoint, a
        bad value (named with its file and key), or ids beyond the model's vocab.
    """
    path = os.path.join(directory, TOKENIZER_FILE)
    real = resolve(directory, TOKENIZER_FILE)
    try:
      tok = tokenizers.Tokenizer.from_file(real)
    except Exception as e:  # tokenizers raises plain Exception
      raise ValueError(f"{path}: cannot load tokenizer ({e})") from e
    vocab = tok.get_vocab(with_added_tokens=True)
    if not vocab:
      raise ValueError(f"{path}: the tokenizer has no tokens")
    vocab_size = max(vocab.values()) + 1
    if vocab_size > cfg.vocab_size:
      raise ValueError(
        f"{path}: {vocab_size} tokens exceed the model's vocab_size {cfg.vocab_size}"
      )
    config_bos, eos = _config_ids(directory, cfg.vocab_size)
    tok_config = read_json(directory, TOKENIZER_CONFIG_FILE, required=False) or {}

    special = {  # tokenizer_config.json's bos_token / eos_token, checked whether used or not
      key: _token_content(TOKENIZER_CONFIG_FILE, key, tok_config.get(key))
      for key in ("bos_token", "eos_token")
    }

    def special_id(key: str) -> int | None:
      if special[key] is None:
        return None
      if tok.token_to_id(special[key]) is None:
        raise ValueError(
          f"{TOKENIZER_CONFIG_FILE}: {key} {special[key]!r} is not a token of {TOKENIZER_FILE}"
        )
      return tok.token_to_id(special[key])

    # null bos_token there means no BOS, whatever config.json says
    bos_id = special_id("bos_token") if "bos_token" in tok_config else config_bos
    if "add_bos_token" in tok_config:
      add_bos = check_bool(TOKENIZER_CONFIG_FILE, "add_bos_token", tok_config["add_bos_token"])
    else:
      probe = tok.encode("a", add_special_tokens=True).ids
      add_bos = bool(probe) and probe[0] == bos_id
    if not eos and special["eos_token"] is not None:
      eos = (special_id("eos_token"),)
    return cls(tok, vocab_size=vocab_size, bos_id=bos_id, add_bos=add_bos, eos_token_ids=eos,
               chat_template=_chat_template(directory, tok_config))

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
