"""Token generation: prefill, then one cached decode step per token, with sampling and stops."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from . import kernels
from .cache import DenseCache
from .config import CondensateConfig, Sampling
from .llm import LLM
from .tokenizer import StreamDecoder


class PromptTooLongError(ValueError):
    """The prompt plus the requested new tokens exceed the model's position limit."""


def sample_tokens(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V], on the logits' device with no host sync (so a CUDA graph
    can hold it): greedy, or temperature with top-k / top-p, drawn by the exponential race
    (argmax of p / E with E ~ Exp(1) picks token i with probability p_i)."""
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    x = logits.float() / s.temperature
    if s.top_k is not None:
        kth = x.topk(min(s.top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if s.top_p is not None:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        drop = sorted_p.cumsum(-1) - sorted_p >= s.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)


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
    max_dropped_mass: list[float] = field(default_factory=list)  # per decode step, over layers and heads

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


# Prompt tokens per forward pass, so activation memory stays bounded for long prompts (the GPU's
# flash attention handles long chunks; the CPU's math attention holds chunk x context scores).
PREFILL_CHUNK = {"cpu": 2048, "cuda": 131072}


def _check_positions(llm: LLM, end: int) -> None:
    if llm.model.pos_embed is not None and end > llm.cfg.max_seq_len:
        raise ValueError(f"position {end - 1} is past the model's {llm.cfg.max_seq_len} learned positions")


def prefill(llm: LLM, prompt_ids: list[int], cache: DenseCache, progress: bool = False,
            last_only: bool = True) -> torch.Tensor:
    """Run the prompt into `cache` (eager), PREFILL_CHUNK tokens at a time; the next-token logits
    [V] (every position's [T, V] if not last_only). With `progress`, a bar on stderr (a terminal
    only) once it has taken a second."""
    from tqdm import tqdm

    _check_positions(llm, cache.seq_len + len(prompt_ids))
    size = PREFILL_CHUNK.get(llm.model.device.type, 2048)
    out = []
    with torch.inference_mode(), tqdm(total=len(prompt_ids), desc="prefill", unit="tok", delay=1.0, leave=False,
                                      file=sys.stderr, disable=None if progress else True) as bar:
        for start in range(0, len(prompt_ids), size):
            chunk = prompt_ids[start:start + size]
            logits = llm.model(torch.tensor([chunk], device=llm.model.device), cache, last_only=last_only)
            if len(chunk) == 1:  # one token took the decode step's path, whose position moves on the device
                cache.end_step()
            cache.advance(len(chunk))
            out.append(logits[0])
            bar.update(len(chunk))
    return out[-1][-1] if last_only else torch.cat(out)


class DecodeStep:
    """The one decode step every caller uses: the token on the device in, the logits and the next
    token (sampled on the device) out. Shapes are static (the cache is allocated for its
    capacity, its position and lengths live on the device), so on CUDA the whole step, sampling
    included, is captured once in a CUDA graph and replayed for every token; on the CPU, or with
    the PyTorch reference kernels, it runs eagerly. The host only counts.

    step.choose(logits) samples the first token from the prefill's logits; step() feeds the last
    sampled token (or, after step.feed(t), token t: teacher forcing) and samples the next.
    """

    def __init__(self, llm: LLM, cache: DenseCache, sampling: Sampling = Sampling(), graph: bool | None = None):
        self.llm, self.cache, self.sampling = llm, cache, sampling
        device = llm.model.device
        self.ops = kernels.layer_implementation(device)  # greedy sampling's one launch (greedy_choice)
        B = cache.k.shape[1]
        self.generator = None
        if sampling.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        self.token = torch.zeros(B, 1, dtype=torch.int64, device=device)  # fed this step
        self.next = torch.zeros(B, dtype=torch.int64, device=device)  # sampled from this step's logits
        self.logits = torch.zeros(B, llm.cfg.vocab_size, dtype=torch.float32, device=device)
        # the certificate's largest dropped mass per step, kept on the device and read once
        self.dropped = torch.zeros(cache.capacity + 1, device=device) if getattr(cache, "certify", False) else None
        self.count = torch.zeros(1, dtype=torch.int64, device=device)  # steps taken, kept only to index dropped
        self.use_graph = cache.graphable if graph is None else graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # kept for the graph (_capture)
        self.warm = False  # the first step ran (eagerly: Triton compiles, cuBLAS warms up)
        self.steps = 0

    def feed(self, token: int) -> None:
        self.token.fill_(token)

    def choose(self, logits: torch.Tensor) -> None:
        """Sample the next token from logits [B, V] (the prefill's) into the step's buffers."""
        if self.sampling.temperature == 0:
            self.ops.greedy_choice(logits, self.logits, self.next, self.token)
            return
        self.logits.copy_(logits)
        self.next.copy_(sample_tokens(logits, self.sampling, self.generator))
        self.token.copy_(self.next[:, None])

    def _run(self) -> None:
        with torch.inference_mode():
            logits = self.llm.model(self.token, self.cache, last_only=True)[:, -1]
            self.choose(logits)
            if self.dropped is not None:
                self.dropped.scatter_(0, self.count, self.cache.dropped.amax().view(1))
                self.count.add_(1)
            self.cache.end_step()

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph):
            self._run()
        self.graph = graph
        # the RoPE tables the graph reads: a later, larger cache replaces them in the model
        # (Rotary.reserve), so the step keeps these alive for as long as it replays
        rotary, model = self.llm.model.rotary, self.llm.model
        self.rope_tables = rotary.table(model.device, model.dtype) if rotary is not None else None

    def restart(self) -> None:
        """Empty the cache and zero the certificate's counts: decode anew, replaying the captured graph."""
        self.cache.truncate(0)
        self.cache.reset_counts()
        self.count.zero_()
        self.steps = 0

    def __call__(self) -> None:
        self.cache.reserve(1)
        _check_positions(self.llm, self.cache.seq_len + 1)
        if not self.use_graph:
            self._run()
        elif not self.warm:  # the first step runs eagerly on a side stream: Triton compiles, cuBLAS warms up
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run()
            torch.cuda.current_stream().wait_stream(side)
            self.warm = True
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        self.cache.advance(1)
        self.steps += 1

    def dropped_per_step(self) -> list[float]:
        return self.dropped[: self.steps].tolist() if self.dropped is not None else []


@torch.inference_mode()
def stream_tokens(llm: LLM, prompt_ids: list[int], cache: DenseCache, max_new_tokens: int,
                  sampling: Sampling = Sampling(), prefilled: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token, logits [V]) for each new token; the caller decides when to stop. `prefilled`:
    the cache already holds the prompt and these are its next-token logits. Reading each token on
    the host syncs once per token: generate() overlaps that with the next step instead."""
    step = DecodeStep(llm, cache, sampling)
    step.choose((prefill(llm, prompt_ids, cache) if prefilled is None else prefilled)[None])
    for i in range(max_new_tokens):
        yield int(step.next[0]), step.logits[0].clone()
        if i + 1 < max_new_tokens:
            step()


@torch.inference_mode()
def forced_steps(llm: LLM, prompt_ids: list[int], tokens: Sequence[int], cache: DenseCache,
                 prefilled: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Teacher forcing: yield the next-token logits [V] after the prompt, then after each of
    `tokens` fed in turn, whatever the model would have chosen."""
    first = prefill(llm, prompt_ids, cache) if prefilled is None else prefilled
    yield first
    step = DecodeStep(llm, cache)
    for token in tokens:
        step.feed(token)
        step()
        yield step.logits[0].clone()


SESSION_BLOCK = 1024  # generate() sizes its cache in blocks of positions, so calls of similar lengths share one


def decode_session(llm: LLM, n_positions: int, attention: str, policy: CondensateConfig | None,
                   sampling: Sampling) -> tuple[DenseCache, DecodeStep]:
    """An empty cache for n_positions (rounded up to SESSION_BLOCK) and its decode step. With greedy
    sampling the pair is kept on the LLM and the next call of the same shape gets it back emptied
    (the certificate's counts zeroed), its CUDA graph already captured: no eager first step and no
    capture (tens of ms, which over 128 tokens cost more than the decode step's launch gaps). A
    call of another shape frees it first."""
    capacity = -(-n_positions // SESSION_BLOCK) * SESSION_BLOCK
    key = (capacity, attention, policy)
    reusable = sampling.temperature == 0
    held = llm.decode_session
    if reusable and held is not None and held[0] == key:
        held[2].restart()
        return held[1], held[2]
    llm.decode_session = None  # its memory goes before the new cache takes its own
    cache = llm.new_cache(capacity, attention, policy)
    step = DecodeStep(llm, cache, sampling)
    if reusable:
        llm.decode_session = (key, cache, step)
    return cache, step


def generate(model: LLM | str, prompt: str | Sequence[int], max_new_tokens: int = 128, *,
             sampling: Sampling = Sampling(), stop: Sequence[str] = (), attention: str = "sparse",
             policy: CondensateConfig | None = None, chat: bool = False, allow_long_context: bool = False,
             on_text: Callable[[str], None] | None = None, progress: bool = False) -> Generation:
    """Generate a continuation of `prompt` (text or token ids).

    attention="sparse" uses the condensate cache with `policy` (defaults: CondensateConfig());
    "full" attends to everything. `on_text` receives decoded text pieces as they are produced;
    `progress` shows a prefill bar for long prompts. Greedy calls keep their cache and captured
    decode step on the LLM for the next call of the same shape (decode_session); set
    llm.decode_session = None to free that memory.
    """
    llm = model if isinstance(model, LLM) else LLM.load(model)
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    ids = encode_prompt(llm, prompt, chat)
    check_length(llm, len(ids), max_new_tokens, allow_long_context)
    decoder = StreamDecoder(llm.tokenizer) if llm.tokenizer is not None else None
    longest_stop = max(map(len, stop), default=0)
    eos, out, text, reason = llm.eos_ids, [], "", "length"
    t0 = time.perf_counter()
    cache, step = decode_session(llm, len(ids) + max_new_tokens, attention, policy, sampling)
    step.choose(prefill(llm, ids, cache, progress)[None])
    # Tokens reach the host through a pinned buffer, copied without blocking: the host reads token
    # i while the GPU already runs the step that makes token i + 1.
    host = torch.empty(max_new_tokens, dtype=torch.int64, pin_memory=step.next.is_cuda)
    ready = []

    def copy_out(i: int) -> None:
        host[i:i + 1].copy_(step.next[:1], non_blocking=True)
        event = torch.cuda.Event() if step.next.is_cuda else None
        if event is not None:
            event.record()
        ready.append(event)

    copy_out(0)
    if ready[0] is not None:
        ready[0].synchronize()  # the prefill's own time; compiling the decode step's kernels is decode time
    t_first = time.perf_counter()
    for i in range(max_new_tokens):
        if i + 1 < max_new_tokens:
            step()
            copy_out(i + 1)
        if ready[i] is not None:
            ready[i].synchronize()
        token = int(host[i])
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
        hits = [j for j in (text.find(s, tail_start) for s in stop) if j >= 0]
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
    steps = len(out) + (reason == "eos")  # tokens produced, the end token included
    return Generation(
        text=text, tokens=out, prompt_tokens=len(ids), finish_reason=reason,
        prefill_s=t_first - t0, decode_s=t_end - t_first, decode_steps=steps - 1,
        fallbacks=getattr(cache, "fallbacks", 0), max_dropped_mass=step.dropped_per_step()[: steps - 1],
    )
