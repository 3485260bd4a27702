"""minirt's tokenizer gives transformers' ids, text and chat prompts."""
from __future__ import annotations

import pytest

from minirt.tokenizer import StreamDecoder, Tokenizer, TokenizerError

TEXTS = ["The secret code is PHOENIX.", "  leading spaces, émojis 🙂 and\nnewlines\t", "def fib(n):\n    return n"]


def test_matches_transformers_on_smollm2(smollm2):
    from transformers import AutoTokenizer

    ref, ours = AutoTokenizer.from_pretrained(smollm2), Tokenizer(smollm2)
    for text in TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.render_chat(messages) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.encode_chat(messages) == list(ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))


def test_gpt2_style_vocab_and_merges(tmp_path):
    """A byte-level BPE given as vocab.json + merges.txt, checked against transformers' GPT2Tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    bpe.save_model(str(tmp_path))
    ref, ours = GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")), Tokenizer(tmp_path)
    for text in TEXTS + ["the lazy fox"]:
        assert ours.encode(text) == ref(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == text


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer(tmp_path)


def test_no_chat_template(tmp_path, smollm2):
    (tmp_path / "tokenizer.json").write_bytes((smollm2 / "tokenizer.json").read_bytes())
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer(tmp_path).render_chat([{"role": "user", "content": "hi"}])


def test_stream_decoder_holds_back_partial_utf8(smollm2):
    tok = Tokenizer(smollm2)
    text = "snow ☃ and 🙂 emoji"
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(t) for t in tok.encode(text)]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
