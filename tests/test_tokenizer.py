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
