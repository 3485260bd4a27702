"""minirt's tokenizer from tokenizer files gives transformers' ids and text (GGUF tokenizers: test_gguf.py)."""
from __future__ import annotations

import pytest

from minirt.tokenizer import StreamDecoder, Tokenizer, TokenizerError

TEXTS = ["The secret code is PHOENIX.", "  leading spaces, émojis 🙂 and\nnewlines\t", "def fib(n):\n    return n"]


def test_gpt2_style_vocab_and_merges(tmp_path):
    """A byte-level BPE given as vocab.json + merges.txt, checked against transformers' GPT2Tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    bpe.save_model(str(tmp_path))
    ref, ours = GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")), Tokenizer.from_folder(tmp_path)
    for text in TEXTS + ["the lazy fox"]:
        assert ours.encode(text) == ref(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == text


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_no_chat_template(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 5, vocab_size=280)
    bpe.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_folder(tmp_path).render_chat([{"role": "user", "content": "hi"}])


def test_stream_decoder_holds_back_partial_utf8(smollm2_llm):
    tok = smollm2_llm.tokenizer
    text = "snow ☃ and 🙂 emoji"
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(t) for t in tok.encode(text)]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
