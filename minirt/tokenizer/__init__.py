"""Tokenization through the `tokenizers` library, plus the model's own chat template.

BOS/EOS handling comes from the checkpoint itself: tokenizer.json's post-processor adds BOS for
the families that use one (Llama), and nothing for GPT-2, Pythia or Qwen2, exactly as
transformers does; chat prompts are rendered with the checkpoint's Jinja template. A GGUF file's
tokenizer is rebuilt from its metadata (gguf_tokenizer.py) into the same `tokenizers` objects.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers


class TokenizerError(RuntimeError):
    """The checkpoint has no usable tokenizer files or chat template."""


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, backend: HFTokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, end_ids: tuple[int, ...] = ()):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        self.end_ids = end_ids  # further tokens that end a generation (GGUF: <|im_end|>, <|eot_id|>, ...)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        if (folder / "tokenizer.json").exists():
            backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            # GPT-2 style byte-level BPE without a tokenizer.json
            backend = HFTokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
        else:
            raise TokenizerError(f"{folder}: no tokenizer.json or vocab.json + merges.txt")
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(backend, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")), template)

    @classmethod
    def from_gguf(cls, gguf) -> "Tokenizer":
        """From a GGUF file's metadata (minirt.weights.gguf.GGUFFile)."""
        from .gguf_tokenizer import build

        return cls(*build(gguf.get, str(gguf.path)))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def eos_token_id(self) -> int | None:
        return self.backend.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this model has no chat template; run without --chat")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TokenizerError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise TokenizerError(f"chat template failed to render: {e}") from None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # The template writes the special tokens itself, so none are added here (as transformers does).
        return self.encode(self.render_chat(messages), add_special_tokens=False)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8.

    Each push decodes only the tokens since the last emitted piece (plus a few before them, so
    tokenizers that change a token's text by its neighbours decode it in context): O(1) per token.
    """

    CONTEXT = 4  # tokens decoded again before the new ones

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # first id of the context decoded with each push
        self.done = 0  # ids whose text has been emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.start:self.done])
        text = self.tokenizer.decode(self.ids[self.start:])
        if text.endswith("\ufffd") or not text.startswith(before):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self.done = len(self.ids)
        self.start = max(0, self.done - self.CONTEXT)
        return text[len(before):]
