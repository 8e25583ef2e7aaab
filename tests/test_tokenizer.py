"""ByteTokenizer: exact round trips, special ids, errors."""

import pytest

from pagedjax.weights.tokenizer import ByteTokenizer, TokenIdTokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize(
  "text", ["", "hello world", "def f(x):\n\treturn x\n", "naïve café — 日本語 🐍", "\x00\x7f"]
)
def test_round_trip(text):
  ids = TOK.encode(text, add_bos=False)
  assert ids == list(text.encode("utf-8"))
  assert all(0 <= i < 256 for i in ids)
  assert TOK.decode(ids) == text


def test_specials_added_and_skipped():
  ids = TOK.encode("añ", add_bos=True, add_eos=True)
  assert ids[0] == TOK.BOS == 256 and ids[-1] == TOK.EOS == 257
  assert len(ids) == 2 + len("añ".encode())
  assert TOK.decode(ids + [TOK.PAD, TOK.BOS]) == "añ"
  assert TOK.encode("x") == [TOK.BOS, ord("x")]  # add_bos defaults to True
  assert TOK.vocab_size == 259 and TOK.PAD == 258


def test_invalid_utf8_is_replaced_not_raised():
  assert TOK.decode([0xE6, 0x97]) == "\ufffd"  # truncated 3-byte sequence


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="259"):
    TOK.decode([259])
  with pytest.raises(ValueError, match="-1"):
    TOK.decode([-1])
  with pytest.raises(TypeError, match="bytes"):
    TOK.encode(b"abc")


def test_token_id_tokenizer_has_no_text():
  assert TOK.has_text and not TokenIdTokenizer.has_text
  tok = TokenIdTokenizer(vocab_size=10, eos_token_ids=[2, 3], bos_id=1, reason="no tokenizer.json")
  assert (tok.vocab_size, tok.eos_token_ids, tok.bos_id, tok.add_bos) == (10, (2, 3), 1, False)
  with pytest.raises(ValueError, match=r"no tokenizer \(no tokenizer\.json\).*token-id prompts"):
    tok.encode("hello")
  assert tok.decode([0, 5, 9]) == "" and tok.decode([]) == ""
  with pytest.raises(ValueError, match="10"):
    tok.decode([10])


# ------------------------------------------------------------ incremental detokenization
from hypothesis import given, settings, strategies as st  # noqa: E402

from pagedjax.entrypoints.detokenizer import IncrementalDetokenizer  # noqa: E402

# Bytes biased to multi-byte UTF-8 (lead and continuation bytes), ASCII and specials.
_BYTES = st.one_of(st.integers(0xC2, 0xF4), st.integers(0x80, 0xBF), st.integers(0, 0x7F),
                   st.sampled_from([TOK.BOS, TOK.EOS, TOK.PAD]))


def check_incremental(decode, ids):
  """Streams `ids` one token at a time: the text only grows, is always a prefix of the
  whole stream's decode, and equals it once the stream ends on a complete character."""
  inc = IncrementalDetokenizer(decode)
  grown, same = [], IncrementalDetokenizer(decode)  # one list object appended to (the engine)
  full = decode(ids)
  prev = ""
  for k in range(1, len(ids) + 1):
    text = inc.update(ids[:k])
    assert text.startswith(prev) and full.startswith(text), (ids[:k], text, full)
    grown.append(ids[k - 1])
    assert same.update(grown) == text
    prev = text
  if not full.endswith("\ufffd"):
    assert prev == full


@settings(max_examples=200, deadline=None)
@given(st.lists(_BYTES, max_size=40))
def test_incremental_detokenization_matches_full_decode(ids):
  check_incremental(TOK.decode, ids)


def test_incremental_detokenizer_restarts_on_a_rewritten_stream():
  inc = IncrementalDetokenizer(TOK.decode)
  assert inc.update(TOK.encode("abc", add_bos=False)) == "abc"
  assert inc.update(TOK.encode("xy", add_bos=False)) == "xy"  # a beam took other tokens
  assert inc.update(TOK.encode("xyé", add_bos=False)[:3]) == "xy"  # é incomplete: held back
  assert inc.update(TOK.encode("xyé", add_bos=False)) == "xyé"
