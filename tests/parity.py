"""Greedy decoding through transformers and through minirt, recording every step's logits."""
from __future__ import annotations

import torch


@torch.inference_mode()
def hf_greedy(model, ids: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """transformers with its own KV cache: logits over the prompt, then `steps` decode steps."""
    out = model(torch.tensor([ids], device=model.device), use_cache=True)
    logits, past = [out.logits[0]], out.past_key_values
    tokens = []
    for _ in range(steps):
        token = int(logits[-1][-1].argmax())
        tokens.append(token)
        out = model(torch.tensor([[token]], device=model.device), past_key_values=past, use_cache=True)
        logits.append(out.logits[0])
        past = out.past_key_values
    return logits, tokens


@torch.inference_mode()
def minirt_greedy(llm, ids: list[int], steps: int, cache=None) -> tuple[list[torch.Tensor], list[int]]:
    """minirt through its prefill and decode step: logits over the prompt, then `steps` steps."""
    from minirt.generation import DecodeStep, prefill

    cache = cache if cache is not None else llm.new_cache(len(ids) + steps + 1)
    logits = [prefill(llm, ids, cache, last_only=False)]
    step = DecodeStep(llm, cache)
    step.choose(logits[0][-1:])
    tokens = []
    for _ in range(steps):
        tokens.append(int(step.next[0]))
        step()
        logits.append(step.logits.clone())
    return logits, tokens


def max_logit_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


def max_rel_logit_diff(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Largest difference of each step's logits relative to that step's largest reference logit."""
    return max(float((x.float() - y.float()).abs().max() / y.float().abs().max()) for x, y in zip(ours, ref, strict=True))


def forced_logits(llm, ids: list[int], tokens: list[int]) -> torch.Tensor:
    """minirt's next-token logits after the prompt and after each of `tokens` fed in turn
    (teacher forcing, full attention): [len(tokens) + 1, V] in fp32."""
    from minirt.generation import forced_steps

    cache = llm.new_cache(len(ids) + len(tokens) + 1)
    return torch.stack(list(forced_steps(llm, ids, tokens, cache))).float()
