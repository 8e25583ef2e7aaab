"""Trains the bundled byte-level model on text that ships with Python.

Corpus: `pydoc_data.topics` (the Python documentation topics, ~465k characters), one
document per topic, byte-tokenized as [BOS] bytes [EOS] and concatenated; the last
`val_fraction` of the token stream is held out for validation. Training samples random
windows (seeded numpy generator), optimises cross-entropy with optax AdamW (warmup +
cosine schedule, global-norm clipping) in a jitted step over the split NNX state, and
reports validation loss in bits per byte. Given a seed, a run is deterministic.

It does not shuffle documents, pack per document, or use dropout; nothing is downloaded.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from pagedjax.weights import checkpoint
from pagedjax.runner import model as model_lib
from pagedjax.weights.tokenizer import ByteTokenizer

SAMPLE_PROMPTS = ("The Python ", "def ", "A list is ", "The ")


def default_train_config() -> ml_collections.ConfigDict:
  """The configuration that produced the bundled model."""
  c = ml_collections.ConfigDict()
  # Model hyperparameters (fields of model.ModelConfig).
  c.model = ml_collections.ConfigDict(
    model_lib.ModelConfig(
      vocab_size=320,
      dim=256,
      num_layers=4,
      num_heads=8,
      num_kv_heads=4,
      head_dim=32,
      hidden_dim=704,
      max_seq_len=512,
      tie_embeddings=True,
    ).to_dict()
  )
  # Seeds parameter init and window sampling.
  c.seed = 0
  # Sequences per step and tokens per sequence.
  c.batch_size = 8
  c.seq_len = 256
  # Optimiser steps.
  c.num_steps = 1000
  # Peak learning rate, reached after warmup_steps, cosine-decayed to lr * min_lr_ratio.
  c.learning_rate = 2e-3
  c.warmup_steps = 50
  c.min_lr_ratio = 0.1
  # AdamW decoupled weight decay, applied to matrices only (not norms).
  c.weight_decay = 0.1
  c.beta2 = 0.95
  # Global-norm gradient clipping.
  c.grad_clip = 1.0
  # Fraction of the token stream (its tail) held out for validation.
  c.val_fraction = 0.05
  # Validate every this many steps (and at the end), this many windows per forward.
  c.eval_every = 250
  c.eval_batch_size = 32
  # Where to write model.safetensors and config.json ("" = do not save).
  c.output_dir = ""
  # Storage dtype of the saved tensors: float16 keeps the bundled file < 10 MB (loading
  # upcasts to float32; validation and samples are measured on the stored weights).
  c.save_dtype = "float16"
  # Greedy continuation length for the sample prompts printed at the end (0 = none).
  c.sample_tokens = 64
  return c


def load_corpus_tokens(tokenizer: ByteTokenizer | None = None) -> np.ndarray:
  """The pydoc topics as one int32 token stream, each topic wrapped in BOS ... EOS."""
  from pydoc_data import topics  # stdlib data, imported lazily: it is ~0.5 MB of text

  tok = tokenizer or ByteTokenizer()
  ids: list[int] = []
  for text in topics.topics.values():
    ids.extend(tok.encode(text, add_bos=True, add_eos=True))
  return np.asarray(ids, np.int32)


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Splits the stream into (train, validation) at its last `val_fraction`."""
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  cut = int(len(tokens) * (1.0 - val_fraction))
  return tokens[:cut], tokens[cut:]


def sample_windows(
  rng: np.random.Generator, tokens: np.ndarray, batch_size: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """Random (input, target) windows: x [B, T], y [B, T] = x shifted by one."""
  starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
  idx = starts[:, None] + np.arange(seq_len + 1)  # [B, T + 1]
  w = tokens[idx]
  return w[:, :-1], w[:, 1:]


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay, after global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=c.learning_rate,
    warmup_steps=c.warmup_steps,
    decay_steps=c.num_steps,
    end_value=c.learning_rate * c.min_lr_ratio,
  )
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
    optax.clip_by_global_norm(c.grad_clip),
    optax.adamw(schedule, b1=0.9, b2=c.beta2, weight_decay=c.weight_decay, mask=decay_mask),
  )


def _token_losses(graphdef, params, x, y):
  logits = nnx.merge(graphdef, params)(x)  # [B, T, V] float32
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)  # [B, T] nats


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
  """A jitted (params, opt_state, x, y) -> (params, opt_state, loss), state donated."""

  def step(params, opt_state, x, y):
    loss_fn = lambda p: _token_losses(graphdef, p, x, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def make_eval_fn(graphdef: nnx.GraphDef):
  """A jitted (params, x, y) -> nats summed over each row's targets, [B]."""
  return jax.jit(lambda params, x, y: _token_losses(graphdef, params, x, y).sum(axis=-1))


def bits_per_byte(eval_fn, params, tokens: np.ndarray, batch_size: int, seq_len: int) -> float:
  """Validation cost in bits per byte of text.

  The stream is cut into non-overlapping windows (each predicted from its own start);
  the summed cross-entropy of every target, BOS/EOS included, is divided by the number
  of byte targets, i.e. the code length of the text and its boundaries per byte.
  """
  n = (len(tokens) - 1) // seq_len
  if n < 1:
    raise ValueError(
      f"validation stream of {len(tokens)} tokens is shorter than seq_len + 1 = {seq_len + 1}"
    )
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)  # [n, T + 1]
  w = tokens[idx]
  x, y = w[:, :-1], w[:, 1:]
  total = 0.0
  for i in range(0, n, batch_size):
    xb, yb = x[i : i + batch_size], y[i : i + batch_size]
    m = len(xb)
    if m < batch_size:  # pad the last batch to the same shape (one compile), ignore the pad
      xb, yb = np.resize(xb, (batch_size, seq_len)), np.resize(yb, (batch_size, seq_len))
    total += float(np.asarray(eval_fn(params, xb, yb))[:m].sum())
  num_bytes = int((y < 256).sum())
  return total / (math.log(2) * num_bytes)


def train(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Trains a model from scratch; saves it to `config.output_dir` if set.

  Args:
    config: see `default_train_config` for the fields.

  Returns:
    Metrics: num_params, num_steps, tokens_seen, final_train_loss (nats/token),
    val_bpb and val_bpb_history [(step, bpb)] (float32 weights), val_bpb_stored (the
    weights as saved, see `export`), wall_time_s, step_time_s, samples (greedy).
  """
  c = config
  for name in ("batch_size", "seq_len", "num_steps"):
    if c[name] < 1:
      raise ValueError(f"config.{name} must be >= 1, got {c[name]}")
  if not 0 <= c.warmup_steps < c.num_steps:
    raise ValueError(f"config.warmup_steps must be in [0, num_steps={c.num_steps}), "
                     f"got {c.warmup_steps}")
  cfg = model_lib.ModelConfig.from_dict(c.model.to_dict())
  if c.seq_len > cfg.max_seq_len:
    raise ValueError(f"seq_len {c.seq_len} exceeds model max_seq_len {cfg.max_seq_len}")
  tok = ByteTokenizer()
  if cfg.vocab_size < tok.vocab_size:
    raise ValueError(f"model vocab_size {cfg.vocab_size} < tokenizer's {tok.vocab_size}")

  t_start = time.perf_counter()
  train_tokens, val_tokens = split_tokens(load_corpus_tokens(tok), c.val_fraction)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(c.seed))
  num_params = model_lib.count_params(model)
  graphdef, params = nnx.split(model)
  tx = make_optimizer(c)
  opt_state = tx.init(params)
  train_step, eval_fn = make_train_step(graphdef, tx), make_eval_fn(graphdef)
  rng = np.random.default_rng(c.seed)

  history: list[tuple[int, float]] = []
  bar = tqdm.trange(1, c.num_steps + 1, desc="train", mininterval=2.0)
  for step in bar:
    x, y = sample_windows(rng, train_tokens, c.batch_size, c.seq_len)
    params, opt_state, loss_arr = train_step(params, opt_state, x, y)
    if step == 1:  # exclude compilation from the step time
      loss = float(loss_arr)
      t_steps = time.perf_counter()
    is_eval = step % c.eval_every == 0 or step == c.num_steps
    if step % 10 == 0 or is_eval:  # fetching the loss syncs; not every step
      loss = float(loss_arr)
      bar.set_postfix(loss=f"{loss:.3f}")
    if is_eval:
      bpb = bits_per_byte(eval_fn, params, val_tokens, c.eval_batch_size, c.seq_len)
      history.append((step, bpb))
      bar.write(f"step {step}: train loss {loss:.4f} nats/token, val {bpb:.4f} bits/byte")
  jax.block_until_ready(params)
  # Seconds per step after compilation, validation passes included.
  step_time = (time.perf_counter() - t_steps) / max(c.num_steps - 1, 1)

  metrics = {
    "num_params": num_params,
    "num_steps": c.num_steps,
    "batch_size": c.batch_size,
    "seq_len": c.seq_len,
    "tokens_seen": c.num_steps * c.batch_size * c.seq_len,
    "train_tokens": len(train_tokens),
    "val_tokens": len(val_tokens),
    "final_train_loss": loss,
    "val_bpb": history[-1][1],
    "val_bpb_history": history,
    "wall_time_s": round(time.perf_counter() - t_start, 1),
    "step_time_s": round(step_time, 4),
    "seed": c.seed,
    "corpus": "pydoc_data.topics",
    "device": str(jax.devices()[0].device_kind),
  }
  return export(c, cfg, nnx.merge(graphdef, params), metrics)


def export(
  config: ml_collections.ConfigDict,
  cfg: model_lib.ModelConfig,
  model: model_lib.Transformer,
  metrics: dict[str, Any],
) -> dict[str, Any]:
  """Rounds a trained model to its storage dtype, evaluates and samples it, and saves it.

  The validation figure and the samples are those of the weights as stored (e.g. float16),
  i.e. of exactly what `checkpoint.load_model` returns.

  Args:
    config: the training config (uses save_dtype, seq_len, eval_batch_size, val_fraction,
      sample_tokens, output_dir).
    cfg: the model config.
    model: the trained float32 model.
    metrics: training metrics; returned with val_bpb_stored, save_dtype and samples added.

  Returns:
    The updated metrics (also written to config.json's "training" section if output_dir).
  """
  c, tok = config, ByteTokenizer()
  stored = checkpoint.model_from_arrays(cfg, checkpoint.flat_params(model, c.save_dtype))
  graphdef, params = nnx.split(stored)
  _, val_tokens = split_tokens(load_corpus_tokens(tok), c.val_fraction)
  val_bpb = bits_per_byte(make_eval_fn(graphdef), params, val_tokens, c.eval_batch_size, c.seq_len)
  samples = {}
  for prompt in SAMPLE_PROMPTS if c.sample_tokens > 0 else ():
    ids = model_lib.greedy_generate_dense(
      stored,
      tok.encode(prompt),
      c.sample_tokens,
      num_valid_tokens=tok.vocab_size,
      stop_token_ids=(tok.EOS,),
    )
    samples[prompt] = prompt + tok.decode(ids)
    print(f"greedy {prompt!r} -> {samples[prompt]!r}")
  metrics = {**metrics, "save_dtype": c.save_dtype, "val_bpb_stored": val_bpb, "samples": samples}
  if c.output_dir:
    checkpoint.save_model(
      c.output_dir,
      cfg,
      stored,
      {"training": {**metrics, "config": c.to_dict()}},
      dtype=c.save_dtype,
    )
  return metrics
