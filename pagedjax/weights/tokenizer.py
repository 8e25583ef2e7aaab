"""Byte-level tokenizer: UTF-8 bytes are the tokens, plus three special ids.

Ids 0..255 are byte values, BOS=256, EOS=257, PAD=258, so `vocab_size` is 259. The
bundled model pads its embedding to a multiple of 64 rows (320) for matmul speed; the
logits of ids >= 259 are meaningless and must never be sampled (the engine masks them).
No merges, no normalisation: any string round-trips exactly.

`TokenIdTokenizer` stands in for a model loaded without a text tokenizer: it knows the
vocabulary size and the special ids, takes token-id prompts only and decodes to "".
"""

from __future__ import annotations

from collections.abc import Iterable


class ByteTokenizer:
  """Maps text to UTF-8 byte ids and back."""

  BOS = 256
  EOS = 257
  PAD = 258
  vocab_size = 259

  bos_id = BOS
  eos_id = EOS
  pad_id = PAD
  # The engine's tokenizer interface: every id that ends generation (HF models may have several).
  eos_token_ids = (EOS,)
  has_text = True  # encodes and decodes text (a TokenIdTokenizer does not)

  def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
    """Encodes `text` as its UTF-8 bytes.

    Args:
      text: the string to encode.
      add_bos: prepend BOS.
      add_eos: append EOS.

    Returns:
      Token ids.
    """
    if not isinstance(text, str):
      raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = list(text.encode("utf-8"))
    return ([self.BOS] if add_bos else []) + ids + ([self.EOS] if add_eos else [])

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes byte ids to text, skipping special ids; invalid UTF-8 becomes U+FFFD.

    Raises:
      ValueError: if an id is outside [0, vocab_size).
    """
    out = bytearray()
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} outside [0, {self.vocab_size})")
      if i < 256:
        out.append(i)
    return out.decode("utf-8", errors="replace")


class TokenIdTokenizer:
  """The engine's tokenizer interface without text: token-id prompts only.

  `has_text` is False; `encode` raises ValueError (pass token ids instead) and `decode`
  returns "" for valid ids, so the engine serves token-id requests with empty text.

  Args:
    vocab_size: valid ids are [0, vocab_size) (the model's embedding rows when nothing
      narrower is known).
    eos_token_ids: ids that end generation.
    bos_id: the BOS id, or None; never prepended (there is no text to prepend it to).
    reason: why there is no tokenizer, for encode's error (e.g. "no tokenizer.json in ...").
  """

  has_text = False
  add_bos = False

  def __init__(
    self,
    *,
    vocab_size: int,
    eos_token_ids: tuple[int, ...] = (),
    bos_id: int | None = None,
    reason: str = "none was loaded",
  ):
    self.vocab_size = vocab_size
    self.eos_token_ids = tuple(eos_token_ids)
    self.bos_id = bos_id
    self.reason = reason

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Always raises: there is no text tokenizer.

    Raises:
      ValueError: saying why, and to pass token ids instead.
    """
    raise ValueError(
      f"this model has no tokenizer ({self.reason}): it accepts only token-id prompts; "
      "pass token ids (prompt_token_ids) instead of text"
    )

  def decode(self, ids: Iterable[int]) -> str:
    """Returns "" for any valid ids: there is no text.

    Raises:
      ValueError: if an id is outside [0, vocab_size).
    """
    for i in ids:
      if not 0 <= int(i) < self.vocab_size:
        raise ValueError(f"token id {int(i)} outside [0, {self.vocab_size})")
    return ""
