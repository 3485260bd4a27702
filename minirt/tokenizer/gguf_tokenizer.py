"""A `tokenizers` tokenizer rebuilt from a GGUF file's metadata (byte-level BPE, llama.cpp's "gpt2").

The file holds the vocabulary, the merges, each token's type and the name of the pre-tokenizer
its merges were learned with (`tokenizer.ggml.pre`); the split rules for those names are
llama.cpp's, written here as the equivalent `tokenizers` pre-tokenizers.
"""
from __future__ import annotations

from typing import Callable

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

# Split rules (llama.cpp's regexes) by the name GGUF files give them.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _split(regex: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    return lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2, "gpt-2": _gpt2, "gpt2": _gpt2,
    # SmolLM: every digit on its own, then GPT-2's rule
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()]),
    "llama-bpe": _split(_LLAMA3), "llama3": _split(_LLAMA3), "llama-v3": _split(_LLAMA3), "smaug-bpe": _split(_LLAMA3),
    "qwen2": _split(_QWEN2), "deepseek-r1-qwen": _split(_QWEN2), "megrez": _split(_QWEN2),
}

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
# Control tokens that end a turn or a document, as llama.cpp treats them (end-of-generation).
END_OF_GENERATION = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "</s>"}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the alphabet byte-level BPE vocabularies use)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    moved = [b for b in range(256) if b not in keep]  # the rest move past 255, in byte order
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(moved)}


def build(fields: Callable[[str], object], source: str):
    """(backend, bos_token, eos_token, chat_template, end_ids) from GGUF metadata read by `fields(key)`."""
    from . import TokenizerError

    kind = fields("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{source}: GGUF tokenizer model {kind!r} is not supported (minirt builds byte-level "
                             "BPE tokenizers, tokenizer.ggml.model 'gpt2')")
    pre = fields("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported "
                             f"(minirt knows {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens: list[str] = fields("tokenizer.ggml.tokens")
    merges: list[str] = fields("tokenizer.ggml.merges") or []
    types: list[int] = fields("tokenizer.ggml.token_type") or [1] * len(tokens)
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())

    def spelled(token: str) -> str:  # a token written outside the byte alphabet: respell its UTF-8 bytes
        return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))

    vocab = {spelled(t): i for i, t in enumerate(tokens)}
    backend = HFTokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges]))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    # Control tokens stay whole and are special; user-defined ones stay whole and are text.
    # A control token outside the byte alphabet is a converter's mislabel, and is left alone.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types)
                                if kind == CONTROL and set(t) <= alphabet])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
                        if kind == USER_DEFINED])

    def token(key: str) -> str | None:
        i = fields(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    if fields("tokenizer.ggml.add_bos_token") and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[spelled(bos)])])
    end_ids = tuple(i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == CONTROL and t in END_OF_GENERATION)
    return backend, bos, eos, fields("tokenizer.chat_template"), end_ids
