"""The project's weight files, the bundled model, and `checkpoint.load`'s dispatch."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pagedjax.weights import checkpoint as ckpt
from pagedjax.runner import model as M
from pagedjax.weights.tokenizer import ByteTokenizer

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
