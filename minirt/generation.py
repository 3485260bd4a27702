"""Token generation: prefill, then one cached decode step per token, with sampling and stops."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .cache import CondensateCache, DenseCache
from .config import CondensateConfig, Sampling
from .llm import LLM
from .tokenizer import StreamDecoder


class PromptTooLongError(ValueError):
    """The prompt plus the requested new tokens exceed the model's position limit."""


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """One token id from logits [V]."""
    if s.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / s.temperature
    if s.top_k is not None:
        kth = logits.topk(min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p is not None:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        drop = sorted_p.cumsum(0) - sorted_p >= s.top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" | "length"
    prefill_s: float  # prompt processing up to the first new token
    decode_s: float  # the remaining decode steps
    decode_steps: int
    fallbacks: int = 0  # certificate fallbacks to full attention (sparse mode)
    max_dropped_mass: list[float] = field(default_factory=list)  # per step, over layers and heads

    @property
    def tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


def encode_prompt(llm: LLM, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
    if not isinstance(prompt, str):
        ids = [int(t) for t in prompt]
    elif llm.tokenizer is None:
        raise ValueError(f"{llm.path} has no tokenizer; pass token ids instead of text")
    elif chat:
        ids = llm.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    else:
        ids = llm.tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < llm.cfg.vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {llm.cfg.vocab_size})")
    return ids


def check_length(llm: LLM, n_prompt: int, max_new_tokens: int, allow_long_context: bool) -> None:
    total, limit = n_prompt + max_new_tokens, llm.cfg.max_seq_len
    if total <= limit:
        return
    if llm.cfg.uses_rope and allow_long_context:
        return
    hint = " (pass allow_long_context / --allow-long-context to run past it)" if llm.cfg.uses_rope else ""
    raise PromptTooLongError(
        f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's "
        f"{limit}-position limit{hint}")


PREFILL_CHUNK = 2048  # prompt tokens per forward pass: activation memory stays bounded for long prompts


def prefill(llm: LLM, prompt_ids: list[int], cache: DenseCache, progress: bool = False) -> torch.Tensor:
    """Run the prompt into `cache`, PREFILL_CHUNK tokens at a time; the next-token logits [V].
    With `progress`, a bar on stderr (a terminal only) once it has taken a second."""
    from tqdm import tqdm

    with torch.inference_mode(), tqdm(total=len(prompt_ids), desc="prefill", unit="tok", delay=1.0, leave=False,
                                      file=sys.stderr, disable=None if progress else True) as bar:
        for start in range(0, len(prompt_ids), PREFILL_CHUNK):
            chunk = prompt_ids[start:start + PREFILL_CHUNK]
            logits = llm.model(torch.tensor([chunk], device=llm.model.device), cache, last_only=True)[0, -1]
            bar.update(len(chunk))
    return logits


@torch.inference_mode()
def stream_tokens(llm: LLM, prompt_ids: list[int], cache: DenseCache, max_new_tokens: int,
                  sampling: Sampling = Sampling(), prefilled: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token, logits) for each new token; the caller decides when to stop. `prefilled`: the
    cache already holds the prompt and these are its next-token logits."""
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    logits = prefill(llm, prompt_ids, cache) if prefilled is None else prefilled
    for step in range(max_new_tokens):
        token = sample(logits, sampling, generator)
        yield token, logits
        if step + 1 < max_new_tokens:
            logits = llm.model(torch.tensor([[token]], device=llm.model.device), cache, last_only=True)[0, -1]


@torch.inference_mode()
def forced_steps(llm: LLM, prompt_ids: list[int], tokens: Sequence[int], cache: DenseCache,
                 prefilled: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Teacher forcing: yield the next-token logits [V] after the prompt, then after each of
    `tokens` fed in turn, whatever the model would have chosen."""
    yield prefill(llm, prompt_ids, cache) if prefilled is None else prefilled
    for token in tokens:
        yield llm.model(torch.tensor([[token]], device=llm.model.device), cache, last_only=True)[0, -1]


def generate(model: LLM | str, prompt: str | Sequence[int], max_new_tokens: int = 128, *,
             sampling: Sampling = Sampling(), stop: Sequence[str] = (), attention: str = "sparse",
             policy: CondensateConfig | None = None, chat: bool = False, allow_long_context: bool = False,
             on_text: Callable[[str], None] | None = None, progress: bool = False) -> Generation:
    """Generate a continuation of `prompt` (text or token ids).

    attention="sparse" uses the condensate cache with `policy` (defaults: CondensateConfig());
    "full" attends to everything. `on_text` receives decoded text pieces as they are produced;
    `progress` shows a prefill bar for long prompts.
    """
    llm = model if isinstance(model, LLM) else LLM.load(model)
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    ids = encode_prompt(llm, prompt, chat)
    check_length(llm, len(ids), max_new_tokens, allow_long_context)
    cache = llm.new_cache(len(ids) + max_new_tokens, attention, policy)
    certify = isinstance(cache, CondensateCache) and cache.certify
    decoder = StreamDecoder(llm.tokenizer) if llm.tokenizer is not None else None
    eos, out, text, reason, dropped = llm.eos_ids, [], "", "length", []
    t0 = time.perf_counter()
    t_first, steps = None, 0
    first = prefill(llm, ids, cache, progress)
    longest_stop = max(map(len, stop), default=0)
    for token, _ in stream_tokens(llm, ids, cache, max_new_tokens, sampling, prefilled=first):
        steps += 1
        if t_first is None:
            t_first = time.perf_counter()
        if certify:
            dropped.append(float(cache.dropped.max()))
        if token in eos:
            reason = "eos"
            break
        out.append(token)
        if decoder is None:
            continue
        piece = decoder.push(token)
        text += piece
        # a stop string can only end inside the new piece: search the tail, not the whole text
        tail_start = max(0, len(text) - len(piece) - longest_stop + 1)
        hits = [i for i in (text.find(s, tail_start) for s in stop) if i >= 0]
        if hits:
            cut = min(hits)
            piece = piece[: max(0, len(piece) - (len(text) - cut))]
            text = text[:cut]
            reason = "stop"
        if on_text and piece:
            on_text(piece)
        if reason == "stop":
            break
    t_end = time.perf_counter()
    return Generation(
        text=text, tokens=out, prompt_tokens=len(ids), finish_reason=reason,
        prefill_s=(t_first or t_end) - t0, decode_s=t_end - (t_first or t_end), decode_steps=max(0, steps - 1),
        fallbacks=getattr(cache, "fallbacks", 0), max_dropped_mass=dropped,
    )
