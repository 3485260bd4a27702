"""Condensate sparse decode on the real SmolLM2 checkpoint: exactness, ring buffer, certificate,
equivalence on the paper's prompts, and multi-needle retrieval."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from parity import max_logit_diff, minirt_greedy

from minirt import CondensateCache, CondensateConfig, DenseCache
from minirt.config import PAPER_POLICY, ModelConfig
from minirt.kernels import reference
from minirt.equivalence import compare, full_reference, needle_retrieval
from minirt.generation import forced_steps
from minirt.kernels.reference import (bounded_select, certified_select, channel_scales, key_offsets, quantize_keys,
                                     ring_positions, shadow_bound, shadow_scores)
from minirt.workloads import NEEDLES, PAPER_PROMPTS, haystack_prompts, long_prompt, passkey_prompt

STORY = "The secret code is PHOENIX. Remember it. Once upon a time, in a small village by the sea, there lived"


@pytest.mark.parametrize("scope, selection, summary", [("group", "exact", "cache"), ("head", "exact", "cache"),
                                                      ("group", "int8", "cache"),
                                                      ("group", "pages", "cache"), ("head", "pages", "cache"),
                                                      ("group", "pages", "fp8"), ("group", "whole-pages", "fp8")])
def test_k_covering_the_context_equals_full(smollm2_llm, scope, selection, summary):
    """With k >= context length the sparse set is everything: same tokens, logits equal to rounding.
    W=8 makes the ring buffer wrap ~10 times over the 60 steps."""
    ids = smollm2_llm.tokenizer.encode(STORY)
    full_logits, full_tokens = minirt_greedy(smollm2_llm, ids, 60)
    policy = CondensateConfig(anchor=4, window=8, top_k=10_000, scope=scope, selection=selection, page_size=4,
                              summary_dtype=summary)
    cache = smollm2_llm.new_cache(len(ids) + 61, "sparse", policy, certify=True)
    logits, tokens = minirt_greedy(smollm2_llm, ids, 60, cache=cache)
    assert tokens == full_tokens
    assert max_logit_diff(full_logits, logits) <= 1e-4
    assert float(cache.dropped.max()) <= 1e-5


def test_tail_estimate_with_one_key_pages_equals_full(smollm2_llm):
    """Whole pages of one key with the tail estimate: every key outside the chosen pages, window and
    anchor is its own pseudo-key, so decoding is full attention (the page sums kept through prefill
    and decode steps)."""
    ids = smollm2_llm.tokenizer.encode(STORY)
    full_logits, full_tokens = minirt_greedy(smollm2_llm, ids, 30)
    policy = CondensateConfig(anchor=2, window=4, top_k=3, selection="whole-pages", page_size=1, tail=True,
                              summary_dtype="cache")
    cache = smollm2_llm.new_cache(len(ids) + 31, "sparse", policy, certify=True)
    logits, tokens = minirt_greedy(smollm2_llm, ids, 30, cache=cache)
    assert tokens == full_tokens
    assert max_logit_diff(full_logits, logits) <= 1e-4
    assert float(cache.dropped.max()) > 0.01  # the tail's keys count as left out of the exact set


def tiny_cfg() -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=10, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                       ffn_dim=32, max_seq_len=64, rotary_dim=8)


def test_ring_buffer_wraps_and_truncates():
    cfg = tiny_cfg()
    policy = CondensateConfig(anchor=2, window=5, top_k=3, selection="pages", page_size=4, summary_dtype="cache")
    cache = CondensateCache(cfg, policy, capacity=40)
    g = torch.Generator().manual_seed(0)
    for step in range(23):
        T = 3 if step == 0 else 1  # a short prefill, then decode steps
        cache.begin(T)
        for layer in range(cfg.n_layers):
            k, v = (torch.randn(1, 2, T, 8, generator=g) for _ in range(2))
            cache.attend(layer, torch.randn(1, 4, T, 8, generator=g), k, v)
        if T == 1:
            cache.end_step()
        cache.advance(T)

        pos = ring_positions(cache.seq_len, 5)
        held = pos[pos >= 0]
        assert sorted(held.tolist()) == list(range(max(0, cache.seq_len - 5), cache.seq_len))
        for slot in range(5):
            if pos[slot] >= 0:
                assert torch.equal(cache.ring_k[:, :, :, slot], cache.k[:, :, :, pos[slot]])
                assert torch.equal(cache.ring_v[:, :, :, slot], cache.v[:, :, :, pos[slot]])
    n = cache.seq_len
    assert torch.equal(cache.kmax[:, :, :, 1], cache.k[:, :, :, 4:8].amax(dim=3))
    cache.truncate(n - 7)
    pos = ring_positions(cache.seq_len, 5)
    for slot in range(5):
        assert torch.equal(cache.ring_k[:, :, :, slot], cache.k[:, :, :, pos[slot]])
    last = (cache.seq_len - 1) // 4
    assert torch.equal(cache.kmin[:, :, :, last], cache.k[:, :, :, last * 4:cache.seq_len].amin(dim=3))


@pytest.mark.parametrize("selection", ["exact", "pages"])
def test_copy_prefix_equals_own_prefill(selection):
    """A sparse cache filled from a dense one's prefill holds what its own prefill would: history,
    ring slots and every page summary."""
    cfg = tiny_cfg()
    policy = CondensateConfig(anchor=2, window=5, top_k=3, selection=selection, page_size=4, summary_dtype="fp8")
    dense, own, copied = DenseCache(cfg, 40), CondensateCache(cfg, policy, 40), CondensateCache(cfg, policy, 40)
    g = torch.Generator().manual_seed(1)
    for layer in range(cfg.n_layers):
        q, k, v = torch.randn(1, 4, 13, 8, generator=g), torch.randn(1, 2, 13, 8, generator=g), torch.randn(1, 2, 13, 8, generator=g)
        dense.attend(layer, q, k, v)
        own.attend(layer, q, k, v)
    dense.advance(13)
    own.advance(13)
    copied.copy_prefix(dense)
    assert copied.seq_len == 13
    for name in ("k", "v", "ring_k", "ring_v") + (("kmin", "kmax") if selection == "pages" else ()):
        a, b = getattr(own, name), getattr(copied, name)
        if name in ("k", "v"):
            a, b = a[:, :, :, :13], b[:, :, :, :13]
        if name in ("kmin", "kmax"):
            a, b = a[:, :, :, :4].float(), b[:, :, :, :4].float()
        assert torch.equal(a, b), name


def test_sparse_after_truncate_matches_fresh_prefill(smollm2_llm):
    """Rewinding the cache (ring rebuilt from history) gives the same logits as never having gone further."""
    ids = smollm2_llm.tokenizer.encode(STORY)
    policy = CondensateConfig(anchor=2, window=6, top_k=3)
    fresh = smollm2_llm.new_cache(len(ids) + 20, "sparse", policy)
    expected, _ = minirt_greedy(smollm2_llm, ids, 5, cache=fresh)
    reused = smollm2_llm.new_cache(len(ids) + 40, "sparse", policy)
    minirt_greedy(smollm2_llm, ids[:-3], 12, cache=reused)  # go elsewhere, then rewind
    reused.truncate(len(ids) - 3)
    got, _ = minirt_greedy(smollm2_llm, ids[-3:], 5, cache=reused)
    assert max_logit_diff(expected[1:], got[1:]) <= 1e-4
    assert max_logit_diff([expected[0][-3:]], [got[0]]) <= 1e-4


def test_certificate_with_zero_bound_is_full_attention(smollm2_llm):
    """max_dropped_mass=0 sends every head that dropped anything to full attention."""
    ids = smollm2_llm.tokenizer.encode(PAPER_PROMPTS["retrieval"])
    tight = CondensateConfig(anchor=4, window=16, top_k=4)
    plain = compare(smollm2_llm, ids, 12, tight)
    certified = compare(smollm2_llm, ids, 12, CondensateConfig(anchor=4, window=16, top_k=4, max_dropped_mass=0.0))
    assert plain.kl_max > 1e-3  # the tight budget alone does drift ...
    assert certified.fallbacks > 0 and certified.kl_max < 1e-6  # ... the certificate removes it
    assert certified.token_match == 1.0


def test_certificate_bound_trades_fallbacks_for_accuracy(smollm2_llm):
    ids = smollm2_llm.tokenizer.encode(PAPER_PROMPTS["retrieval"])
    plain = compare(smollm2_llm, ids, 12, CondensateConfig(anchor=4, window=16, top_k=4))
    bounded = compare(smollm2_llm, ids, 12, CondensateConfig(anchor=4, window=16, top_k=4, max_dropped_mass=0.1))
    assert 0 < bounded.fallbacks
    assert bounded.kl_mean < plain.kl_mean


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.05, 0.5])
def test_certified_select_is_the_union_of_each_heads_shortest_prefix(eps):
    """Against a plain loop: each head keeps its most probable candidates until what is left is
    <= eps; the group's list is the union of those sets (all of it fits under k_max here)."""
    torch.manual_seed(0)
    B, Hkv, G, cap, n, lo, hi = 1, 2, 3, 96, 80, 4, 60
    scores = (torch.randn(B, Hkv, G, cap) * 3).masked_fill(torch.arange(cap) >= n, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    idx = certified_select(scores, lse, torch.tensor([n, lo, hi]), eps, k_max=cap)
    for h in range(Hkv):
        union = set()
        for g in range(G):
            p = (scores[0, h, g] - lse[0, h, g]).exp()
            order = sorted(range(lo, hi), key=lambda j: -float(p[j]))
            kept = 0
            while kept < len(order) and float(p[order[kept:]].sum()) > eps:
                kept += 1
            union |= set(order[:kept])
            left = float(p[lo:hi].sum() - p[order[:kept]].sum()) if kept else float(p[lo:hi].sum())
            assert left <= eps + 1e-6
        got = set(idx[0, h][idx[0, h] >= 0].tolist())
        assert got == union


def test_certified_select_caps_the_list():
    """Heads that need more than k_max keys: the list is full, and each position in it is among the
    k_max best of some head (only those are ranked)."""
    torch.manual_seed(1)
    scores = torch.randn(1, 1, 2, 64)
    idx = certified_select(scores, torch.logsumexp(scores, -1), torch.tensor([64, 0, 64]), 1e-4, k_max=8)
    assert idx.shape == (1, 1, 8) and bool((idx >= 0).all())
    best = set(scores[0, 0].topk(8, dim=-1).indices.flatten().tolist())
    assert set(idx.flatten().tolist()) <= best


def test_certified_mode_matches_full_on_a_long_prompt(smollm2_llm):
    """Certified mode (exact selection, eps = 1e-3, at most 1024 distant keys) on 1K tokens of real
    Python source: the same greedy tokens as full attention, every head within eps with no
    fallback, and fewer keys attended than the context."""
    ids = long_prompt(smollm2_llm.tokenizer, "code", 1024)
    report = compare(smollm2_llm, ids, 16, replace(PAPER_POLICY, top_k=1024, max_dropped_mass=1e-3))
    assert report.token_match == 1.0 and report.fallbacks == 0
    assert report.dropped_mass_max <= 1e-3 * (1 + 1e-4)
    assert report.attended_keys < 0.8 * report.context


@pytest.mark.parametrize("scaled", [False, True])
def test_int8_keys_bound_every_logit(scaled):
    """The int8 copy's estimate of q·k / sqrt(D) is within its error bound for every key, including
    keys of mixed magnitude, an all-zero key, and keys past those the channel scales were set from
    (an outlier channel leaps 8x); with channel scales the bounds are tighter."""
    torch.manual_seed(2)
    k = torch.randn(1, 2, 40, 16) * torch.logspace(-3, 2, 40)[:, None]
    k[..., 3] *= 30  # an outlier channel
    k[0, 0, 5] = 0
    k[:, :, 30:, 3] *= 8
    q = torch.randn(1, 6, 16) * 5
    chan = channel_scales(k[:, :, :30], rotary_dim=12) if scaled else None
    kq, scale = quantize_keys(k, None if chan is None else chan[:, :, None])
    x = k if chan is None else k / chan[:, :, None]
    assert bool((x - kq.float() * scale[..., None]).abs().le(scale[..., None] / 2 * (1 + 1e-6)).all())
    est, err = shadow_scores(q, kq, scale, 40, chan)
    exact = (q.view(1, 2, 3, 16) @ k.transpose(-1, -2)) / 4
    assert bool(((est - exact).abs() <= err).all())
    if scaled:
        assert float(err.mean()) < 0.5 * float(shadow_scores(q, *quantize_keys(k), 40)[1].mean())


def test_key_offsets_keep_every_logit_bounded_and_tighten_the_bounds():
    """Keys sharing a large per-channel part (as key biases make) coded less their mid-range
    (key_offsets): the estimate with q·offset added back stays within its bound for every key,
    including later keys past the range the offsets came from, and the bounds are much tighter."""
    torch.manual_seed(5)
    k = torch.randn(1, 2, 60, 16) + torch.randn(1, 2, 1, 16) * 20
    k[:, :, 50:] *= 1.5  # past the first keys' range
    q = torch.randn(1, 6, 16) * 5
    offset = key_offsets(k[:, :, :40])
    assert torch.equal(offset, (k[:, :, :40].amax(2) + k[:, :, :40].amin(2)) / 2)
    chan = channel_scales(k[:, :, :40] - offset[:, :, None], rotary_dim=0)
    kq, scale = quantize_keys(k, chan[:, :, None], offset[:, :, None])
    est, err = shadow_scores(q, kq, scale, 60, chan, offset)
    exact = (q.view(1, 2, 3, 16) @ k.transpose(-1, -2)) / 4
    assert bool(((est - exact).abs() <= err).all())
    plain_chan = channel_scales(k[:, :, :40], rotary_dim=0)
    plain_err = shadow_scores(q, *quantize_keys(k, plain_chan[:, :, None]), 60, plain_chan)[1]
    assert float(err.mean()) < 0.3 * float(plain_err.mean())  # measured 0.23


def test_channel_scales():
    """Powers of two in [2^-10, 1], 1 on each head's largest channel, equal within each rotated pair
    (d, d + rotary_dim / 2), each pair's at least its larger channel's share of the largest."""
    torch.manual_seed(4)
    k = torch.randn(2, 3, 50, 16) * torch.logspace(-4, 1, 16)
    chan = channel_scales(k, rotary_dim=12)
    assert bool((chan == torch.exp2(torch.round(torch.log2(chan)))).all())
    assert bool((chan >= 2.0 ** -10).all()) and bool((chan.amax(-1) == 1).all())
    assert torch.equal(chan[..., :6], chan[..., 6:12])
    m = k.abs().amax(2)
    share = torch.maximum(m[..., :6], m[..., 6:12]) / m.amax(-1, keepdim=True)
    assert bool((chan[..., :6] >= share).all()) and bool((chan[..., :6] < 2 * share.clamp(min=2.0 ** -10)).all())


@pytest.mark.parametrize("eps", [1e-3, 0.05, 0.3])
def test_bounded_select_certifies_the_dropped_mass(eps, monkeypatch):
    """After attending what bounded_select chose, the bound is never below the exact dropped mass,
    for every head (random keys of a few magnitudes, anchor 2, window 8); with the kept mass
    counted at its lower bound (a margin of 1) it is also <= eps, and the default margin keeps
    fewer keys."""
    torch.manual_seed(3)
    B, Hkv, G, D, n, lo, W = 1, 2, 3, 16, 120, 2, 8
    k = torch.randn(B, Hkv, n, D) * torch.rand(B, Hkv, n, 1) * 3
    q = torch.randn(B, Hkv * G, D)
    bounds = torch.tensor([n, lo, n - W])
    est, err = shadow_scores(q, *quantize_keys(k), n)
    exact = (q.view(B, Hkv, G, D) @ k.transpose(-1, -2)) / D ** 0.5

    def select(margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(reference, "KEPT_MARGIN", margin)
        idx = bounded_select(est, err, bounds, eps, k_max=n)
        kept = torch.zeros(B, Hkv, n, dtype=torch.bool)
        kept[..., :lo] = kept[..., n - W:] = True
        kept.scatter_(-1, idx.clamp(min=0), idx >= 0)
        kept[..., :lo] = True
        lse = torch.logsumexp(exact.masked_fill(~kept[:, :, None], float("-inf")), -1).reshape(B, Hkv * G)
        dropped = 1 - torch.exp(lse - torch.logsumexp(exact, -1).reshape(B, Hkv * G))
        return idx, shadow_bound(est, err, bounds, idx, lse), dropped

    default = reference.KEPT_MARGIN
    idx, bound, dropped = select(1.0)
    assert bool((bound <= eps * (1 + 1e-5)).all()) and bool((bound >= dropped - 1e-6).all())
    assert int((idx >= 0).sum()) < Hkv * (n - lo - W)  # it did leave keys out
    idx_m, bound, dropped = select(default)
    assert bool((bound >= dropped - 1e-6).all())
    fewer = int((idx_m >= 0).sum()) < int((idx >= 0).sum())
    assert fewer or eps < 1e-2  # at eps 1e-3 both keep all but the clearly negligible


@pytest.mark.parametrize("selection, page_size", [("int8", 32), ("int8-threshold", 1), ("int8-threshold", 4)])
def test_int8_certified_mode_matches_full_without_exact_scores(smollm2_llm, selection, page_size):
    """Certified mode from the int8 copy (eps = 1e-3; keys ranked, or keys / pages of 4 by threshold)
    on 1K tokens of real Python source: the same tokens as full attention, and in every layer, head
    and step the bound it decided by is >= the exact dropped mass (measured beside it); no cap.
    Choosing with the kept mass at reference.KEPT_MARGIN may leave a head above eps (it falls back
    to full attention: counted once per head above eps), but rarely (ranked: 1 of 810 here)."""
    ids = long_prompt(smollm2_llm.tokenizer, "code", 1024)
    policy = replace(PAPER_POLICY, selection=selection, top_k=1024, page_size=page_size, max_dropped_mass=1e-3)
    report = compare(smollm2_llm, ids, 8, policy)
    assert report.token_match == 1.0 and report.dropped_mass_max <= 1e-3
    assert report.attended_keys < 0.8 * report.context
    cache = smollm2_llm.new_cache(len(ids) + 4, "sparse", policy, certify=True)
    steps = forced_steps(smollm2_llm, ids, [198, 198, 198], cache)
    next(steps)  # the prefill: full attention
    above = 0
    for _ in steps:
        exact, bound = cache.dropped[:, 0], cache.dropped_bound[:, 0]
        assert bool((bound >= exact - 1e-6).all())
        above += int((bound >= 1e-3).sum())
    assert cache.fallbacks == above <= 0.01 * 3 * bound.numel()


@pytest.mark.parametrize("kind", ["code", "prose"])
def test_threshold_tail_estimate_beats_dropping_at_equal_keys(smollm2_llm, kind):
    """Certified int8-threshold at eps = 0.03 on 1K tokens of real source / prose, with and without
    the tail estimate: the same keys attended (the estimate changes no selection), the same tokens
    as full attention, and the estimate's teacher-forced mean KL well under dropping's (measured
    2.2x and 4.5x lower)."""
    ids = long_prompt(smollm2_llm.tokenizer, kind, 1024)
    ref = full_reference(smollm2_llm, ids, 8)
    threshold = replace(PAPER_POLICY, selection="int8-threshold", page_size=1, max_dropped_mass=0.03)
    drop, tail = (compare(smollm2_llm, ids, 8, replace(threshold, tail=t), ref) for t in (False, True))
    assert abs(tail.attended_keys - drop.attended_keys) <= 0.02 * drop.attended_keys
    assert drop.token_match == tail.token_match == 1.0
    assert tail.kl_mean < 0.6 * drop.kl_mean


def test_int8_pages_at_zero_eps_is_full_attention(smollm2_llm):
    """eps = 0: every page is kept and still no head is certified (0 < 0 fails), so every head falls
    back to full attention: full attention's tokens and logits."""
    ids = smollm2_llm.tokenizer.encode(PAPER_PROMPTS["retrieval"])
    report = compare(smollm2_llm, ids, 8, CondensateConfig(anchor=4, window=16, selection="int8-threshold",
                                                           page_size=8, max_dropped_mass=0.0))
    assert report.token_match == 1.0 and report.kl_max < 1e-6 and report.fallbacks > 0


def test_dense_layers_drop_nothing(smollm2_llm):
    ids = smollm2_llm.tokenizer.encode(PAPER_PROMPTS["retrieval"])
    report = compare(smollm2_llm, ids, 3, CondensateConfig(window=16, top_k=4, dense_layers=(0, 5)))
    assert report.dropped_mass_by_layer[0] == 0 and report.dropped_mass_by_layer[5] == 0
    assert min(report.dropped_mass_by_layer[1:5]) > 0


def test_growing_budget():
    policy = CondensateConfig(top_k=16, budget_alpha=2.0, budget_exponent=0.5)
    assert policy.budget(16) == 16 and policy.budget(10_000) == 200 and policy.budget(10_001) == 201


@pytest.mark.parametrize("kwargs, message", [
    ({"window": 0}, "window"), ({"top_k": -1}, "top_k"), ({"scope": "layer"}, "scope"),
    ({"selection": "random"}, "selection"), ({"max_dropped_mass": 2.0}, "max_dropped_mass"),
    ({"budget_exponent": 1.5}, "budget_exponent"), ({"summary_dtype": "fp16"}, "summary_dtype"),
    ({"selection": "int8", "scope": "head"}, "int8"),
    ({"selection": "int8-threshold"}, "max_dropped_mass"),
    ({"selection": "int8-threshold", "scope": "head", "max_dropped_mass": 0.01}, "scope"),
    ({"tail": True}, "tail needs selection='whole-pages' or 'int8-threshold'"),
])
def test_bad_policy(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CondensateConfig(**kwargs)


# The paper's policy, A=4 W=128 k=32: the default window of 512 would cover these prompts whole.
# Thresholds set from measurement (EQUIVALENCE.md, SmolLM2-135M-Instruct, fp32, 200 steps): code
# and narrative matched 100% with max KL < 1e-3; retrieval (434-token prompt) agreed on 98.5% of
# teacher-forced steps, max KL 0.118, first divergence at step 29.

@pytest.mark.parametrize("prompt", ["code", "narrative"])
def test_paper_prompts_short_context(smollm2_llm, prompt):
    report = compare(smollm2_llm, smollm2_llm.tokenizer.encode(PAPER_PROMPTS[prompt]), 200, PAPER_POLICY)
    assert report.token_match >= 0.95
    assert report.teacher_forced_agreement >= 0.98
    assert report.kl_max <= 1e-2


def test_paper_retrieval_prompt(smollm2_llm):
    report = compare(smollm2_llm, smollm2_llm.tokenizer.encode(PAPER_PROMPTS["retrieval"]), 200, PAPER_POLICY)
    assert report.full_text.lstrip().startswith("PHOENIX") and report.sparse_text.lstrip().startswith("PHOENIX")
    assert report.teacher_forced_agreement >= 0.95
    assert report.kl_max <= 0.3
    assert report.first_divergence is None or report.first_divergence.step >= 10


def test_multi_needle(smollm2_llm):
    full = needle_retrieval(smollm2_llm, None)
    sparse = needle_retrieval(smollm2_llm, PAPER_POLICY)
    window_only = needle_retrieval(smollm2_llm, replace(PAPER_POLICY, top_k=0))
    found = [a for a, ok in full.items() if ok]
    assert len(found) >= 3, full  # the model can do the task at all
    assert all(sparse[a] for a in found), (full, sparse)
    # every needle sits > 300 tokens before the question, outside the 128-token window
    assert sum(not window_only[a] for a in found) >= 2, (full, window_only)


@pytest.mark.parametrize("n", [1024, 2048])
def test_qwen_long_context(qwen_llm, n):
    """Qwen2.5-Coder-0.5B (qwen2, 14q/2kv: 7 heads per group) on the first n tokens of a real source
    file. The certificate at 0 is full attention exactly; the defaults leave attention mass out at
    these lengths with the paper's window of 128 (a head's whole mass, 1.0, at 2K)."""
    ids = long_prompt(qwen_llm.tokenizer, "code", n)
    ref = full_reference(qwen_llm, ids, 6)
    certified = compare(qwen_llm, ids, 6, CondensateConfig(max_dropped_mass=0.0), ref)
    assert certified.token_match == 1.0 and certified.kl_max < 1e-6 and certified.fallbacks > 0
    plain = compare(qwen_llm, ids, 6, PAPER_POLICY, ref)
    assert plain.dropped_mass_max > 0.5 and plain.attended_keys < 0.2 * plain.context


@pytest.mark.parametrize("summary, selection", [("cache", "pages"), ("fp8", "pages"), ("fp8", "whole-pages")])
def test_page_bound_never_below_the_exact_dropped_mass(smollm2_llm, summary, selection):
    """Issue #11's bound, on real weights at a real length: over 10 decode steps after 1.5K tokens
    of Python source, in every layer and head, the bound from the page summaries is never below the
    exact dropped mass. (How loose it is is printed: with min/max summaries it is near 1.)"""
    llm = smollm2_llm
    ids = long_prompt(llm.tokenizer, "code", 1500)
    policy = CondensateConfig(window=64, top_k=16 if selection == "pages" else 64, selection=selection, page_size=16,
                              page_oversample=4, summary_dtype=summary)
    ref = full_reference(llm, ids, 10)
    cache = llm.new_cache(len(ids) + 10, "sparse", policy, certify=True)
    cache.copy_prefix(ref.prompt_cache)
    exact, bound = [], []
    for i, _ in enumerate(forced_steps(llm, ids, ref.tokens[:-1], cache, prefilled=ref.first_logits)):
        if i:
            exact.append(cache.dropped.clone())
            bound.append(cache.dropped_bound.clone())
    exact, bound = torch.stack(exact), torch.stack(bound)
    assert not bound.isnan().any()
    assert (bound >= exact - 1e-5).all(), float((exact - bound).max())
    assert exact.max() > 0.1 and (bound <= 1).all()
    print(f"{summary} {selection}: exact dropped mass mean {exact.mean():.3f} (max {exact.max():.3f}), bound mean "
          f"{bound.mean():.3f}, below 0.5 for {100 * (bound < 0.5).float().mean():.1f}% of (step, layer, head)")


@pytest.mark.parametrize("n", [1024, 3000])
def test_long_context_workloads_fit_and_hold_their_facts(smollm2_llm, n):
    """Pass-key and haystack prompts stay within n tokens, state the key near its depth, and the
    five haystack prompts share everything up to their questions."""
    tok = smollm2_llm.tokenizer
    key = "68231"
    for depth in (0.1, 0.9):
        ids = passkey_prompt(tok, n, depth, key)
        text = tok.decode(ids)
        assert 0.8 * n <= len(ids) <= n and text.count(key) == 2
        assert abs(text.index(key) / len(text) - depth) < 0.1
    prompts = haystack_prompts(tok, n)
    assert all(len(p) <= n for p in prompts)
    texts = [tok.decode(p) for p in prompts]
    assert all(all(needle.fact in t for needle in NEEDLES) for t in texts)
    assert all(p[: int(0.8 * n)] == prompts[0][: int(0.8 * n)] for p in prompts)
