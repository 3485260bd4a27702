"""How close condensate sparse decoding stays to full attention, measured token by token.

compare() decodes one prompt three ways on the same weights:
  1. full attention, greedy (the reference tokens and distributions);
  2. sparse, teacher-forced on the reference tokens, so each step's next-token distribution is
     compared with full attention on the same context: KL(full || sparse), top-5 overlap, argmax
     agreement, and the attention mass the sparse set left out (exact, per layer and head);
  3. sparse, greedy on its own tokens: token match rate and the first divergent step.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from .cache import CondensateConfig
from .generate import forced_steps, stream_tokens
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
        ]
        if self.page_recall is not None:
            rows.append(("page selection recall of exact top-k", f"{100 * self.page_recall:.1f}%"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines.append("dropped mass by layer (max): " + " ".join(f"{m:.1e}" for m in self.dropped_mass_by_layer))
        return "\n".join(lines)


def _greedy(llm: LLM, ids: list[int], steps: int, attention: str, policy: CondensateConfig | None) -> tuple[list[int], torch.Tensor]:
    cache = llm.new_cache(len(ids) + steps, attention, policy)
    tokens, logits = [], []
    for token, step_logits in stream_tokens(llm, ids, cache, steps):
        tokens.append(token)
        logits.append(step_logits.float())
    return tokens, torch.stack(logits)


@torch.inference_mode()
def _teacher_forced(llm: LLM, ids: list[int], forced: list[int], policy: CondensateConfig):
    """Sparse logits at each step of the full run's context, with per-step dropped mass."""
    cache = llm.new_cache(len(ids) + len(forced), "sparse", policy, certify=True)
    logits, dropped, recall = [], [], []
    for step_logits in forced_steps(llm, ids, forced[:-1], cache):  # the last token is never fed
        logits.append(step_logits.float())
        dropped.append(cache.dropped[:, 0].clone())  # [layers, heads]
        recall.append(cache.recall.clone())
    recall = torch.stack(recall[1:]) if len(recall) > 1 else torch.full((1,), float("nan"))  # step 0 is prefill
    return torch.stack(logits), torch.stack(dropped), cache.fallbacks, recall


def compare(llm: LLM, prompt_ids: list[int], steps: int, policy: CondensateConfig | None = None) -> EquivalenceReport:
    """Decode `steps` tokens with full and with sparse attention and measure the difference."""
    policy = policy or CondensateConfig()
    full_tokens, full_logits = _greedy(llm, prompt_ids, steps, "full", None)
    sparse_logits, dropped, fallbacks, recall = _teacher_forced(llm, prompt_ids, full_tokens, policy)
    recall = recall[~recall.isnan()]
    free_tokens, free_logits = _greedy(llm, prompt_ids, steps, "sparse", policy)

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
    return EquivalenceReport(
        policy=asdict(policy), prompt_tokens=len(prompt_ids), steps=steps,
        token_match=sum(a == b for a, b in zip(full_tokens, free_tokens)) / steps,
        first_divergence=divergence, teacher_forced_agreement=float(agree.mean()),
        kl_max=float(kl.max()), kl_mean=float(kl.mean()), top5_overlap_mean=float(overlap.mean()),
        dropped_mass_max=float(decode_steps.max()), dropped_mass_mean=float(decode_steps.mean()),
        dropped_mass_by_layer=decode_steps.amax(dim=(0, 2)).tolist(), fallbacks=fallbacks,
        page_recall=float(recall.mean()) if recall.numel() else None,
        full_text=decode(full_tokens), sparse_text=decode(free_tokens),
    )


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
    llm.model(torch.tensor([prompts[0][:shared]], device=llm.model.device), cache)
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
