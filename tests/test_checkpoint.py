"""The project's weight files, the bundled model, and `checkpoint.load`'s dispatch."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from pagedjax.weights import checkpoint as ckpt
from pagedjax.runner import model as M
from pagedjax.weights.tokenizer import ByteTokenizer, TokenIdTokenizer

TINY = M.ModelConfig(
  vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, hidden_dim=48,
  max_seq_len=32,
)  # fmt: skip


@functools.cache
def random_model(cfg=TINY):
  """Every parameter N(0, 0.3), filled with numpy draws (no per-initializer compiles)."""
  abstract = nnx.eval_shape(lambda: M.Transformer(cfg, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  rng = np.random.default_rng(1)
  arrays = {
    ".".join(map(str, path)): (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
    for path, v in flat
  }
  return ckpt.model_from_arrays(cfg, arrays)


def fwd(model, x):
  return M.dense_forward(*nnx.split(model), x)


def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 12)), jnp.int32)


def test_save_load_round_trip_is_bit_exact(tmp_path):
  model = random_model()
  ckpt.save_model(tmp_path, TINY, model, {"training": {"steps": 3}})
  cfg, loaded, doc = ckpt.load_model(tmp_path)
  assert cfg == TINY and doc["training"] == {"steps": 3}
  a, b = ckpt.flat_params(model), ckpt.flat_params(loaded)
  assert "layers.0.attn.q_proj.kernel" in a and "embed.embedding" in a
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  x = tokens()
  np.testing.assert_array_equal(np.asarray(fwd(model, x)), np.asarray(fwd(loaded, x)))


def test_float16_storage_loads_as_rounded_float32(tmp_path):
  model = random_model()
  ckpt.save_model(tmp_path, TINY, model, dtype="float16")
  _, loaded, _ = ckpt.load_model(tmp_path)
  for key, value in ckpt.flat_params(loaded).items():
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, ckpt.flat_params(model, "float16")[key].astype(np.float32))
  with pytest.raises(ValueError, match="int8"):
    ckpt.save_model(tmp_path, TINY, model, dtype="int8")


def test_load_rejects_missing_and_misshapen_weights():
  arrays = ckpt.flat_params(random_model())
  with pytest.raises(ValueError, match="final_norm.scale"):
    ckpt.model_from_arrays(TINY, {k: v for k, v in arrays.items() if k != "final_norm.scale"})
  with pytest.raises(ValueError, match="embed.embedding"):
    ckpt.model_from_arrays(TINY, {**arrays, "embed.embedding": np.zeros((3, 3), np.float32)})


def test_bundled_model_loads_with_byte_tokenizer_and_gives_finite_logits():
  cfg, model, tok = ckpt.load(None)
  assert isinstance(tok, ByteTokenizer) and cfg.rope_scaling is None
  assert cfg.vocab_size >= tok.vocab_size and cfg.num_kv_heads < cfg.num_heads
  x = jnp.asarray([tok.encode("The Python ")], jnp.int32)
  logits = fwd(model, x)
  chex.assert_shape(logits, (1, x.shape[1], cfg.vocab_size))
  chex.assert_tree_all_finite(logits)


def test_load_dispatches_project_format_and_rejects_bad_dirs(tmp_path):
  ckpt.save_model(tmp_path / "m", TINY, random_model())
  cfg, model, tok = ckpt.load(tmp_path / "m")
  assert cfg == TINY and isinstance(tok, ByteTokenizer)
  a, b = ckpt.flat_params(model), ckpt.flat_params(random_model())
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
  with pytest.raises(ValueError, match="nowhere.*does not exist"):
    ckpt.load(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty/config.json not found"):
    ckpt.load(tmp_path / "empty")
  (tmp_path / "empty" / "config.json").write_text(json.dumps([1, 2]))
  with pytest.raises(ValueError, match="config.json: expected a JSON object"):
    ckpt.load(tmp_path / "empty")


def _saved(tmp_path, model_changes=None):
  """A project-format directory of `random_model()`, its "model" section changed."""
  ckpt.save_model(tmp_path / "m", TINY, random_model())
  path = tmp_path / "m" / "config.json"
  doc = json.loads(path.read_text())
  if model_changes is not None:
    doc["model"] = None if model_changes == "NULL" else {**doc["model"], **model_changes}
  path.write_text(json.dumps(doc))
  return tmp_path / "m"


@pytest.mark.parametrize(
  ("changes", "message"),
  [("NULL", r"config\.json: model must be an object.*None"),
   ({"num_layers": True}, r"config\.json: model\.num_layers .*True"),
   ({"vocab_size": "64"}, r"config\.json: model\.vocab_size .*'64'"),
   ({"head_dim": 8.0}, r"config\.json: model\.head_dim .*8\.0"),
   ({"rope_theta": float("nan")}, r"config\.json: model\.rope_theta .*nan"),
   ({"norm_eps": -1.0}, r"config\.json: model\.norm_eps .*-1\.0"),
   ({"tie_embeddings": 1}, r"config\.json: model\.tie_embeddings .*1"),
   ({"dtype": 3}, r"config\.json: model\.dtype .*3"),
   ({"rope_scaling": "x"}, r"config\.json: model\.rope_scaling .*'x'"),
   ({"rope_scaling": {"factor": "8"}}, r"config\.json: model\.rope_scaling\.factor .*'8'"),
   ({"num_kv_heads": 3}, r"config\.json: model: num_heads=4 is not a multiple of num_kv_heads=3"),
   ({"colour": "red"}, r"config\.json: model: unknown ModelConfig keys: \['colour'\]")],
)  # fmt: skip
def test_project_format_bad_model_section_names_file_and_key(tmp_path, changes, message):
  directory = _saved(tmp_path, changes)
  with pytest.raises(ValueError, match=message):
    ckpt.load(directory)


def test_project_format_files_must_resolve_inside_the_directory(tmp_path):
  directory = _saved(tmp_path)
  outside = tmp_path / "outside"
  outside.mkdir()
  (directory / "model.safetensors").rename(outside / "model.safetensors")
  (directory / "model.safetensors").symlink_to(outside / "model.safetensors")
  with pytest.raises(ValueError, match=r"m/model\.safetensors resolves to .*outside"):
    ckpt.load(directory)
  (directory / "config.json").unlink()
  (directory / "config.json").symlink_to(directory / "config.json")
  with pytest.raises(ValueError, match=r"m/config\.json: symlink loop"):
    ckpt.load(directory)


def test_project_format_non_finite_or_non_float_weights_are_refused(tmp_path):
  directory = _saved(tmp_path)
  weights = str(directory / "model.safetensors")
  arrays = safetensors.numpy.load_file(weights)
  bad = arrays["final_norm.scale"].copy()
  bad[5] = np.inf
  safetensors.numpy.save_file({**arrays, "final_norm.scale": bad}, weights)
  message = r"tensor 'final_norm\.scale' has 1 non-finite .*inf.*index \(5,\)"
  with pytest.raises(ValueError, match=message):
    ckpt.load(directory)
  ints = arrays["final_norm.scale"].astype(np.int32)
  safetensors.numpy.save_file({**arrays, "final_norm.scale": ints}, weights)
  with pytest.raises(ValueError, match=r"tensor 'final_norm\.scale' has dtype int32"):
    ckpt.load(directory)


def test_skip_tokenizer_init_gives_the_byte_ids_without_text(tmp_path):
  cfg, _, tok = ckpt.load(_saved(tmp_path), skip_tokenizer_init=True)
  assert isinstance(tok, TokenIdTokenizer) and not tok.has_text and cfg == TINY
  byte = ByteTokenizer()
  assert (tok.vocab_size, tok.eos_token_ids, tok.bos_id) == (
    byte.vocab_size, byte.eos_token_ids, byte.bos_id,
  )  # fmt: skip
  with pytest.raises(ValueError, match=r"skip_tokenizer_init=True.*only token-id prompts"):
    tok.encode("x")
  with pytest.raises(TypeError, match="skip_tokenizer_init must be a bool"):
    ckpt.load(tmp_path / "m", skip_tokenizer_init="yes")
  with pytest.raises(TypeError, match="max_seq_len must be an int"):
    ckpt.load(tmp_path / "m", max_seq_len=16.0)
