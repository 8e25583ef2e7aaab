"""Incremental detokenization: a growing token stream's text in O(new tokens) per step.

Decoding a sequence's whole output every step costs O(length) per step, O(length^2) per
request; with 64 running requests it was most of the engine's host time. This keeps, per
sequence, the text decoded so far and decodes only a short window each step, as vLLM's
`detokenize_incrementally` does: the window starts at `prefix` (the read offset of the
step before), so that tokenizers which drop a leading space on a window's first token
(SentencePiece) see the same context twice and the difference is the new text; text that
ends in U+FFFD (an incomplete UTF-8 character, or a byte-level BPE token split) is held
back until the next token completes it.

The engine uses the incremental text for streamed outputs and stop strings; a finished
sequence's text is its full decode (tests check the two agree for the byte tokenizer and
the HF tokenizers on random token streams).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalDetokenizer:
  """The text of one growing token stream.

  Args:
    decode: ids -> text (the tokenizer's decode).
  """

  __slots__ = ("_decode", "_ids", "text", "_prefix", "_read", "_src")

  def __init__(self, decode: Callable[[Sequence[int]], str]):
    self._decode = decode
    self._ids: list[int] = []
    self.text = ""  # stable text: never shrinks while the stream only grows
    self._prefix = 0  # window start (token index)
    self._read = 0  # tokens whose text is in `text`
    self._src = None  # the list object of the last call

  def update(self, ids: Sequence[int]) -> str:
    """The stable text of `ids` (a stream that extends the previous call's; any other
    stream, e.g. a beam that took another parent's tokens, starts over). The same list
    object passed again is taken to have only grown (a Sequence's output_token_ids is
    append-only), so a step costs O(new tokens), not a comparison of the whole stream."""
    n = len(self._ids)
    if len(ids) < n or (ids is not self._src and list(ids[:n]) != self._ids):
      self.__init__(self._decode)
      n = 0
    self._src = ids
    if len(ids) == n:
      return self.text
    self._ids.extend(ids[n:])
    prefix_text = self._decode(self._ids[self._prefix:self._read])
    new_text = self._decode(self._ids[self._prefix:])
    if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
      self.text += new_text[len(prefix_text):]
      self._prefix, self._read = self._read, len(self._ids)
    return self.text
