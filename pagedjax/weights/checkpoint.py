"""Model weight files: the project's own format, and loading any model for the engine.

The project's format is a directory with `model.safetensors` (flat parameter keys such
as ``layers.0.attn.q_proj.kernel``, kernels [in, out]; no pickle) and a `config.json`
whose "model" section is a `ModelConfig` (other sections hold metadata, e.g. training).
`load(path)` is what the engine calls: the bundled model (path None), a directory in
the project's format, or a Hugging Face checkpoint directory (pagedjax.weights.hf).

The tokenizer interface the engine relies on: `encode(text) -> list[int]` (BOS as the
model expects), `decode(ids) -> str` (special tokens skipped), `vocab_size` (valid
input ids are [0, vocab_size)), `eos_token_ids` (ids that end generation) and `has_text`
(False for a `TokenIdTokenizer`: token-id prompts only, `encode` raises, `decode` gives "").

Loading checks what it reads as pagedjax.weights.hf does: files must resolve inside the
model directory (`hf.resolve`), config values are type and range checked, weights must be
finite floats; anything else raises ValueError naming the file, key or tensor.

What it does not do: download anything, unpickle anything, or hold two full copies of a
model: tensors are read and converted one at a time.
"""

from __future__ import annotations

import dataclasses

import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from pagedjax.weights import hf
from pagedjax.runner.model import Llama3RopeScaling, ModelConfig, Transformer
from pagedjax.weights.tokenizer import ByteTokenizer, TokenIdTokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def flat_params(model: nnx.Module, dtype: str = "float32") -> dict[str, np.ndarray]:
  """Parameters as {"layers.0.attn.q_proj.kernel": array, ...}, cast to `dtype`."""
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {
    ".".join(str(k) for k in path): np.asarray(jnp.asarray(v[...], dtype)) for path, v in flat
  }


def save_model(
  path: str | os.PathLike,
  cfg: ModelConfig,
  model: Transformer,
  metadata: dict[str, Any] | None = None,
  *,
  dtype: str = "float32",
) -> None:
  """Writes `model.safetensors` (flat keys) and `config.json` into directory `path`.

  Args:
    path: output directory (created if missing).
    cfg: the model's config, stored under "model" in config.json.
    model: the transformer whose parameters are saved.
    metadata: extra JSON-serialisable sections (e.g. {"training": {...}}) for config.json.
    dtype: storage dtype of the tensors ("float32", "float16" or "bfloat16"); loading
      always upcasts to float32, so a float16 file halves the size at a small rounding cost.
  """
  os.makedirs(path, exist_ok=True)
  weights = os.path.join(path, WEIGHTS_FILE)
  safetensors.numpy.save_file(flat_params(model, dtype), weights)
  os.chmod(weights, 0o644)  # safetensors creates it 0600; package data must be world-readable
  doc = {"model": cfg.to_dict(), **(metadata or {})}
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(doc, f, indent=2, sort_keys=True)
    f.write("\n")


def model_from_arrays(cfg: ModelConfig, arrays: Mapping[str, np.ndarray]) -> Transformer:
  """Builds a `Transformer` from flat-keyed arrays (the layout in model.py's docstring).

  Each value is fetched once and converted to a float32 device array before the next
  one is fetched, so a lazy mapping (pagedjax.weights.hf) streams a checkpoint tensor by tensor.

  Raises:
    ValueError: on missing or unexpected keys, or a shape mismatch (named).
  """
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  keys = {".".join(str(k) for k in path) for path, _ in flat}
  if keys != set(arrays):
    raise ValueError(
      f"weight keys mismatch: missing {sorted(keys - set(arrays))}, "
      f"unexpected {sorted(set(arrays) - keys)}"
    )
  leaves = []
  for path, var in flat:
    key = ".".join(str(k) for k in path)
    value = arrays[key]
    if tuple(value.shape) != tuple(var.shape):
      raise ValueError(f"{key}: expected shape {tuple(var.shape)}, got {value.shape}")
    leaves.append((path, var.replace(jnp.asarray(value).astype(jnp.float32))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def load_model(path: str | os.PathLike) -> tuple[ModelConfig, Transformer, dict[str, Any]]:
  """Loads what `save_model` wrote.

  Returns:
    (config, model, the whole config.json document including metadata sections).

  Raises:
    ValueError: a file missing or outside `path`, a bad "model" value (named), a tensor
      that is not a float or not finite (named).
  """
  doc = hf.read_json(path, CONFIG_FILE)
  cfg = model_config(doc, os.path.join(path, CONFIG_FILE))
  weights = os.path.join(path, WEIGHTS_FILE)
  real = hf.resolve(path, WEIGHTS_FILE)
  try:
    arrays = safetensors.numpy.load_file(real)
  except Exception as e:  # SafetensorError is not exported under a stable name
    raise ValueError(f"{weights}: not a readable safetensors file ({e})") from e
  for key, array in arrays.items():
    if str(array.dtype) not in STORAGE_DTYPES:
      raise ValueError(
        f"{weights}: tensor {key!r} has dtype {array.dtype}, expected one of {STORAGE_DTYPES}"
      )
    hf.check_finite(array, f"{weights}: tensor {key!r}")
  return cfg, model_from_arrays(cfg, arrays), doc


def model_config(doc: dict[str, Any], file: str) -> ModelConfig:
  """The `ModelConfig` in config.json's "model" section, each value type and range checked.

  Raises:
    ValueError: "<file>: model.<key> must be ..., got <value>" (or the section itself).
  """
  section = doc.get("model")
  if not isinstance(section, dict):
    raise ValueError(f"{file}: model must be an object (a ModelConfig), got {section!r}")
  for field in dataclasses.fields(ModelConfig):
    if field.name not in section:
      continue  # from_dict takes the default
    key, value, default = f"model.{field.name}", section[field.name], field.default
    if isinstance(default, bool):
      hf.check_bool(file, key, value)
    elif isinstance(default, int):
      hf.check_int(file, key, value)
    elif isinstance(default, float):
      hf.check_float(file, key, value)
    elif isinstance(default, str) and not isinstance(value, str):
      raise ValueError(f"{file}: {key} must be a string, got {value!r}")
    elif field.name == "rope_scaling" and value is not None:
      if not isinstance(value, dict):
        raise ValueError(f"{file}: {key} must be an object or null, got {value!r}")
      for name in (f.name for f in dataclasses.fields(Llama3RopeScaling) if f.name in value):
        check = hf.check_int if name == "original_max_len" else hf.check_float
        check(file, f"{key}.{name}", value[name])
  try:
    return ModelConfig.from_dict(section)
  except (TypeError, ValueError) as e:  # unknown keys, inconsistent values
    raise ValueError(f"{file}: model: {e}") from e


def bundled_model_dir() -> str:
  """Filesystem path of the weights shipped as package data (pagedjax/weights/assets)."""
  # Next to this file rather than importlib.resources.files("pagedjax"): the latter fails
  # when pagedjax resolves as a namespace package (e.g. a stale editable install).
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def load_bundled_model() -> tuple[ModelConfig, Transformer]:
  """The small byte-level model trained on pydoc_data.topics (see train.py); no network."""
  cfg, model, _ = load_model(bundled_model_dir())
  return cfg, model


def load(
  path: str | os.PathLike | None = None,
  *,
  max_seq_len: int | None = None,
  skip_tokenizer_init: bool = False,
):
  """Loads a model and its tokenizer for the engine.

  Args:
    path: None for the bundled model; a directory whose config.json has a "model"
      section (written by `save_model`); or a Hugging Face checkpoint directory.
    max_seq_len: context length (default: the model's; for a Hugging Face checkpoint
      its max_position_embeddings capped at `hf.DEFAULT_MAX_SEQ_LEN`). A project-format
      model can only be limited below the context it was built for.
    skip_tokenizer_init: return a `TokenIdTokenizer` (token-id prompts only) without
      reading tokenizer.json / tokenizer_config.json; vocab_size and the BOS / EOS ids
      come from the model's config (and generation_config.json).

  Returns:
    (ModelConfig, Transformer, tokenizer): a `ByteTokenizer` for the project's format,
    a `hf.HFTokenizer` for a Hugging Face checkpoint (a `TokenIdTokenizer` for one
    without tokenizer.json), a `TokenIdTokenizer` for any with `skip_tokenizer_init`.

  Raises:
    ValueError: naming the directory, file, key or tensor that is missing, unsupported,
      out of range or outside the model directory.
    TypeError: `skip_tokenizer_init` is not a bool, `max_seq_len` not an int or None.
  """
  if not isinstance(skip_tokenizer_init, bool):
    raise TypeError(f"skip_tokenizer_init must be a bool, got {skip_tokenizer_init!r}")
  if path is None:
    cfg, module = load_bundled_model()
    return _limit_context(cfg, max_seq_len), module, _byte_tokenizer(skip_tokenizer_init)
  if not os.path.isdir(path):
    raise ValueError(f"model directory {os.fspath(path)!r} does not exist")
  doc = hf.read_json(path, CONFIG_FILE)
  if "model" in doc:
    cfg, module, _ = load_model(path)
    return _limit_context(cfg, max_seq_len), module, _byte_tokenizer(skip_tokenizer_init)
  cfg = hf.config_from_hf(doc, max_seq_len=max_seq_len)
  tokenizer = hf.tokenizer_from_dir(path, cfg, skip_tokenizer_init=skip_tokenizer_init)
  with hf.HFWeights(path, cfg) as arrays:
    module = model_from_arrays(cfg, arrays)
  return cfg, module, tokenizer


def _byte_tokenizer(skip_tokenizer_init: bool) -> ByteTokenizer | TokenIdTokenizer:
  """The project format's tokenizer, or its token-ids-only stand-in (same ids)."""
  if not skip_tokenizer_init:
    return ByteTokenizer()
  return TokenIdTokenizer(
    vocab_size=ByteTokenizer.vocab_size, eos_token_ids=ByteTokenizer.eos_token_ids,
    bos_id=ByteTokenizer.bos_id, reason="loaded with skip_tokenizer_init=True",
  )  # fmt: skip


def _limit_context(cfg: ModelConfig, max_seq_len: int | None) -> ModelConfig:
  if max_seq_len is None:
    return cfg
  if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int):
    raise TypeError(f"max_seq_len must be an int or None, got {max_seq_len!r}")
  if not 1 <= max_seq_len <= cfg.max_seq_len:
    raise ValueError(f"max_seq_len={max_seq_len} must be in [1, {cfg.max_seq_len}] for this model")
  return dataclasses.replace(cfg, max_seq_len=max_seq_len)
