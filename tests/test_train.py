"""Training loop: data pipeline, determinism of its parts, a tiny run that learns and saves."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pagedjax.weights import checkpoint as ckpt
from pagedjax.runner import model as M
from pagedjax.weights import train as T
from pagedjax.weights.tokenizer import ByteTokenizer


def tiny_config(output_dir=""):
  c = T.default_train_config()
  c.model.update(
    dim=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, hidden_dim=64, max_seq_len=32
  )
  c.update(
    batch_size=4,
    seq_len=16,
    num_steps=12,
    warmup_steps=2,
    learning_rate=1e-2,
    eval_every=6,
    eval_batch_size=256,
    sample_tokens=0,
    output_dir=str(output_dir),
  )
  return c


def test_corpus_is_bos_eos_delimited_documents_and_split_is_the_tail():
  from pydoc_data import topics

  tokens = T.load_corpus_tokens()
  assert tokens[0] == ByteTokenizer.BOS and tokens[-1] == ByteTokenizer.EOS
  num_docs = len(topics.topics)
  assert (tokens == ByteTokenizer.BOS).sum() == (tokens == ByteTokenizer.EOS).sum() == num_docs
  assert len(tokens) > 400_000 and tokens.max() < ByteTokenizer.vocab_size
  train, val = T.split_tokens(tokens, 0.05)
  assert len(train) + len(val) == len(tokens)
  assert abs(len(val) / len(tokens) - 0.05) < 1e-3
  np.testing.assert_array_equal(val, tokens[len(train) :])
  with pytest.raises(ValueError, match="1.5"):
    T.split_tokens(tokens, 1.5)


def test_windows_are_seeded_and_targets_are_shifted_inputs():
  tokens = np.arange(1000, dtype=np.int32)
  x1, y1 = T.sample_windows(np.random.default_rng(3), tokens, 5, 7)
  x2, _ = T.sample_windows(np.random.default_rng(3), tokens, 5, 7)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, x1 + 1)
  assert x1.shape == (5, 7)


def test_bits_per_byte_counts_every_window_once_whatever_the_eval_batch():
  cfg = M.ModelConfig.from_dict(tiny_config().model.to_dict())
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: M.Transformer(cfg, rngs=nnx.Rngs(0))))
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)  # uniform logits
  eval_fn = T.make_eval_fn(graphdef)
  tokens = np.random.default_rng(0).integers(0, 259, 16 * 7 + 1).astype(np.int32)
  # Every target costs ln(V) nats; the cost is divided by the byte targets only.
  targets = tokens[1:]
  expected = len(targets) * math.log2(cfg.vocab_size) / (targets < 256).sum()
  # 7 windows: batch 7 needs no padding, batch 4 pads its second call with 1 dummy row.
  for batch in (7, 4):
    assert T.bits_per_byte(eval_fn, params, tokens, batch, 16) == pytest.approx(expected)


def test_tiny_run_learns_and_writes_loadable_weights(tmp_path):
  metrics = T.train(tiny_config(tmp_path))
  (s1, bpb1), (s2, bpb2) = metrics["val_bpb_history"]
  assert (s1, s2) == (6, 12)
  # From ~log2(320) = 8.3 bits at init, down past the byte-unigram level.
  assert bpb2 < bpb1 < 7.0 and metrics["val_bpb"] == bpb2
  assert metrics["tokens_seen"] == 12 * 4 * 16 and metrics["num_params"] > 0
  cfg, model, doc = ckpt.load_model(tmp_path)
  assert cfg.dim == 32 and doc["training"]["num_steps"] == 12
  assert doc["training"]["config"]["seed"] == 0
  assert M.count_params(model) == metrics["num_params"]


def test_bad_config_raises_value_error():
  c = tiny_config()
  c.seq_len = 64
  with pytest.raises(ValueError, match="seq_len 64"):
    T.train(c)
  c = tiny_config()
  c.model.vocab_size = 200
  with pytest.raises(ValueError, match="vocab_size 200"):
    T.train(c)
