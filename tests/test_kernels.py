"""Triton kernels against their PyTorch references (TRITON_INTERPRET=1 on CPU, or a GPU).

Fresh random inputs each case; errors are relative to a float64 reference; outputs are poisoned
with NaN first so an element the kernel never wrote fails."""
from __future__ import annotations


import pytest
import torch
import triton
import triton.language as tl

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


@pytest.mark.parametrize("n", [37, 3000])  # one split, several splits
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_fall_back(n, eps):
    """Certified mode's fallback: the heads whose dropped mass is not below eps (NaN included; every
    head at eps = 0) get full attention in place, the others' rows stay as they were, and the
    count grows by their number, as the reference's."""
    B, Hkv, G, D, dtype = 2, 3, 4, 64, torch.float16
    g = torch.Generator().manual_seed(n)
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype).to(DEVICE)
    k, v = make_cache(B, Hkv, n, D, dtype, g)
    dropped = torch.rand(B, Hkv * G, generator=g) * 0.1
    dropped[0, G:2 * G] = 0.01  # a KV group where no head falls back
    dropped[1, 3] = float("nan")
    dropped = dropped.to(DEVICE)
    out = torch.randn(B, Hkv * G, D, generator=g).to(dtype).to(DEVICE)
    count = torch.full((), 5, dtype=torch.int64, device=DEVICE)
    want_count = count.clone()
    got = tri.fall_back(q, k, v, n, out.clone(), dropped, eps, count)
    want = ref.fall_back(q.double(), k.double(), v.double(), n, out.double(), dropped, eps, want_count)
    fall = ~(dropped < eps)
    assert 0 < int(fall.sum()) and (eps == 0 or not fall.all())
    assert int(count) == int(want_count) == 5 + int(fall.sum())
    assert torch.equal(got[~fall], out[~fall])
    assert rel_err(got[fall], want[fall]) <= TOL[dtype]


@pytest.mark.parametrize("B, Hkv, G, D, n, dtype", CASES[1:])
def test_sparse_attention(B, Hkv, G, D, n, dtype):
    g = torch.Generator().manual_seed(n * 7 + G)
    W, K, anchor = 16, 24, 4
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype).to(DEVICE)
    k, v = make_cache(B, Hkv, n, D, dtype, g)
    ring_k, ring_v = make_cache(B, Hkv, W, D, dtype, g, capacity_extra=0)
    # distinct positions, some inside the anchor or the window (must be ignored)
    idx = torch.stack([torch.randperm(n, generator=g)[:K] if n >= K else torch.arange(K) % n
                       for _ in range(B * Hkv)]).view(B, Hkv, K)
    idx[..., -3:] = -1  # unused slots
    idx = idx.to(DEVICE)
    out = torch.full_like(q, float("nan"))
    got, lse = tri.sparse_attention(q, ring_k, ring_v, k, v, idx, n, anchor, out=out)
    want, want_lse = ref.sparse_attention(q.double(), ring_k.double(), ring_v.double(), k.double(), v.double(),
                                          idx, n, anchor)
    assert rel_err(got, want) <= TOL[dtype]
    assert rel_err(lse, want_lse) <= TOL[dtype]


def test_sparse_attention_reference_is_exact_softmax_over_the_union():
    """The reference itself against a dense softmax restricted to the intended position set."""
    g = torch.Generator().manual_seed(11)
    B, Hkv, G, D, n, W, anchor = 1, 2, 3, 16, 40, 8, 3
    q, k, v = torch.randn(B, Hkv * G, D, generator=g), torch.randn(B, Hkv, n, D, generator=g), torch.randn(B, Hkv, n, D, generator=g)
    slots = torch.arange(n - W, n) % W
    ring_k, ring_v = torch.empty(B, Hkv, W, D), torch.empty(B, Hkv, W, D)
    ring_k[:, :, slots], ring_v[:, :, slots] = k[:, :, n - W:], v[:, :, n - W:]
    idx = torch.tensor([[[5, 17, 1, 35, -1], [10, 11, 12, 39, 3]]])  # 1 (anchor), 35, 39 (window), -1 ignored
    got, _ = ref.sparse_attention(q, ring_k, ring_v, k, v, idx, n, anchor)
    for h, chosen in enumerate(([5, 17], [10, 11, 12, 3])):
        keep = torch.zeros(n, dtype=torch.bool)
        keep[:anchor], keep[n - W:], keep[chosen] = True, True, True
        s = (q[0, h * G:(h + 1) * G] @ k[0, h].T / D ** 0.5).masked_fill(~keep, float("-inf"))
        assert torch.allclose(got[0, h * G:(h + 1) * G], torch.softmax(s, -1) @ v[0, h], atol=1e-6)


@triton.jit
def _int8_to(X, Y):
    i = tl.arange(0, 256)
    tl.store(Y + i, tri._from_int8(tl.load(X + i), Y.dtype.element_ty))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_conversion_is_exact_for_every_byte(dtype):
    """The int8 keys' conversion (on the GPU four bytes at a time by inline PTX) gives every value
    -128..127 exactly."""
    x = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).roll(77).to(DEVICE)
    y = torch.full((256,), float("nan"), dtype=dtype, device=DEVICE)
    _int8_to[(1,)](x, y)
    assert torch.equal(y.float(), x.float())


def dyadic_int8_keys(B, Hkv, G, D, cap, g, spikes=slice(0)):
    """Queries on a 1/8 grid, int8 keys with power-of-two scales, channel scales and offsets on a
    1/4 grid (and the keys they stand for): every logit estimate is exact in both twins, so their
    page bins must agree bit for bit. Keys at `spikes` are scaled 64x."""
    k = torch.randn(B, Hkv, cap, D, generator=g) * torch.rand(B, Hkv, cap, 1, generator=g) * 3
    kq, scale = ref.quantize_keys(k)
    scale = torch.exp2(torch.round(torch.log2(scale)))
    scale[:, :, spikes] *= 64
    chan = torch.exp2(-torch.randint(0, 4, (B, Hkv, D), generator=g).float())
    q = torch.round(torch.randn(B, Hkv * G, D, generator=g) * 8) / 8
    offset = torch.round(torch.randn(B, Hkv, D, generator=g) * 8) / 4
    keys = kq.float() * scale[..., None] * chan[:, :, None] + offset[:, :, None]
    return tuple(x.to(DEVICE) for x in (q, kq, scale, chan, offset, keys))


@pytest.mark.parametrize("B, Hkv, G, n, P, window, spikes, loud", [
    (1, 2, 3, 650, 16, 32, slice(0), 1), (2, 1, 7, 1500, 32, 128, slice(0), 1), (1, 2, 8, 90, 5, 8, slice(0), 1),
    (1, 1, 4, 2, 16, 8, slice(0), 1), (1, 2, 4, 1100, 1, 64, slice(0), 1),
    (1, 2, 3, 1400, 1, 64, slice(700, 704), 1),  # the tops leap by hundreds of bins inside a block
    (1, 2, 4, 900, 1, 64, slice(0), 64),  # one head's logits 64x the others': its shift is hundreds of bins
])
@pytest.mark.parametrize("eps", [0.0, 1e-3, 1e-2, 0.3, 1.0])
def test_page_threshold(B, Hkv, G, n, P, window, spikes, loud, eps):
    """Certified page selection from int8 copies: the two-launch kernel (per-block histograms,
    aligned and summed) gives the reference's page bins, thresholds and rest, at every eps (0 keeps
    every page; 1 keeps none), with ragged last pages, a cache of 2 positions, tops that rise
    past every bin within a block and heads whose tops lie hundreds of nats apart; both write the
    newest key's int8 copy alike."""
    check_page_threshold(B, Hkv, G, n, P, window, spikes, loud, eps, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("P", [1, 16])
def test_page_threshold_half_queries(P, dtype):
    """As test_page_threshold with fp16 and bf16 queries (their own int8 conversion on the GPU);
    the dyadic queries are exact in both."""
    check_page_threshold(1, 2, 7, 1300, P, 64, slice(0), 1, 1e-2, dtype)


def check_page_threshold(B, Hkv, G, n, P, window, spikes, loud, eps, dtype):
    g = torch.Generator().manual_seed(n + P)
    q, kq, scale, chan, offset, k = dyadic_int8_keys(B, Hkv, G, 64, n + 9, g, spikes)
    q[:, 1] *= loud
    q, k = q.to(dtype), k.to(dtype)
    k[:, :, n - 1] = torch.randn(B, Hkv, 64, generator=g).to(DEVICE) * 3  # a key without its copy yet
    bounds = ref.step_bounds(*ref.sparse_bounds(n, 4, window), DEVICE)
    copies = {twin: (kq.clone(), scale.clone()) for twin in ("ref", "tri")}
    want = ref.page_threshold(q, k, *copies["ref"], chan, offset, bounds, eps, P)
    got = tri.page_threshold(q, k, *copies["tri"], chan, offset, bounds, eps, P)
    new_kq, new_scale = ref.quantize_keys(k[:, :, n - 1], chan, offset)
    for twin_kq, twin_scale in copies.values():
        assert torch.equal(twin_kq[:, :, n - 1], new_kq) and torch.equal(twin_scale[:, :, n - 1], new_scale)
        assert torch.equal(twin_kq[:, :, :n - 1], kq[:, :, :n - 1])  # nothing else written
    scored = -(-(n - 1) // P)  # pages holding positions [0, n - 1): the kernel writes only those
    assert torch.equal(got[0][..., :scored], want[0][..., :scored])
    assert torch.equal(got[1], want[1])
    # U relative to the head's largest bound: each exp is rounded outward to bf16, and the twins'
    # fp32 exps may differ by an ulp, so land one bf16 step (at most 2^-7 of the value) apart; far
    # below the top (past fp32's normal range, a share of 1e-36) they may flush to zero differently
    assert torch.equal(torch.isfinite(got[2]), torch.isfinite(want[2]))
    est, err = ref.shadow_scores(q, kq, scale, n - 1, chan, offset)
    top = (est + err).amax(-1).view(B, -1)
    assert torch.allclose(torch.exp(got[2] - top), torch.exp(want[2] - top), rtol=2 ** -7, atol=2 ** -120)


@pytest.mark.parametrize("B, Hkv, G, n, P, window, spikes", [
    (1, 2, 3, 650, 16, 32, slice(0)), (2, 1, 7, 1500, 32, 128, slice(0)), (1, 2, 3, 1400, 1, 64, slice(700, 704)),
])
@pytest.mark.parametrize("eps", [1e-2, 0.3])
def test_page_threshold_tail(B, Hkv, G, n, P, window, spikes, eps):
    """With the tail's buffers the twins also agree on each head's suffix sums of exp(u) and exp(l)
    over the bins, the group's top bin and the candidates' value sum (started from stale buffers:
    upto = -1 sums all of [lo, hi))."""
    g = torch.Generator().manual_seed(n + P)
    q, kq, scale, chan, offset, k = dyadic_int8_keys(B, Hkv, G, 64, n + 9, g, spikes)
    v = torch.randn(k.shape, generator=g).to(DEVICE)
    bounds = ref.step_bounds(*ref.sparse_bounds(n, 4, window), DEVICE)
    tails = {twin: tail_buffers(B, Hkv, G, 64, v) for twin in ("ref", "tri")}
    for twin in tails.values():
        twin.value_sum.fill_(float("nan"))
    want = ref.page_threshold(q, k, kq.clone(), scale.clone(), chan, offset, bounds, eps, P, tails["ref"])
    got = tri.page_threshold(q, k, kq.clone(), scale.clone(), chan, offset, bounds, eps, P, tails["tri"])
    assert torch.equal(got[1], want[1])
    est, err = ref.shadow_scores(q, kq, scale, n - 1, chan, offset)
    top = (est + err).amax(-1).view(B, -1, 1)
    for name in ("log_u", "log_l"):
        x, y = getattr(tails["tri"], name), getattr(tails["ref"], name)
        assert torch.equal(torch.isfinite(x), torch.isfinite(y)), name
        assert torch.allclose(torch.exp(x - top), torch.exp(y - top), rtol=2 ** -7, atol=2 ** -120), name
    assert torch.equal(tails["tri"].group_top, tails["ref"].group_top)
    assert torch.equal(tails["tri"].upto, tails["ref"].upto)
    torch.testing.assert_close(tails["tri"].value_sum, v[:, :, 4:n - window].float().sum(2), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n, P, eps, direct", [(700, 16, 1e-2, False), (900, 1, 0.1, False), (900, 1, 0.1, True)])
def test_page_filtered_attention_tail(n, P, eps, direct, monkeypatch):
    """The gathering kernel's tail estimate (the kept candidates' plain value sum, merged over
    splits or in a single program) equals the reference's from the same buffers."""
    if direct:  # one split per KV group: the estimate is mixed in the first launch
        monkeypatch.setitem(tri.KEPT_GATHER, "programs_per_sm", 1)
    g = torch.Generator().manual_seed(n)
    B, Hkv, G, D, W, anchor = 2, 2, 4, 64, 16, 4
    q, kq, scale, chan, offset, k = dyadic_int8_keys(B, Hkv, G, D, n, g)
    q = q * 2  # peaked enough that eps leaves candidates out
    v = torch.randn(k.shape, generator=g).to(DEVICE)
    ring_k, ring_v = torch.zeros(B, Hkv, W, D, device=DEVICE), torch.zeros(B, Hkv, W, D, device=DEVICE)
    ref.fill_ring(ring_k, ring_v, k[:, :, n - W:], v[:, :, n - W:], n - W)
    bounds = ref.step_bounds(*ref.sparse_bounds(n, anchor, W), DEVICE)
    tail = tail_buffers(B, Hkv, G, D, v)
    page_bin, threshold, log_rest = tri.page_threshold(q, k, kq, scale, chan, offset, bounds, eps, P, tail)
    args = (q, ring_k, ring_v, k, v, page_bin, threshold, log_rest, bounds, anchor, P)
    got, lse, _ = tri.page_filtered_attention(*args, out=torch.full_like(q, float("nan")), tail=tail)
    want, want_lse, _ = ref.page_filtered_attention(*args, tail=tail)
    dropped = ref.page_filtered_attention(*args)[0]
    assert rel_err(got, want) <= 1e-5 and rel_err(lse, want_lse) <= 1e-5
    assert rel_err(got, dropped) > 1e-3  # the estimate moved the output


def test_page_threshold_certifies_the_dropped_mass():
    """After attending the pages page_threshold keeps, U / (Z_set + U) is never below the exact
    dropped mass and is <= eps for every head (reference, random keys of a few magnitudes)."""
    g = torch.Generator().manual_seed(5)
    B, Hkv, G, D, n, P, W = 1, 2, 4, 64, 1200, 16, 64
    q, kq, scale, chan, offset, k = dyadic_int8_keys(B, Hkv, G, D, n, g)
    q, k, v = 4 * q.cpu(), k.cpu(), torch.randn(B, Hkv, n, D, generator=g)  # peaked: logits spread over ~+-20
    bounds = ref.step_bounds(*ref.sparse_bounds(n, 4, W), "cpu")
    ring_k, ring_v = torch.zeros(B, Hkv, W, D), torch.zeros(B, Hkv, W, D)
    ref.fill_ring(ring_k, ring_v, k[:, :, n - W:], v[:, :, n - W:], n - W)
    exact_lse = ref.decode_attention(q, k, v)[1]
    for eps in (1e-3, 1e-2, 0.1):
        page_bin, threshold, log_rest = ref.page_threshold(q, k, kq.cpu(), scale.cpu(), chan.cpu(), offset.cpu(),
                                                           bounds, eps, P)
        _, lse, bound = ref.page_filtered_attention(q, ring_k, ring_v, k, v, page_bin, threshold, log_rest, bounds, 4, P)
        dropped = 1 - torch.exp(lse - exact_lse)
        assert bool((bound >= dropped - 1e-6).all()) and bool((bound <= eps).all())
        assert 0 < int(ref.kept_pages(page_bin, threshold).sum()) < Hkv * (n - W) // P  # it chose, and left out


def shadow_terms(q, kq, scale, chan, offset, bounds):
    """The reference's logit bounds u and l of every key and which keys are anchor or window
    (scored, so but for the newest), as page_threshold computes them."""
    n, lo, hi = (int(x) for x in bounds)
    est, err = ref.shadow_scores(q, kq, scale, n, chan, offset)
    pos = torch.arange(est.shape[-1], device=est.device)
    base = (pos < n - 1) & ~((pos >= lo) & (pos < hi))
    return est + err, est - ref.KEPT_MARGIN * err, base, lo, hi


@pytest.mark.parametrize("B, Hkv, G, n, window", [(1, 2, 8, 90, 8), (2, 1, 7, 1500, 128), (1, 2, 3, 5000, 64),
                                                  (1, 1, 4, 2, 8), (1, 2, 3, 300, 200), (1, 1, 1, 700, 16),
                                                  (1, 1, 16, 3000, 32)])
@pytest.mark.parametrize("eps", [0.0, 1e-2, 0.1, 1.0])
def test_sampled_cut(B, Hkv, G, n, window, eps):
    """Each head's cut on SHIFT_SAMPLES evenly spaced candidates: the kernel's (anchor and window
    read a tile at a time, kept bins found by bisection) is the reference's (a histogram), with
    fewer candidates than samples, far more, none, a window longer than a tile, and groups of 1 to
    16 heads."""
    g = torch.Generator().manual_seed(n + G)
    q, kq, scale, chan, offset, _ = dyadic_int8_keys(B, Hkv, G, 64, n + 9, g)
    q = q * 2  # peaked enough that the cuts differ between heads
    bounds = ref.step_bounds(*ref.sparse_bounds(n, 4, window), DEVICE)
    want = ref.sampled_cut(*shadow_terms(q, kq, scale, chan, offset, bounds), eps)
    got = tri.sampled_cut(q, kq, scale, chan, offset, bounds, eps)
    assert torch.equal(got.view(want.shape), want.int())


def test_sampled_cut_counts_weighted_anchor_and_window_keys_that_many_times():
    """The anchor and window given as weights: ones are the mask itself; weights of 1000 put a
    thousand times their mass in Z, and more kept mass never cuts lower (here some heads higher)."""
    g = torch.Generator().manual_seed(11)
    q, kq, scale, chan, offset, _ = dyadic_int8_keys(1, 2, 4, 64, 1209, g)
    up, low, base, lo, hi = shadow_terms(q * 2, kq, scale, chan, offset, ref.step_bounds(1200, 4, 1200 - 64, DEVICE))
    for eps in (1e-2, 0.1):
        cut = ref.sampled_cut(up, low, base, lo, hi, eps)
        assert torch.equal(ref.sampled_cut(up, low, base.double(), lo, hi, eps), cut)
        heavier = ref.sampled_cut(up, low, 1000.0 * base, lo, hi, eps)
        assert (heavier >= cut).all() and (heavier > cut).any()


def test_sampled_cut_on_every_candidate_is_each_heads_own_threshold(monkeypatch):
    """With every candidate a sample (each standing for itself), a head's sampled cut is the
    threshold page_threshold gives that head alone, key by key (pages of one key, a group of one)."""
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, D, n, W, eps = 1, 2, 4, 64, 3000, 64, 1e-2
    k = torch.randn(B, Hkv, n, D, generator=g)
    q = torch.randn(B, Hkv * G, D, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(Hkv)[None, :, None]
    chan, offset = ref.key_frame(k, 0)
    kq, scale = ref.quantize_keys(k, chan[:, :, None], offset[:, :, None])
    kq[:, :, n - 1], scale[:, :, n - 1] = ref.quantize_keys(k[:, :, n - 1], chan, offset)  # as page_threshold writes it
    bounds = ref.step_bounds(*ref.sparse_bounds(n, 4, W), "cpu")
    up, low, base, lo, hi = shadow_terms(q, kq, scale, chan, offset, bounds)
    monkeypatch.setattr(ref, "SHIFT_SAMPLES", hi - lo)
    cut = ref.sampled_cut(up, low, base, lo, hi, eps).view(B, -1)
    for head in range(Hkv * G):
        kv = slice(head // G, head // G + 1)
        _, alone, _ = ref.page_threshold(q[:, head:head + 1], k[:, kv], kq[:, kv].clone(), scale[:, kv].clone(),
                                         chan[:, kv], offset[:, kv], bounds, eps, 1)
        assert int(cut[0, head]) == int(alone[0, 0]), head
    assert int(cut.amax() - cut.amin()) >= 4  # the heads cut apart: their shifts mean something


@pytest.mark.parametrize("lead", [12, 300])
def test_page_threshold_shift_ranks_by_each_heads_own_cut(lead, monkeypatch):
    """Head 1 is head 0 with all its logits `lead` nats higher (a constant key channel its query
    weighs, as Qwen2's key biases do; some of its layers' heads lie hundreds of nats apart): the
    same softmax, but ranked by raw bounds its keys outrank the others' and pull the group's
    threshold down. Its sampled cut lies `lead` above head 0's, so cut_shift lowers it by that,
    however large, and the group keeps fewer keys."""
    g = torch.Generator().manual_seed(7)
    B, Hkv, G, D, n, W, eps = 1, 1, 3, 64, 1500, 64, 1e-2
    k = torch.randn(B, Hkv, n, D, generator=g)
    k[..., 0] = 2.0
    q = torch.randn(B, Hkv * G, D, generator=g) * 4.0
    q[:, :, 0] = 0.0
    q[:, 1] = q[:, 0]
    q[:, 1, 0] = lead * D ** 0.5 / 2.0  # head 1: head 0 + lead nats on every key
    bounds = ref.step_bounds(*ref.sparse_bounds(n, 4, W), "cpu")
    chan, offset = ref.key_frame(k, 0)  # channel 0 is all offset: it adds nothing to the bounds
    kq, scale = ref.quantize_keys(k, chan[:, :, None], offset[:, :, None])
    shift = ref.cut_shift(ref.sampled_cut(*shadow_terms(q, kq, scale, chan, offset, bounds), eps))
    assert abs(float(shift[0, 0, 1] - shift[0, 0, 0]) - lead) <= 1

    def kept() -> int:
        page_bin, threshold, log_rest = ref.page_threshold(q, k, kq.clone(), scale.clone(), chan, offset, bounds, eps, 1)
        return int(ref.kept_pages(page_bin, threshold).sum())

    shifted = kept()
    monkeypatch.setattr(ref, "cut_shift", lambda cut: torch.zeros_like(cut))
    assert shifted < 0.6 * kept()  # measured 407 against 1307 (lead 12), 407 against 1399 (300)


@pytest.mark.parametrize("n, P, dtype", [(700, 16, torch.float32), (3000, 32, torch.bfloat16), (77, 5, torch.float16),
                                         (900, 1, torch.bfloat16)])
def test_page_filtered_attention(n, P, dtype):
    """Window ∪ anchor ∪ the kept pages' candidates, with each head's own threshold on its group's
    page bins (a page joins when any head of the group keeps it); the bound lands in the buffer
    given for it (a layer's row of the cache's certificate)."""
    g = torch.Generator().manual_seed(n)
    B, Hkv, G, D, W, anchor = 2, 2, 4, 64, 16, 4
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype).to(DEVICE)
    k, v = make_cache(B, Hkv, n, D, dtype, g)
    ring_k, ring_v = make_cache(B, Hkv, W, D, dtype, g, capacity_extra=0)
    pages = -(-n // P)
    page_bin = torch.randint(-3, 4, (B, Hkv, pages), generator=g, dtype=torch.int16).to(DEVICE)
    threshold = torch.randint(1, 5, (B, Hkv * G), generator=g, dtype=torch.int32).to(DEVICE)
    log_rest = (torch.randn(B, Hkv * G, generator=g) * 3).to(DEVICE)
    log_rest[0, 0] = float("-inf")  # nothing left out
    out = torch.full_like(q, float("nan"))
    certificate = torch.full((3, B, Hkv * G), float("nan"), device=DEVICE)
    got, lse, bound = tri.page_filtered_attention(q, ring_k, ring_v, k, v, page_bin, threshold, log_rest, n, anchor, P,
                                                  out=out, bound=certificate[1])
    assert bound.data_ptr() == certificate[1].data_ptr() and certificate[[0, 2]].isnan().all()
    want, want_lse, want_bound = ref.page_filtered_attention(q.double(), ring_k.double(), ring_v.double(), k.double(),
                                                             v.double(), page_bin, threshold, log_rest.double(), n,
                                                             anchor, P)
    assert rel_err(got, want) <= TOL[dtype]
    assert rel_err(lse, want_lse) <= TOL[dtype]
    assert rel_err(bound, want_bound) <= TOL[dtype] and float(bound[0, 0]) == 0


@pytest.mark.parametrize("n, P, chunk", [(700, 16, 64), (2500, 1, 256), (77, 5, 1024)])
def test_kept_list(n, P, chunk, monkeypatch):
    """The kept candidate positions compacted in order, over chunks (counts, then each chunk after
    the ones before it): the reference's kept positions inside [lo, hi), and their number."""
    monkeypatch.setitem(tri.KEPT, "chunk", chunk)
    monkeypatch.setitem(tri.KEPT, "counts_per_tile", 4)  # several tiles of chunk counts
    g = torch.Generator().manual_seed(n)
    B, Hkv, G, cap = 2, 2, 3, n + 40
    page_bin = torch.randint(-3, 4, (B, Hkv, -(-cap // P)), generator=g, dtype=torch.int16).to(DEVICE)
    threshold = torch.randint(1, 5, (B, Hkv * G), generator=g, dtype=torch.int32).to(DEVICE)
    bounds = ref.step_bounds(*ref.sparse_bounds(n, 4, 16), DEVICE)
    idx, count = tri.kept_list(page_bin, threshold, bounds, P, cap)
    keep = ref.kept_positions(page_bin, threshold, P, cap) & ref.candidates(torch.empty(cap), bounds.cpu()).to(DEVICE)
    for b in range(B):
        for h in range(Hkv):
            want = keep[b, h].nonzero()[:, 0]
            assert int(count[b, h]) == len(want) > 0
            assert torch.equal(idx[b, h, :len(want)].long(), want)


@pytest.mark.parametrize("summary", [torch.float32, torch.float8_e4m3fn])
def test_page_bound_is_an_upper_bound(summary):
    """Also with fp8 summaries (rounded outward); a key past fp8's range (page 1) lifts its
    page's bound to +inf instead of breaking it."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 64, generator=g), 20 * torch.randn(1, 2, 96, 64, generator=g)
    k[0, 1, 40, 7] = 500.0
    kmin, kmax = (torch.empty(1, 2, 3, 64, dtype=summary) for _ in range(2))
    ref.update_pages(k, kmin, kmax, 0, 96, 32)
    bound = ref.page_bounds(q, kmin, kmax)
    true_max = ref.group_max_scores(q, k).unflatten(2, (3, 32)).amax(-1)
    assert (bound >= true_max - 1e-4).all()
    pages = k.unflatten(2, (3, 32))
    exact = ref.page_bounds(q, pages.amin(3), pages.amax(3))
    assert (bound >= exact - 1e-4).all()  # rounding outward only loosens
    assert torch.isinf(bound[0, 1, 1]) == (summary != torch.float32)


def test_tail_estimate_of_one_key_pages_is_full_attention():
    """With pages of one key, each unattended page's pseudo-key is that key itself (log 1 = 0), so
    window ∪ anchor ∪ chosen pages ∪ tail is full attention; the returned log-sum-exp is the
    exactly attended keys' alone."""
    g = torch.Generator().manual_seed(12)
    B, Hkv, G, D, n, W, anchor = 2, 2, 3, 16, 50, 8, 3
    q, k, v = torch.randn(B, Hkv * G, D, generator=g), torch.randn(B, Hkv, n, D, generator=g), torch.randn(B, Hkv, n, D, generator=g)
    ring_k, ring_v = torch.zeros(B, Hkv, W, D), torch.zeros(B, Hkv, W, D)
    ref.fill_ring(ring_k, ring_v, k, v, 0)
    ksum, vsum = torch.empty(B, Hkv, n, D), torch.empty(B, Hkv, n, D)
    ref.update_page_sums(k, v, ksum, vsum, 0, n, 1)
    idx = torch.tensor([5, 17, 30, -1]).expand(B, Hkv, 4)
    want, want_lse = ref.decode_attention(q, k, v)
    got, lse = ref.sparse_attention(q, ring_k, ring_v, k, v, idx, n, anchor, tail=(ksum, vsum, 1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _, exact_lse = ref.sparse_attention(q, ring_k, ring_v, k, v, idx, n, anchor)
    torch.testing.assert_close(lse, exact_lse)
    assert (lse < want_lse - 0.1).all()  # the tail's keys are estimated, not counted as attended


def tail_buffers(B: int, Hkv: int, G: int, D: int, v: torch.Tensor) -> ref.Tail:
    return ref.Tail(v, torch.zeros(B, Hkv, D, device=v.device), torch.full((B, Hkv), -1, dtype=torch.int32, device=v.device),
                    *(torch.zeros(B, Hkv * G, ref.PAGE_BINS, device=v.device) for _ in range(2)),
                    torch.zeros(B, Hkv * G, dtype=torch.int32, device=v.device))


def test_threshold_tail_of_equal_logits_is_full_attention():
    """Certified int8-threshold's tail estimate (reference): at eps = 1 every candidate is left
    out; when they all have one logit and one error bound (zero keys and one scale: exact int8
    copies, logit 0) the tail's mass is sqrt(U * L) = its count and its value the plain mean of
    its values, so the estimate is full attention (to the histogram's bf16 rounding of each exp,
    outward: at most 2^-7), while dropping the tail is far from it."""
    g = torch.Generator().manual_seed(13)
    B, Hkv, G, D, n, W, anchor = 1, 2, 3, 64, 300, 16, 4
    q, kq, scale, chan, offset, k = (x.cpu() for x in dyadic_int8_keys(B, Hkv, G, D, n, g))
    offset.zero_()  # keys of 0 are exact copies: logit 0
    kq[:, :, anchor:n - W], k[:, :, anchor:n - W] = 0, 0
    scale[:, :, anchor:n - W] = scale[:, :, anchor:anchor + 1]  # one error bound too: sqrt(U * L) is exact
    v = torch.randn(B, Hkv, n, D, generator=g)
    ring_k, ring_v = torch.zeros(B, Hkv, W, D), torch.zeros(B, Hkv, W, D)
    ref.fill_ring(ring_k, ring_v, k[:, :, n - W:], v[:, :, n - W:], n - W)
    bounds = ref.step_bounds(*ref.sparse_bounds(n, anchor, W), "cpu")
    tail = tail_buffers(B, Hkv, G, D, v)
    page_bin, threshold, log_rest = ref.page_threshold(q, k, kq, scale, chan, offset, bounds, 1.0, 1, tail)
    keep = ref.kept_positions(page_bin, threshold, 1, n)
    assert not (keep & ref.candidates(keep, bounds)).any()  # eps = 1: every candidate is left out
    args = (q, ring_k, ring_v, k, v, page_bin, threshold, log_rest, bounds, anchor, 1)
    dropped = ref.page_filtered_attention(*args)[0]
    got = ref.page_filtered_attention(*args, tail=tail)[0]
    want = ref.decode_attention(q, k, v)[0]
    assert rel_err(got, want) < 2 ** -9 and rel_err(dropped, want) > 0.1


def test_tail_value_sum_adds_each_position_once():
    """The candidates' value sum follows the step's hi one position at a time, adds nothing when a
    step runs twice, and restarts from lo after a truncate (upto past hi) or a reset (upto = -1)."""
    g = torch.Generator().manual_seed(3)
    B, Hkv, D, n, W, anchor = 2, 2, 8, 60, 8, 4
    v = torch.randn(B, Hkv, n, D, generator=g)
    tail = tail_buffers(B, Hkv, 1, D, v)
    for m in (30, 31, 31, 45, 20, 21):  # advance, again, jump, truncate, advance
        bounds = ref.step_bounds(*ref.sparse_bounds(m, anchor, W), "cpu")
        ref.update_value_sum(tail, bounds)
        torch.testing.assert_close(tail.value_sum, v[:, :, anchor:m - W].sum(2))
    tail.upto.fill_(-1)
    tail.value_sum.fill_(float("nan"))
    ref.update_value_sum(tail, bounds)
    torch.testing.assert_close(tail.value_sum, v[:, :, anchor:21 - W].sum(2))


def test_tail_estimate_is_mean_key_and_value_per_page():
    """Pages of 4: each page wholly inside [lo, hi) and not chosen adds exactly one pseudo-key,
    mean key with logit + log 4 and mean value; chosen pages and the partial pages at the edges
    add none."""
    g = torch.Generator().manual_seed(13)
    B, Hkv, G, D, n, W, anchor, P = 1, 1, 2, 8, 30, 4, 3, 4  # candidates [3, 26): pages 1..5 are whole
    q, k, v = torch.randn(B, Hkv * G, D, generator=g), torch.randn(B, Hkv, n, D, generator=g), torch.randn(B, Hkv, n, D, generator=g)
    ring_k, ring_v = torch.zeros(B, Hkv, W, D), torch.zeros(B, Hkv, W, D)
    ref.fill_ring(ring_k, ring_v, k, v, 0)
    ksum, vsum = torch.empty(B, Hkv, 8, D), torch.empty(B, Hkv, 8, D)
    ref.update_page_sums(k, v, ksum, vsum, 0, n, P)
    idx = torch.tensor([[[8, 9, 10, 11]]])  # page 2
    got, _ = ref.sparse_attention(q, ring_k, ring_v, k, v, idx, n, anchor, tail=(ksum, vsum, P))
    keys = torch.cat((k[0, 0, :3], k[0, 0, 8:12], k[0, 0, 26:]))
    values = torch.cat((v[0, 0, :3], v[0, 0, 8:12], v[0, 0, 26:]))
    logits = q[0] @ keys.T / D ** 0.5
    for p in (1, 3, 4, 5):
        mean_k, mean_v = k[0, 0, p * P:(p + 1) * P].mean(0), v[0, 0, p * P:(p + 1) * P].mean(0)
        logits = torch.cat((logits, q[0] @ mean_k[:, None] / D ** 0.5 + torch.log(torch.tensor(4.0))), dim=1)
        values = torch.cat((values, mean_v[None]))
    torch.testing.assert_close(got[0], torch.softmax(logits, -1) @ values, rtol=1e-5, atol=1e-6)


def valid_sorted(pos: torch.Tensor, lo: int, hi: int) -> list[list[int]]:
    """Per row, the sorted positions that lie in [lo, hi) (entries outside are ignored downstream)."""
    rows = pos.reshape(-1, pos.shape[-1]).cpu()
    return [sorted(int(p) for p in r if lo <= p < hi) for r in rows]


# (kv heads, G, D, n, lo, hi, k, dtype): one run of pages and many (10 runs of 64 pages of 32 for
# k = 5: pass 2 ranks only the best 8 runs), k not a power of two, k = 1, k = the whole range.
SELECT_CASES = [
    (2, 4, 64, 300, 4, 250, 12, torch.float32), (1, 8, 128, 2600, 4, 2500, 32, torch.float32),
    (3, 1, 80, 20000, 10, 19900, 5, torch.float16), (2, 7, 64, 900, 0, 900, 100, torch.bfloat16),
    (1, 4, 64, 40, 4, 24, 20, torch.float32), (2, 2, 64, 100, 4, 90, 1, torch.float32),
]


@pytest.mark.parametrize("Hkv, G, D, n, lo, hi, k_top, dtype", SELECT_CASES)
def test_exact_select(Hkv, G, D, n, lo, hi, k_top, dtype):
    """The fused score + top-k kernel picks the reference's top-k: the same set in fp32; in half
    precision, where rounding can swap near-ties, the same scores to rounding."""
    g = torch.Generator().manual_seed(n + k_top)
    q = torch.randn(1, Hkv * G, D, generator=g).to(dtype).to(DEVICE)
    k, _ = make_cache(1, Hkv, n, D, dtype, g)
    bounds = ref.step_bounds(n, lo, hi, DEVICE)
    got = tri.exact_select(q, k, bounds, k_top)
    want = ref.exact_select(q.double(), k.double(), bounds, k_top)
    assert got.shape == want.shape == (1, Hkv, k_top)  # static: -1 past the min(k_top, hi - lo) found
    assert all(len(set(r)) == len(r) == min(k_top, hi - lo) for r in valid_sorted(got, lo, hi))
    if dtype == torch.float32:
        assert valid_sorted(got, lo, hi) == valid_sorted(want, lo, hi)
    else:
        scores = ref.group_max_scores(q.double(), k.double())
        picked, best = scores.gather(-1, got).sort(-1).values, scores.gather(-1, want).sort(-1).values
        assert torch.allclose(picked, best, atol=TOL[dtype] * 4)


@pytest.mark.parametrize("n, P, lo, hi, k_top, oversample, G, D", [
    (300, 16, 4, 250, 12, 2.0, 4, 64),  # one run of pages
    (9000, 4, 4, 8900, 16, 16.0, 7, 80),  # 35 runs of 64 pages: pass 2 ranks only the best runs
    (40, 16, 4, 20, 30, 2.0, 1, 128),  # fewer tokens in [lo, hi) than k: the rest are -1
    (3000, 24, 100, 2900, 40, 8.0, 8, 64),  # a page size that is not a power of two; tokens in chunks
])
@pytest.mark.parametrize("summary", [torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("whole", [False, True])
def test_page_select(n, P, lo, hi, k_top, oversample, G, D, summary, whole):
    """fp8 summaries with one key past fp8's range: its page has no bound and is always ranked first.
    whole: the chosen pages' positions, all of them (no token scoring)."""
    g = torch.Generator().manual_seed(n + P)
    B, Hkv = 1, 2
    q = torch.randn(B, Hkv * G, D, generator=g).to(DEVICE)
    k = torch.randn(B, Hkv, n, D, generator=g).to(DEVICE)
    k[0, 1, hi - 1, 3] = 600.0
    kmin, kmax = (torch.empty(B, Hkv, -(-n // P), D, device=DEVICE, dtype=summary) for _ in range(2))
    ref.update_pages(k, kmin, kmax, 0, n, P)
    args = (q, k, kmin, kmax, ref.step_bounds(n, lo, hi, DEVICE), k_top, P, oversample)
    got = tri.page_select(*args, "group", whole)
    want = ref.page_select(*args, "group", whole)
    assert got.shape == want.shape == (B, Hkv, -(-k_top // P) * P if whole else k_top)
    assert valid_sorted(got, lo, hi) == valid_sorted(want, lo, hi)
    for row in valid_sorted(got, lo, hi) if whole else []:  # whole pages: every candidate of each, at most k/P of them
        pages = sorted({p // P for p in row})
        assert len(pages) <= -(-k_top // P)
        assert row == [p for page in pages for p in range(page * P, page * P + P) if lo <= p < hi]
    assert ((got == -1) | ((got >= lo) & (got < hi))).all()  # never a position outside [lo, hi)


@pytest.mark.parametrize("policy, message", [
    (dict(top_k=100), "top_k=100 with exact selection is past the selection kernel's limits"),
    (dict(top_k=100, selection="pages", page_size=8), "top_k=100 with pages selection is past"),
    (dict(scope="head"), "scope='head' (one top-k per query head) has no GPU kernel"),
    (dict(budget_alpha=1.0), "a top-k that grows with the context (budget_alpha) has no GPU kernel"),
])
def test_plan_refuses_what_the_kernels_do_not_implement(monkeypatch, policy, message):
    """Decided once, when the cache is built: never a silent fallback to the reference."""
    from minirt import CondensateCache, CondensateConfig
    from minirt.config import ModelConfig

    monkeypatch.setenv("MINIRT_KERNELS", "triton")
    cfg = ModelConfig(family="llama", vocab_size=8, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16,
                      ffn_dim=8, max_seq_len=8192, rotary_dim=16)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CondensateCache(cfg, CondensateConfig(**policy), capacity=5000)
    monkeypatch.setenv("MINIRT_KERNELS", "reference")
    CondensateCache(cfg, CondensateConfig(**policy), capacity=5000)  # the reference runs them all


@pytest.mark.parametrize("pages", [None, "cache", "fp8", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_kv(pages, dtype):
    """The fused one-token append writes history, ring slot and page summary like the reference
    (fp8 summaries: the same outward-rounded bits, and NaN where a key passed fp8's range);
    "dense": the history alone (DenseCache's step, no ring)."""
    B, Hkv, cap, D, W, P, steps = 2, 3, 40, 80, 8, 4, 23
    g = torch.Generator().manual_seed(2)
    new = [torch.randn(2, B, 1, Hkv, D, generator=g).to(dtype).to(DEVICE).transpose(2, 3) for _ in range(steps)]
    new[9][0] *= 300  # page 2: some elements past 448
    summary = torch.float8_e4m3fn if pages == "fp8" else dtype
    states = {}
    for impl in (ref, tri):
        def poisoned(*shape, dtype=dtype):
            return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        store, ring = [poisoned(B, Hkv, cap, D) for _ in range(2)], [poisoned(B, Hkv, W, D) for _ in range(2)]
        if pages == "dense":
            ring = [None, None]
        summaries = [poisoned(B, Hkv, cap // P, D, dtype=summary) for _ in range(2)] if pages in ("cache", "fp8") else [None, None]
        for pos, (k, v) in enumerate(new):  # k/v strided like the model's [B, Hkv, 1, D] views
            impl.append_kv(*store, *ring, *summaries, k, v, pos, P)
        written = [t[:, :, :steps] for t in store] + [t for t in ring if t is not None]  # positions 0..22; every ring slot
        if pages in ("cache", "fp8"):
            written += [t[:, :, :6].float() for t in summaries]  # pages 0..5 hold positions 0..22
        states[impl.__name__] = written
    assert len(states["minirt.kernels.reference"]) == {None: 4, "cache": 6, "fp8": 6, "dense": 2}[pages]
    for i, (a, b) in enumerate(zip(*states.values())):
        if i < 4 or pages != "fp8":
            assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    if pages == "fp8":
        overflow = states["minirt.kernels.reference"][4].isnan()  # kmin
        assert overflow[:, :, 2].any() and not overflow[:, :, [0, 1, 3, 4, 5]].any()


@pytest.mark.parametrize("attention, policy", [
    ("full", None),
    ("sparse", dict(anchor=2, window=8, top_k=4)),
    ("sparse", dict(anchor=2, window=8, top_k=4, selection="pages", page_size=4, summary_dtype="cache")),
    ("sparse", dict(anchor=2, window=8, top_k=4, selection="pages", page_size=4, summary_dtype="fp8")),
    ("sparse", dict(anchor=2, window=8, selection="int8-threshold", page_size=4, max_dropped_mass=0.05)),
    ("sparse", dict(anchor=2, window=8, selection="int8-threshold", page_size=1, max_dropped_mass=0.3, tail=True)),
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
        runs[mode] = minirt_greedy(llm, ids, 10, cache=cache)  # positions 30..39: 2.5 pages of 4 fill
    assert runs["triton"][1] == runs["reference"][1]
    # the tail's mass comes from sums of exps each twin rounds to bf16 against its own running tops
    # (test_page_threshold), so the twins' estimates may differ by 2^-7 of the tail's weight
    tol = 1e-3 if policy and policy.get("tail") else 1e-4
    assert max_logit_diff(runs["triton"][0], runs["reference"][0]) <= tol


@pytest.mark.parametrize("n, dtype", [(333, torch.float32), (511, torch.bfloat16)])
def test_sparse_attention_many_gathered(n, dtype):
    """Enough gathered entries that the kernel splits the work and merges partial results."""
    g = torch.Generator().manual_seed(n)
    B, Hkv, G, D, W, K = 1, 2, 4, 64, 16, 300
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype).to(DEVICE)
    k, v = make_cache(B, Hkv, n, D, dtype, g)
    ring_k, ring_v = make_cache(B, Hkv, W, D, dtype, g, capacity_extra=0)
    idx = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(B * Hkv)]).view(B, Hkv, K).to(DEVICE)
    got, lse = tri.sparse_attention(q, ring_k, ring_v, k, v, idx, n, 4)
    want, want_lse = ref.sparse_attention(q.double(), ring_k.double(), ring_v.double(), k.double(), v.double(), idx, n, 4)
    assert rel_err(got, want) <= TOL[dtype] and rel_err(lse, want_lse) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_choice(dtype):
    """The decode step's greedy sampling in one launch equals the reference's: fp32 logits, the
    argmax and the next input token, with the maximum tied between two blocks of the vocabulary
    (the first wins, as torch.argmax) and a vocabulary that is not a multiple of the block."""
    from minirt.kernels import triton_layers as lay

    g = torch.Generator().manual_seed(3)
    B, V = 3, 9000
    logits = torch.randn(B, 2, V, generator=g).to(dtype).to(DEVICE)[:, -1]  # a strided row, as the model's
    logits[1, 8500] = logits[1, 100] = 50.0  # tie across blocks
    logits[2, 4096] = logits[2, 4097] = 50.0  # tie inside a block
    outs = [(torch.full((B, V), float("nan"), device=DEVICE), torch.full((B,), -1, device=DEVICE),
             torch.full((B, 1), -1, device=DEVICE)) for _ in range(2)]
    lay.greedy_choice(logits, *outs[0])
    ref.greedy_choice(logits, *outs[1])
    for got, want in zip(*outs):
        assert torch.equal(got, want)
    assert outs[0][1].tolist()[1:] == [100, 4096]


@pytest.mark.parametrize("anchor, window", [(0, 0), (4, 128), (4, 3)])
def test_next_step(anchor, window):
    """The end of a decode step (position + 1 and the next step's bounds) in one launch, as the reference."""
    got = (torch.tensor([9], device=DEVICE), torch.zeros(3, dtype=torch.int32, device=DEVICE))
    want = tuple(t.clone() for t in got)
    for _ in range(3):
        tri.next_step(*got, anchor, window)
        ref.next_step(*want, anchor, window)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert want[1].tolist() == list(ref.sparse_bounds(13, anchor, window))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_kernels(dtype):
    """RMSNorm (alone and with the residual add), RoPE on the fused qkv (partial rotary, GQA, several tokens at their positions) and
    silu(gate) * up, against their references."""
    from minirt.kernels import triton_layers as lay

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, 96, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(96, generator=g).to(dtype).to(DEVICE)
    torch.testing.assert_close(lay.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), rtol=TOL[dtype], atol=TOL[dtype])
    delta = torch.randn(3, 5, 96, generator=g).to(dtype).to(DEVICE)
    (got_x, got_y), (want_x, want_y) = lay.add_rms_norm(x, delta, w, 1e-5), ref.add_rms_norm(x, delta, w, 1e-5)
    if DEVICE == "cuda":  # the residual stream, rounded as the reference rounds it
        assert torch.equal(got_x, want_x)
    else:  # the interpreter rounds fp32 -> bf16 toward zero (Triton 3.6), not to nearest
        torch.testing.assert_close(got_x, want_x, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(got_y, want_y, rtol=TOL[dtype], atol=TOL[dtype])
    Hq, Hkv, D, rot, T = 4, 2, 32, 16, 3  # rotary on half of each head
    qkv = torch.randn(2, T, (Hq + 2 * Hkv) * D, generator=g).to(dtype).to(DEVICE)
    angles = torch.arange(50)[:, None] * torch.rand(rot // 2, generator=g)[None]
    cos, sin = (f(torch.cat((angles, angles), -1)).to(dtype).to(DEVICE) for f in (torch.cos, torch.sin))
    positions = torch.tensor([7, 30, 49], device=DEVICE)
    got, want = qkv.clone(), qkv.clone()
    lay.rope_qkv_(got, cos, sin, positions, Hq + Hkv, D)
    ref.rope_qkv_(want, cos, sin, positions, Hq + Hkv, D)
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(got[..., (Hq + Hkv) * D:], qkv[..., (Hq + Hkv) * D:])  # v untouched
    gate_up = torch.randn(4, 2, 2 * 1500, generator=g).to(dtype).to(DEVICE)  # F not a multiple of the block
    torch.testing.assert_close(lay.silu_mul(gate_up), ref.silu_mul(gate_up), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projections(dtype):
    """The decode step's one-row projections (Triton GEMV) against their references: the plain
    projection, RMSNorm with and without the residual add in the prologue and RoPE (GQA) in the
    epilogue, silu(gate) * up in the prologue; with bias, and sizes that are not multiples of the
    blocks."""
    from minirt.kernels import triton_layers as lay

    g = torch.Generator().manual_seed(6)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    K, Hq, Hkv, D = 300, 5, 1, 32
    N = (Hq + 2 * Hkv) * D
    x, delta, nw, w, b = rand(1, 1, K), rand(1, 1, K), rand(K), rand(N, K) / K ** 0.5, rand(N)
    angles = torch.arange(50)[:, None] * torch.rand(D // 2, generator=g)[None]
    cos, sin = (f(torch.cat((angles, angles), -1)).to(dtype).to(DEVICE) for f in (torch.cos, torch.sin))
    rope = (cos, sin, torch.tensor([37], device=DEVICE), Hq + Hkv, D)
    for d in (None, delta):
        for bias in (None, b):
            for r in (None, rope):
                (got_x, got), (want_x, want) = (m.norm_linear(x, d, nw, 1e-5, w, bias, r) for m in (lay, ref))
                assert rel_err(got_x, want_x) <= TOL[dtype] and rel_err(got, want) <= TOL[dtype]
    assert rel_err(lay.linear(x, w, b), ref.linear(x, w, b)) <= TOL[dtype]
    rows, rows_delta = rand(1, 3, K), rand(1, 3, K)  # several rows (prefill): the unfused launches
    rope3 = (cos, sin, torch.tensor([4, 20, 37], device=DEVICE), Hq + Hkv, D)
    (got_x, got), (want_x, want) = (m.norm_linear(rows, rows_delta, nw, 1e-5, w, b, rope3) for m in (lay, ref))
    assert rel_err(got_x, want_x) <= TOL[dtype] and rel_err(got, want) <= TOL[dtype]
    gate_up, down = rand(1, 1, 2 * 333), rand(70, 333) / 333 ** 0.5
    assert rel_err(lay.silu_mul_linear(gate_up, down), ref.silu_mul_linear(gate_up, down)) <= TOL[dtype]


@pytest.mark.parametrize("pages", ["dense", "cache", "fp8"])
def test_append_in_the_projection_epilogue(pages):
    """A decode step's q|k|v GEMV writes its new key and value into the cache (history, ring slot,
    page min/max) exactly as reference.append_qkv of the same output does, step after step across
    page boundaries; fp8 summaries rounded outward, NaN past their range."""
    from minirt.kernels import triton_layers as lay

    dtype, K, Hq, Hkv, D, cap, W, P, steps = torch.bfloat16, 96, 4, 2, 32, 16, 8, 4, 9  # the ring wraps, 3 pages
    g = torch.Generator().manual_seed(9)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    nw, w = rand(K), rand((Hq + 2 * Hkv) * D, K) / K ** 0.5
    w[-2 * Hkv * D:-Hkv * D:7] *= 2000  # some key columns past fp8's range
    angles = torch.arange(cap)[:, None] * torch.rand(D // 2, generator=g)[None]
    cos, sin = (f(torch.cat((angles, angles), -1)).to(dtype).to(DEVICE) for f in (torch.cos, torch.sin))
    summary = torch.float8_e4m3fn if pages == "fp8" else dtype

    def target():
        nan = lambda *shape, dt=dtype: torch.full(shape, float("nan"), device=DEVICE).to(dt)  # noqa: E731
        ring = (nan(1, Hkv, W, D), nan(1, Hkv, W, D)) if pages != "dense" else (None, None)
        summ = (nan(1, Hkv, cap // P, D, dt=summary), nan(1, Hkv, cap // P, D, dt=summary)) if pages != "dense" else (None, None)
        return ref.AppendTarget(nan(1, Hkv, cap, D), nan(1, Hkv, cap, D), *ring, *summ,
                                torch.zeros(3, dtype=torch.int32, device=DEVICE), P)

    fused, want = target(), target()
    for pos in range(steps):
        for t in (fused, want):
            t.bounds.copy_(torch.tensor([pos + 1, 0, pos + 1]))
        rope = (cos, sin, torch.tensor([pos], device=DEVICE), Hq + Hkv, D)
        _, qkv = lay.norm_linear(rand(1, 1, K), None, nw, 1e-5, w, None, rope, fused)
        ref.append_qkv(qkv, want)
    stores = [t for t in fused[:6] if t is not None]
    assert len(stores) == (2 if pages == "dense" else 6)
    for got, ok in zip(stores, [t for t in want[:6] if t is not None]):
        torch.testing.assert_close(got.float(), ok.float(), rtol=0, atol=0, equal_nan=True)
    assert not fused.k[:, :, :steps].isnan().any() and fused.k[:, :, steps:].isnan().all()
    if pages == "fp8":
        assert fused.kmin[:, :, :3].float().isnan().any()
