"""The one decode step: every path (generate, stream_tokens, teacher forcing) goes through it and
agrees; its launches do not depend on the live length; on a GPU its CUDA graph gives the eager
step's tokens with no host sync inside."""
from __future__ import annotations

import pytest
import torch

from minirt import LLM, CondensateConfig, Sampling, generate, stream_tokens
from minirt.generation import DecodeStep, forced_steps, prefill
from minirt.kernels import triton_attention as tri

POLICIES = {
    "full": None,
    "exact": CondensateConfig(anchor=2, window=8, top_k=4),
    "pages-fp8": CondensateConfig(anchor=2, window=8, top_k=4, selection="pages", page_size=4),
    "whole-pages-fp8": CondensateConfig(anchor=2, window=8, top_k=8, selection="whole-pages", page_size=4),
    "certified": CondensateConfig(anchor=2, window=8, top_k=4, max_dropped_mass=0.05),
    "certified-int8": CondensateConfig(anchor=2, window=8, top_k=4, selection="int8", max_dropped_mass=0.05),
    "certified-int8-threshold": CondensateConfig(anchor=2, window=8, selection="int8-threshold", page_size=4,
                                             max_dropped_mass=0.05),
    "certified-int8-threshold-tail": CondensateConfig(anchor=2, window=8, selection="int8-threshold", page_size=1,
                                                  max_dropped_mass=0.3, tail=True),
}


def new_cache(llm, policy, capacity):
    return llm.new_cache(capacity, "full" if policy is None else "sparse", policy)


@pytest.mark.parametrize("name", list(POLICIES))
def test_launches_do_not_depend_on_the_length(tiny_checkpoint, monkeypatch, name):
    """Decode steps at lengths 18 and 71 (the window wrapped, pages begun, selection ranges grown)
    launch the same kernels with the same grids, scalar arguments and constexprs: lengths are read
    from memory."""
    monkeypatch.setenv("MINIRT_KERNELS", "triton")  # on the CPU, Triton's interpreter
    llm = LLM.load(tiny_checkpoint("llama"), device="cuda" if torch.cuda.is_available() else "cpu", dtype="fp32")
    cache = new_cache(llm, POLICIES[name], 100)
    step = DecodeStep(llm, cache, graph=False)  # eager: every launch goes through Python, where it is recorded
    step.choose(prefill(llm, list(range(3, 20)), cache)[None])
    seen = []
    try:
        for length in (None, 70):
            if length is not None:  # jump ahead: positions 18..69 filled directly, as a benchmark's cache is
                cache.k[:, :, :, cache.seq_len:length].normal_()
                cache.v[:, :, :, cache.seq_len:length].normal_()
                cache.hold(length)
            tri.LAUNCHES = []
            step()
            seen.append(tri.LAUNCHES)
    finally:
        tri.LAUNCHES = None
    assert seen[0] and seen[1] == seen[0], "a launch changed with the length"


@pytest.mark.parametrize("name", ["full", "exact", "pages-fp8"])
def test_every_path_gives_the_same_tokens(smollm2_llm, name):
    """generate(), stream_tokens and teacher forcing on generate's own tokens agree token for token."""
    llm, policy = smollm2_llm, POLICIES[name]
    ids = llm.tokenizer.encode("The old lighthouse keeper counted the ships that passed each night, and")
    out = generate(llm, ids, 24, attention="full" if policy is None else "sparse", policy=policy)
    assert out.finish_reason == "length"
    streamed = [t for t, _ in stream_tokens(llm, ids, new_cache(llm, policy, len(ids) + 24), 24)]
    forced = [int(x.argmax()) for x in forced_steps(llm, ids, out.tokens[:-1], new_cache(llm, policy, len(ids) + 24))]
    assert out.tokens == streamed == forced


def test_certificate_is_read_once_per_decode_step(smollm2_llm):
    """generate() reports the largest dropped mass of each decode step it used, from the device."""
    out = generate(smollm2_llm, "The old lighthouse keeper counted the ships", 12, policy=POLICIES["certified"])
    assert len(out.max_dropped_mass) == out.decode_steps == len(out.tokens) - 1
    assert all(0 <= m <= 1 for m in out.max_dropped_mass) and max(out.max_dropped_mass) > 0


def test_sampled_generation_is_seeded_through_the_step(smollm2_llm):
    s = Sampling(temperature=0.8, top_p=0.9, seed=3)
    a, b = (generate(smollm2_llm, "Once upon a time", 12, sampling=s).tokens for _ in range(2))
    assert a == b


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@needs_cuda
@pytest.mark.parametrize("name", list(POLICIES))
def test_graph_equals_eager_without_host_syncs(tiny_checkpoint, name):
    llm = LLM.load(tiny_checkpoint("llama"), device="cuda", dtype="fp32")
    ids = list(range(3, 40))
    runs = {}
    for graph in (False, True):
        cache = new_cache(llm, POLICIES[name], 120)
        step = DecodeStep(llm, cache, graph=graph)
        step.choose(prefill(llm, ids, cache)[None])
        tokens = []
        for i in range(60):
            if i == 2:  # compiled by now; with a graph, captured at the second step and replayed since
                torch.cuda.set_sync_debug_mode("error")
            step()
            tokens.append(step.next.clone())
        torch.cuda.set_sync_debug_mode("default")
        runs[graph] = torch.cat(tokens).tolist()
    assert runs[True] == runs[False]


@needs_cuda
def test_seeded_sampling_in_the_graph_equals_eager(tiny_checkpoint):
    """Temperature/top-p sampling inside the CUDA graph draws from the step's seeded generator as
    the eager step does: the same seed gives the same tokens."""
    llm = LLM.load(tiny_checkpoint("llama"), device="cuda", dtype="fp32")
    sampling = Sampling(temperature=1.0, top_p=0.95, seed=11)
    runs = {}
    for graph in (False, True):
        cache = new_cache(llm, None, 120)
        step = DecodeStep(llm, cache, sampling, graph=graph)
        step.choose(prefill(llm, list(range(3, 40)), cache)[None])
        tokens = []
        for _ in range(40):
            step()
            tokens.append(step.next.clone())
        runs[graph] = torch.cat(tokens).tolist()
    assert runs[True] == runs[False]
    assert len(set(runs[True])) > 5  # it did sample
