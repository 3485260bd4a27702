"""Triton kernels against their PyTorch references (TRITON_INTERPRET=1 on CPU, or a GPU).

Fresh random inputs each case; errors are relative to a float64 reference; outputs are poisoned
with NaN first so an element the kernel never wrote fails."""
from __future__ import annotations

import pytest
import torch

from minirt.kernels import reference as ref
from minirt.kernels import triton_attention as tri

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}

# (batch, kv heads, group size G, head dim, cached length n, dtype): ragged lengths, GQA 1/4/7/8,
# head dims 64/80/128, every dtype.
CASES = [
    (1, 2, 1, 64, 1, torch.float32), (1, 1, 4, 64, 37, torch.float16), (2, 2, 7, 80, 130, torch.bfloat16),
    (1, 2, 8, 128, 333, torch.float32), (2, 1, 8, 64, 257, torch.float16), (1, 3, 3, 64, 200, torch.bfloat16),
    (1, 1, 1, 80, 65, torch.float16), (2, 2, 4, 128, 96, torch.float32), (1, 4, 7, 64, 511, torch.float32),
]


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    assert not torch.isnan(x).any(), "unwritten (NaN-poisoned) or NaN output"
    return float((x.double() - y.double()).norm() / y.double().norm())


def make_cache(B, Hkv, n, D, dtype, g, capacity_extra=7):
    """K/V as strided views into a larger preallocated cache, like the runtime's."""
    store = torch.randn(2, B, Hkv, n + capacity_extra, D, generator=g).to(dtype).to(DEVICE)
    return store[0, :, :, :n], store[1, :, :, :n]


@pytest.mark.parametrize("B, Hkv, G, D, n, dtype", CASES)
def test_decode_attention(B, Hkv, G, D, n, dtype):
    g = torch.Generator().manual_seed(n * 31 + D)
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype).to(DEVICE)
    k, v = make_cache(B, Hkv, n, D, dtype, g)
    out = torch.full_like(q, float("nan"))
    got, lse = tri.decode_attention(q, k, v, out=out)
    want, want_lse = ref.decode_attention(q.double(), k.double(), v.double())
    assert got.data_ptr() == out.data_ptr()
    assert rel_err(got, want) <= TOL[dtype]
    assert rel_err(lse, want_lse) <= TOL[dtype]


@pytest.mark.parametrize("B, Hkv, G, D, n, dtype", CASES[1:])
def test_sparse_attention(B, Hkv, G, D, n, dtype):
    g = torch.Generator().manual_seed(n * 7 + G)
    W, K = 16, 24
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype).to(DEVICE)
    k, v = make_cache(B, Hkv, n, D, dtype, g)
    ring_k, ring_v = make_cache(B, Hkv, W, D, dtype, g, capacity_extra=0)
    ring_valid = (torch.rand(W, generator=g) > 0.3).to(DEVICE)
    ring_valid[0] = True
    idx = torch.stack([torch.randperm(n, generator=g)[:K] if n >= K else torch.arange(K) % n
                       for _ in range(B * Hkv)]).view(B, Hkv, K)
    idx[..., -3:] = -1  # unused slots
    idx = idx.to(DEVICE)
    out = torch.full_like(q, float("nan"))
    got, lse = tri.sparse_attention(q, ring_k, ring_v, ring_valid, k, v, idx, out=out)
    want, want_lse = ref.sparse_attention(q.double(), ring_k.double(), ring_v.double(), ring_valid,
                                          k.double(), v.double(), idx)
    assert rel_err(got, want) <= TOL[dtype]
    assert rel_err(lse, want_lse) <= TOL[dtype]


@pytest.mark.parametrize("B, Hkv, G, D, n, dtype", CASES[1:6])
def test_scores_and_page_bounds(B, Hkv, G, D, n, dtype):
    g = torch.Generator().manual_seed(n + G)
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype).to(DEVICE)
    k, _ = make_cache(B, Hkv, n, D, dtype, g)
    assert rel_err(tri.group_max_scores(q, k), ref.group_max_scores(q.double(), k.double())) <= TOL[dtype]
    idx = torch.randint(0, n, (B, Hkv, 50), generator=g).to(DEVICE)
    assert rel_err(tri.gathered_group_max_scores(q, k, idx), ref.gathered_group_max_scores(q.double(), k.double(), idx)) <= TOL[dtype]
    lo, hi = torch.randn(2, B, Hkv, 9, D, generator=g).sort(dim=0).values.to(dtype).to(DEVICE)
    bound = tri.page_bounds(q, lo, hi)
    assert rel_err(bound, ref.page_bounds(q.double(), lo.double(), hi.double())) <= TOL[dtype]


def test_page_bound_is_an_upper_bound():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 64, generator=g), torch.randn(1, 2, 96, 64, generator=g)
    pages = k.unflatten(2, (3, 32))
    bound = ref.page_bounds(q, pages.amin(3), pages.amax(3))
    true_max = ref.group_max_scores(q, k).unflatten(2, (3, 32)).amax(-1)
    assert (bound >= true_max - 1e-5).all()


def test_page_topk_triton_matches_reference():
    g = torch.Generator().manual_seed(5)
    B, Hkv, G, D, n, P = 1, 2, 4, 64, 300, 16
    q = torch.randn(B, Hkv * G, D, generator=g).to(DEVICE)
    k = torch.randn(B, Hkv, n, D, generator=g).to(DEVICE)
    pages = torch.cat((k, k[:, :, -1:].expand(-1, -1, 20, -1)), 2).unflatten(2, (20, P))
    args = (q, k, pages.amin(3), pages.amax(3), 4, 250, 12, P, 2.0, "group")
    want = ref.page_topk(*args)
    got = ref.page_topk(*args, bounds_fn=tri.page_bounds, scores_at_fn=tri.gathered_group_max_scores)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    assert ((want >= 4) & (want < 250)).all()


@pytest.mark.parametrize("attention, policy", [
    ("full", None),
    ("sparse", dict(anchor=2, window=8, top_k=4)),
    ("sparse", dict(anchor=2, window=8, top_k=4, selection="pages", page_size=4)),
])
def test_runtime_through_triton_kernels(tiny_checkpoint, monkeypatch, attention, policy):
    """The model's attention calls reach the Triton kernels and give the reference path's logits."""
    from parity import max_logit_diff, minirt_greedy

    from minirt import LLM, CondensateConfig

    llm = LLM.load(tiny_checkpoint("llama"), device=DEVICE, dtype="fp32")
    ids = list(range(3, 33))
    runs = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("MINIRT_KERNELS", mode)
        cache = llm.new_cache(len(ids) + 16, attention, CondensateConfig(**policy) if policy else None)
        runs[mode] = minirt_greedy(llm, ids, 15, cache=cache)
    assert runs["triton"][1] == runs["reference"][1]
    assert max_logit_diff(runs["triton"][0], runs["reference"][0]) <= 1e-4
