import json

import pytest

from omnigpt.errors import OmnigptError
from omnigpt.tokenizer import EOT, IMAGE, SPECIAL_TOKENS, Tokenizer
from tests.conftest import CORPUS

UNICODE = "héllo wörld — 世界 🎉 ∑x² \t\n  <|endoftext|> end"


def test_char_tokenizer_round_trips_any_unicode(char_tokenizer):
    ids = char_tokenizer.encode(CORPUS[:200])
    assert len(ids) == 200  # one token per seen character
    assert char_tokenizer.decode(ids) == CORPUS[:200]
    # characters never seen in training fall back to UTF-8 bytes and still round-trip
    assert char_tokenizer.decode(char_tokenizer.encode(UNICODE)) == UNICODE


def test_bpe_trains_compresses_and_round_trips():
    tok = Tokenizer.train_bpe([CORPUS], vocab_size=400)
    assert tok.vocab_size <= 400
    ids = tok.encode(CORPUS)
    assert len(ids) < len(CORPUS) / 2  # merges learned on a repetitive corpus
    assert tok.decode(ids) == CORPUS
    assert tok.decode(tok.encode(UNICODE)) == UNICODE


def test_bpe_vocab_too_small_is_refused():
    with pytest.raises(OmnigptError, match="at least"):
        Tokenizer.train_bpe([CORPUS], vocab_size=100)


def test_special_tokens_have_fixed_ids(char_tokenizer):
    bpe = Tokenizer.train_bpe([CORPUS], vocab_size=400)
    for tok in (char_tokenizer, bpe):
        assert [tok.token_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
        assert tok.eot_id == 0
        assert tok.encode(EOT + IMAGE) == [0, tok.token_id(IMAGE)]


def test_save_and_load(tmp_path, char_tokenizer):
    char_tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode(UNICODE) == char_tokenizer.encode(UNICODE)
    assert loaded.fingerprint == char_tokenizer.fingerprint
    assert Tokenizer.train_char(["abc"]).fingerprint != char_tokenizer.fingerprint


def test_gpt2_vocab_and_merges(tmp_path):
    # A miniature GPT-2-format vocabulary: byte-level symbols ("Ġ" is the space byte) and merges.
    vocab = {
        c: i
        for i, c in enumerate(["h", "e", "l", "o", "Ġ", "w", "r", "d", "he", "ll", "hell", "hello"])
    }
    vocab[EOT] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\nl l\nhe ll\nhell o\n")
    tok = Tokenizer.load(tmp_path)
    ids = tok.encode("hello world")
    assert ids[0] == vocab["hello"] and tok.decode(ids) == "hello world"
    assert tok.eot_id == vocab[EOT]


def test_missing_or_bad_tokenizer_files(tmp_path):
    with pytest.raises(OmnigptError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(OmnigptError, match="not a valid tokenizer"):
        Tokenizer.load(bad)


def test_stream_decoder_holds_back_partial_characters(char_tokenizer):
    text = "a世界🎉b"
    stream = char_tokenizer.stream()
    pieces = [stream.push(i) for i in char_tokenizer.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") >= 3  # byte tokens of multi-byte characters wait for the last byte


def test_token_healing_backs_up_a_trailing_space():
    tok = Tokenizer.train_bpe([CORPUS], vocab_size=400)
    ids = tok.encode("def ")
    healed, allowed = tok.heal(ids)
    texts = tok.token_texts()
    assert tok.decode(healed) == "def"
    assert allowed and all(texts[i].startswith(" ") for i in allowed)
    assert tok.token_id("Ġadd") in allowed or any(texts[i] == " add" for i in allowed)


def test_token_healing_leaves_complete_tokens_alone(char_tokenizer):
    ids = char_tokenizer.encode("def ")
    assert char_tokenizer.heal(ids) == (ids, None)  # no longer token starts with " "
    assert char_tokenizer.heal(ids[:1]) == (ids[:1], None)


def test_stream_decoder_flush_emits_an_unfinished_character(char_tokenizer):
    stream = char_tokenizer.stream()
    partial = char_tokenizer.encode("a世")[:-1]  # "a" and the first two of 世's three bytes
    assert "".join(stream.push(i) for i in partial) == "a"
    rest = stream.flush()
    assert rest and set(rest) == {"\ufffd"}  # one replacement character per stray byte
    assert stream.flush() == ""
