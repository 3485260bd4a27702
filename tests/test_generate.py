"""generate(): sampling, stops, streaming, limits, on the real SmolLM2 checkpoint."""
from __future__ import annotations

import pytest
import torch

from minirt import CondensateConfig, Sampling, generate, stream_tokens
from minirt.generation import PromptTooLongError, sample_tokens


def test_greedy_full_matches_transformers_generate(smollm2_llm, smollm2_ref):
    prompt = "def fibonacci(n):\n"
    ids = smollm2_llm.tokenizer.encode(prompt)
    ref = smollm2_ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    out = generate(smollm2_llm, prompt, 24, attention="full")
    if out.finish_reason == "eos":  # transformers keeps the end token, minirt does not
        assert ref[: len(out.tokens)] == out.tokens and ref[len(out.tokens)] in smollm2_llm.eos_ids
    else:
        assert out.finish_reason == "length" and out.tokens == ref and len(ref) == 24
    assert out.text == smollm2_llm.tokenizer.decode(out.tokens)


def test_streamed_text_equals_final_text(smollm2_llm):
    pieces = []
    out = generate(smollm2_llm, "Once upon a time", 20, on_text=pieces.append)
    assert "".join(pieces) == out.text and out.text


def test_stop_string(smollm2_llm):
    full = generate(smollm2_llm, "List three colors:\n1.", 30, attention="full")
    assert "\n" in full.text
    stopped = generate(smollm2_llm, "List three colors:\n1.", 30, attention="full", stop=["\n"])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index("\n")]


def test_chat_stops_at_eos(smollm2_llm):
    out = generate(smollm2_llm, "What is the capital of France?", 60, chat=True)
    assert out.finish_reason == "eos"
    assert "Paris" in out.text


def test_seeded_sampling_is_reproducible(smollm2_llm):
    s = Sampling(temperature=0.9, top_k=40, top_p=0.95, seed=7)
    a = generate(smollm2_llm, "The weather today", 16, sampling=s)
    b = generate(smollm2_llm, "The weather today", 16, sampling=s)
    c = generate(smollm2_llm, "The weather today", 16, sampling=Sampling(temperature=0.9, top_k=40, top_p=0.95, seed=8))
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([4.0, 3.0, 2.0, -1.0, -2.0]).expand(2000, 5)
    g = torch.Generator().manual_seed(0)

    def support(s: Sampling) -> set[int]:
        return set(sample_tokens(logits, s, g).tolist())

    assert support(Sampling(1.0, top_k=2)) == {0, 1}
    # p = softmax: [0.66, 0.24, 0.09, ...]: top_p 0.8 keeps the first two
    assert support(Sampling(1.0, top_p=0.8)) == {0, 1}
    assert support(Sampling(1.0, top_p=0.5)) == {0}


def test_sampling_draws_the_softmax_distribution():
    """The exponential race picks token i with probability softmax(logits / T)_i."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(1)
    draws = sample_tokens(logits.expand(40_000, 4), Sampling(temperature=0.7), g)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, torch.softmax(logits / 0.7, -1), atol=0.01)


def test_token_id_prompt_and_iterator(smollm2_llm):
    ids = smollm2_llm.tokenizer.encode("Hello there")
    cache = smollm2_llm.new_cache(len(ids) + 5)
    tokens = [t for t, _ in stream_tokens(smollm2_llm, ids, cache, 5)]
    assert generate(smollm2_llm, ids, 5, attention="full").tokens == [t for t in tokens if t not in smollm2_llm.eos_ids][:5]


def test_prompt_too_long(smollm2_llm):
    ids = [100] * (smollm2_llm.cfg.max_seq_len - 3)
    with pytest.raises(PromptTooLongError, match="exceeds the model's 8192-position limit"):
        generate(smollm2_llm, ids, 10)


def test_bad_inputs(smollm2_llm):
    with pytest.raises(ValueError, match="empty"):
        generate(smollm2_llm, "", 5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(smollm2_llm, [1, 10**6], 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(smollm2_llm, "hi", 0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)


def test_greedy_calls_reuse_one_cache_and_decode_step(smollm2_llm):
    """A greedy generate() keeps its cache and decode step on the LLM; the next call of the same
    shape (attention, policy, block of positions) gets them back emptied and decodes exactly what
    a fresh pair does, even after a longer prompt left keys, ring slots and page summaries behind.
    Another shape replaces the pair; sampled calls keep none."""
    llm = smollm2_llm
    long_prompt = " ".join(f"item{i} = {i * 7 % 13}" for i in range(120))  # past the window: pages and top-k work
    short_prompt = " ".join(f"x{i}" for i in range(90))
    llm.decode_session = None
    first = generate(llm, long_prompt, 12, attention="sparse")
    held = llm.decode_session
    assert held is not None and first.prompt_tokens > 300
    reused = generate(llm, short_prompt, 12, attention="sparse")
    assert llm.decode_session is held
    llm.decode_session = None
    fresh = generate(llm, short_prompt, 12, attention="sparse")
    assert reused.tokens == fresh.tokens and reused.text == fresh.text
    assert generate(llm, long_prompt, 12, attention="sparse").tokens == first.tokens
    generate(llm, short_prompt, 12, attention="full")
    assert llm.decode_session is not None and llm.decode_session[0] != held[0]
    generate(llm, short_prompt, 4, sampling=Sampling(temperature=0.8, seed=3))
    assert llm.decode_session is None


def test_certified_calls_reuse_the_session_with_fresh_counts(smollm2_llm):
    """A greedy certified call is kept too: the next one of the same shape decodes the same tokens
    with its own fallback count and dropped masses, not the sum of both calls'."""
    llm = smollm2_llm
    prompt = " ".join(f"item{i} = {i * 7 % 13}" for i in range(60))
    policy = CondensateConfig(window=16, top_k=64, max_dropped_mass=1e-3)  # falls back now and then
    llm.decode_session = None
    first = generate(llm, prompt, 10, policy=policy)
    held = llm.decode_session
    again = generate(llm, prompt, 10, policy=policy)
    assert llm.decode_session is held is not None
    llm.decode_session = None
    assert again.tokens == first.tokens and again.fallbacks == first.fallbacks > 0
    assert again.max_dropped_mass == first.max_dropped_mass and len(again.max_dropped_mass) == again.decode_steps
