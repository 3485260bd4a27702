"""How close condensate sparse decoding stays to full attention, measured token by token.

compare() decodes one prompt three ways on the same weights:
  1. full attention, greedy (the reference tokens and distributions);
  2. sparse, teacher-forced on the reference tokens, so each step's next-token distribution is
     compared with full attention on the same context: KL(full || sparse), top-5 overlap, argmax
     agreement, and the attention mass the sparse set left out (exact, per layer and head);
  3. sparse, greedy on its own tokens: token match rate and the first divergent step. Up to the
     first step where sparse's argmax differs from full's token this is run 2 itself, so it is
     continued from a copy of run 2's cache at that step rather than decoded again.
The prompt is prefilled once: prefill is full attention in either mode.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import CondensateConfig
from .generation import forced_steps, prefill, stream_tokens
from .llm import LLM


@dataclass
class Divergence:
    step: int
    full_token: int
    sparse_token: int
    full_margin: float  # full logit of full's token minus full logit of sparse's token
    sparse_margin: float  # sparse logit of sparse's token minus sparse logit of full's token


@dataclass
class EquivalenceReport:
    policy: dict
    prompt_tokens: int
    steps: int
    token_match: float  # free-running greedy: fraction of steps where sparse == full
    first_divergence: Divergence | None
    teacher_forced_agreement: float  # argmax(sparse) == full token, on full's context
    kl_max: float
    kl_mean: float
    top5_overlap_mean: float
    dropped_mass_max: float  # over steps, layers and heads
    dropped_mass_mean: float
    dropped_mass_by_layer: list[float]  # max over steps and heads
    fallbacks: int
    page_recall: float | None  # selection="pages": mean fraction of the exact top-k it found
    attended_keys: float = 0.0  # keys in the sparse set per layer and decode step, mean
    context: float = 0.0  # cached positions per decode step, mean (what full attention attends to)
    kl_by_step: list[float] = field(default_factory=list)  # teacher-forced KL(full || sparse) at each step
    dropped_mass_by_step: list[list[float]] = field(default_factory=list)  # [step 1..][layer], max over heads
    full_text: str = ""
    sparse_text: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def table(self) -> str:
        p = self.policy
        d = self.first_divergence
        rows = [
            ("policy", f"A={p['anchor']} W={p['window']} k={p['top_k']} scope={p['scope']} "
                       f"selection={p['selection']} dense_layers={list(p['dense_layers'])}"),
            ("prompt / decoded tokens", f"{self.prompt_tokens} / {self.steps}"),
            ("token match (free-running)", f"{100 * self.token_match:.1f}%"),
            ("first divergence", "none" if d is None else
             f"step {d.step}: full {d.full_token} vs sparse {d.sparse_token} "
             f"(full margin {d.full_margin:.3f}, sparse margin {d.sparse_margin:.3f})"),
            ("argmax agreement (teacher-forced)", f"{100 * self.teacher_forced_agreement:.1f}%"),
            ("KL(full||sparse) max / mean", f"{self.kl_max:.3e} / {self.kl_mean:.3e}"),
            ("top-5 overlap mean", f"{self.top5_overlap_mean:.3f}"),
            ("dropped mass max / mean", f"{self.dropped_mass_max:.3e} / {self.dropped_mass_mean:.3e}"),
            ("fallbacks to full", str(self.fallbacks)),
            ("keys attended per step (mean)", f"{self.attended_keys:.0f} of {self.context:.0f} "
                                              f"({100 * self.attended_keys / self.context:.1f}%)"),
        ]
        if self.page_recall is not None:
            rows.append(("page selection recall of exact top-k", f"{100 * self.page_recall:.1f}%"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines.append("dropped mass by layer (max): " + " ".join(f"{m:.1e}" for m in self.dropped_mass_by_layer))
        for name, text in (("full", self.full_text), ("sparse", self.sparse_text)):
            lines += ["", f"--- {name} attention decoded ---", text]
        return "\n".join(lines)


def _greedy(llm: LLM, ids: list[int], cache, first: torch.Tensor, steps: int, bar=None) -> tuple[list[int], torch.Tensor]:
    tokens, logits = [], []
    for token, step_logits in stream_tokens(llm, ids, cache, steps, prefilled=first):
        tokens.append(token)
        logits.append(step_logits.float())
        if bar is not None:
            bar.update()
    return tokens, torch.stack(logits)


@torch.inference_mode()
def _teacher_forced(llm: LLM, ids: list[int], cache, first: torch.Tensor, forced: list[int], bar=None):
    """Sparse logits at each step of the full run's context, with per-step dropped mass; and the
    first step where sparse's own greedy token differs, with a copy of the cache at that step.

    Until that step a free-running sparse decode is this very run, so it only has to be continued
    from the copy (none is made if sparse never disagrees)."""
    logits, dropped, selected, recall, fork = [], [], [], [], None
    for step, step_logits in enumerate(forced_steps(llm, ids, forced[:-1], cache, prefilled=first)):  # the last token is never fed
        if bar is not None:
            bar.update()
        logits.append(step_logits.float())
        dropped.append(cache.dropped[:, 0].clone())  # [layers, heads]
        selected.append(cache.selected[:, 0].mean(-1))  # [layers]: distant keys a KV group attended
        recall.append(cache.recall.clone())
        if fork is None and int(step_logits.argmax()) != forced[step]:
            fork = (step, cache.fork())
    recall = torch.stack(recall[1:]) if len(recall) > 1 else torch.full((1,), float("nan"))  # step 0 is prefill
    return torch.stack(logits), torch.stack(dropped), torch.stack(selected), cache.fallbacks, recall, fork


@dataclass
class FullReference:
    """Full attention's greedy decode of a prompt, and the prompt's prefilled cache to start
    sparse runs from (prefill is full attention either way): shared by every policy compared."""
    prompt_ids: list[int]
    steps: int
    prompt_cache: object  # a DenseCache holding exactly the prompt
    first_logits: torch.Tensor
    tokens: list[int]
    logits: torch.Tensor  # [steps, V] fp32


def full_reference(llm: LLM, prompt_ids: list[int], steps: int, progress: bool = False, bar=None) -> FullReference:
    capacity = len(prompt_ids) + steps
    prompt_cache, run_cache = llm.new_cache(len(prompt_ids), "full"), llm.new_cache(capacity, "full")
    first = prefill(llm, prompt_ids, prompt_cache, progress)
    run_cache.copy_prefix(prompt_cache)
    tokens, logits = _greedy(llm, prompt_ids, run_cache, first, steps, bar)
    return FullReference(prompt_ids, steps, prompt_cache, first, tokens, logits)


def compare(llm: LLM, prompt_ids: list[int], steps: int, policy: CondensateConfig | None = None,
            reference: FullReference | None = None, progress: bool = False) -> EquivalenceReport:
    """Decode `steps` tokens with full and with sparse attention and measure the difference.
    `reference` (from full_reference on the same prompt and steps) saves the full run;
    `progress` shows bars for the prefill and the decodes on stderr (a terminal only)."""
    from tqdm import tqdm

    policy = policy or CondensateConfig()
    runs = 2 if reference else 3  # at most: the free-running sparse decode starts where it diverges
    with tqdm(total=runs * steps, desc="compare (full, sparse forced, sparse free)", unit="step", leave=False,
              file=sys.stderr, disable=None if progress else True) as bar:
        ref = reference or full_reference(llm, prompt_ids, steps, progress, bar)
        assert ref.prompt_ids == prompt_ids and ref.steps == steps, "reference is for another prompt or length"
        cache = llm.new_cache(len(prompt_ids) + steps, "sparse", policy, certify=True)
        cache.copy_prefix(ref.prompt_cache)
        first, full_tokens, full_logits = ref.first_logits, ref.tokens, ref.logits
        sparse_logits, dropped, selected, fallbacks, recall, fork = _teacher_forced(llm, prompt_ids, cache, first, full_tokens, bar)
        recall = recall[~recall.isnan()]
        free_tokens, free_logits = full_tokens, sparse_logits
        if fork is not None:
            step, fork_cache = fork
            bar.update(step)
            tail_tokens, tail_logits = _greedy(llm, prompt_ids, fork_cache, sparse_logits[step], steps - step, bar)
            free_tokens = full_tokens[:step] + tail_tokens
            free_logits = torch.cat((sparse_logits[:step], tail_logits))

    logp_full = torch.log_softmax(full_logits, -1)
    logp_sparse = torch.log_softmax(sparse_logits, -1)
    kl = (logp_full.exp() * (logp_full - logp_sparse)).sum(-1).clamp(min=0)
    top_full, top_sparse = full_logits.topk(5).indices, sparse_logits.topk(5).indices
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(top_full, top_sparse)])
    agree = (sparse_logits.argmax(-1) == torch.tensor(full_tokens, device=sparse_logits.device)).float()

    first = next((i for i, (a, b) in enumerate(zip(full_tokens, free_tokens)) if a != b), None)
    divergence = None
    if first is not None:
        f, s = full_tokens[first], free_tokens[first]
        divergence = Divergence(first, f, s, float(full_logits[first, f] - full_logits[first, s]),
                                float(free_logits[first, s] - free_logits[first, f]))
    decode = llm.tokenizer.decode if llm.tokenizer is not None else (lambda ids: "")
    decode_steps = dropped[1:] if len(dropped) > 1 else dropped  # step 0 is the (full) prefill
    contexts = [len(prompt_ids) + i for i in range(1, steps)] or [len(prompt_ids)]
    attended = attended_keys(policy, torch.tensor(contexts, dtype=torch.float32),
                             (selected[1:] if len(selected) > 1 else selected).cpu())
    return EquivalenceReport(
        policy=asdict(policy), prompt_tokens=len(prompt_ids), steps=steps,
        token_match=sum(a == b for a, b in zip(full_tokens, free_tokens)) / steps,
        first_divergence=divergence, teacher_forced_agreement=float(agree.mean()),
        kl_max=float(kl.max()), kl_mean=float(kl.mean()), top5_overlap_mean=float(overlap.mean()),
        dropped_mass_max=float(decode_steps.max()), dropped_mass_mean=float(decode_steps.mean()),
        dropped_mass_by_layer=decode_steps.amax(dim=(0, 2)).tolist(), fallbacks=fallbacks,
        page_recall=float(recall.mean()) if recall.numel() else None,
        attended_keys=float(attended.mean()), context=sum(contexts) / len(contexts),
        kl_by_step=kl.tolist(), dropped_mass_by_step=decode_steps.amax(dim=2).tolist(),
        full_text=decode(full_tokens), sparse_text=decode(free_tokens),
    )


def plot_report(report: EquivalenceReport, path: str | Path) -> None:
    """A picture of one comparison (`--attention compare --plot`): the teacher-forced KL per step,
    with the first divergence of the free-running decodes marked, and the attention mass each layer
    left out per step (max over heads). Needs matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib (or minirt[bench])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    p = report.policy
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(1, 1.4), layout="constrained")
    top.semilogy(range(len(report.kl_by_step)), [max(k, 1e-8) for k in report.kl_by_step], marker=".")
    if report.first_divergence is not None:
        top.axvline(report.first_divergence.step, color="red", linestyle="--",
                    label=f"first divergence (step {report.first_divergence.step})")
        top.legend(fontsize=8)
    top.set(ylabel="KL(full || sparse)", title=f"{report.prompt_tokens}-token prompt, {report.steps} steps; sparse A="
            f"{p['anchor']} W={p['window']} k={p['top_k']} ({p['selection']}): token match {report.token_match:.0%}")
    dropped = torch.tensor(report.dropped_mass_by_step).clamp(min=1e-6).T  # [layer, decode step 1..]
    image = bottom.imshow(dropped, aspect="auto", origin="lower", norm=LogNorm(vmin=1e-6, vmax=1.0),
                          extent=(0.5, dropped.shape[1] + 0.5, -0.5, dropped.shape[0] - 0.5), cmap="magma")
    fig.colorbar(image, ax=(top, bottom), shrink=0.6, anchor=(0, 0), label="attention mass left out (max over heads)")
    bottom.set(xlabel="decode step", ylabel="layer")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attended_keys(policy: CondensateConfig, n: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Keys each decode step attended per layer [steps, layers] (before any certificate fallback),
    over n [steps] cached positions: anchor, window and the distant keys the cache measured
    (selected [steps, layers], mean over KV groups), or all n in a dense layer. A tail estimate's
    pseudo-keys are not counted."""
    a = n.clamp(max=policy.anchor)
    sparse = a + torch.minimum(n - a, torch.tensor(float(policy.window)))
    dense = torch.zeros(selected.shape[1], dtype=torch.bool)
    dense[list(policy.dense_layers)] = True
    return torch.where(dense, n[:, None], sparse[:, None] + selected)


@torch.inference_mode()
def needle_retrieval(llm: LLM, policy: CondensateConfig | None, sentences_between: int = 16,
                     max_answer_tokens: int = 12) -> dict[str, bool]:
    """Ask each needle's question about the shared haystack; {answer: found in the reply}.

    policy=None means full attention. The haystack is prefilled once; each question rewinds the
    cache to the end of the shared prefix and is decoded greedily.
    """
    from .workloads import NEEDLES, haystack

    doc = haystack(sentences_between)
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": f"{doc}\n\nQuestion: {n.question} Answer with one word."}])
               for n in NEEDLES]
    shared = 0
    while all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    cache = llm.new_cache(max(map(len, prompts)) + max_answer_tokens, "full" if policy is None else "sparse", policy)
    prefill(llm, prompts[0][:shared], cache)
    found = {}
    for needle, ids in zip(NEEDLES, prompts):
        cache.truncate(shared)
        answer = []
        for token, _ in stream_tokens(llm, ids[shared:], cache, max_answer_tokens):  # greedy
            if token in llm.eos_ids:
                break
            answer.append(token)
        found[needle.answer] = needle.answer.lower() in llm.tokenizer.decode(answer).lower()
    return found
