"""Loading a model for the engine: the bundled one or a directory.

`load(path)` returns (ModelConfig, Transformer, tokenizer). The tokenizer
interface the engine relies on: `encode(text) -> list[int]` (BOS as the model
expects), `decode(ids) -> str` (special tokens skipped), `vocab_size` (valid
input ids are [0, vocab_size)) and `eos_token_ids` (ids that end generation).
"""

from __future__ import annotations

from pagedjax import model as model_lib
from pagedjax.tokenizer import ByteTokenizer


def load(path: str | None = None):
  """Loads the bundled model (path None) or a directory written by `model.save_model`.

  Returns:
    (ModelConfig, Transformer, tokenizer).
  """
  if path is None:
    cfg, module = model_lib.load_bundled_model()
  else:
    cfg, module, _ = model_lib.load_model(path)
  return cfg, module, ByteTokenizer()
