"""Test helper: write a transformers checkpoint as a GGUF file the way llama.cpp's converter does
(its tensor names and metadata keys, Llama q/k rows permuted, GPT-2's Conv1D transposed, GPT-NeoX's
per-head qkv regrouped), through the `gguf` library's writer."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import pre_tokenizers

ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2", "gpt_neox": "gptneox"}
BYTE_TOKENS = sorted(pre_tokenizers.ByteLevel.alphabet())


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's row order for Llama q/k (pairs instead of halves)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(family: str, cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict -> llama.cpp tensor names and layouts."""
    out: dict[str, torch.Tensor] = {}
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    for name, t in state.items():
        n = name
        if family == "gpt2":
            n = n.removeprefix("transformer.")
            if n.endswith(".weight") and any(x in n for x in ("c_attn", "c_proj", "c_fc")):
                t = t.t()
            for a, b in [("wte", "token_embd"), ("wpe", "position_embd"), ("ln_f", "output_norm"), ("h.", "blk."),
                         ("ln_1", "attn_norm"), ("ln_2", "ffn_norm"), ("attn.c_attn", "attn_qkv"),
                         ("attn.c_proj", "attn_output"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")]:
                n = n.replace(a, b)
        elif family == "gpt_neox":
            if "query_key_value" in n:
                t = t.view(heads, 3, t.shape[0] // (3 * heads), *t.shape[1:]).transpose(0, 1).reshape(t.shape)
            for a, b in [("gpt_neox.embed_in", "token_embd"), ("embed_out", "output"), ("lm_head", "output"),
                         ("gpt_neox.final_layer_norm", "output_norm"), ("gpt_neox.layers.", "blk."),
                         ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                         ("attention.query_key_value", "attn_qkv"), ("attention.dense", "attn_output"),
                         ("mlp.dense_h_to_4h", "ffn_up"), ("mlp.dense_4h_to_h", "ffn_down")]:
                n = n.replace(a, b)
        else:
            if family != "qwen2" and ("q_proj" in n or "k_proj" in n):
                t = permute(t, heads if "q_proj" in n else kv_heads)
            for a, b in [("model.embed_tokens", "token_embd"), ("lm_head", "output"), ("model.norm", "output_norm"),
                         ("model.layers.", "blk."), ("input_layernorm", "attn_norm"),
                         ("post_attention_layernorm", "ffn_norm"), ("self_attn.q_proj", "attn_q"),
                         ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                         ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"),
                         ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")]:
                n = n.replace(a, b)
        if "rotary_emb" in n or n.endswith((".attn.bias", ".masked_bias")):
            continue
        out[n] = t
    if family == "gpt2":
        out["output.weight"] = out["token_embd.weight"]  # llama.cpp writes GPT-2's tied head out
    return out


def write_gguf(folder: Path, path: Path, quant: gguf.GGMLQuantizationType | None = None, arch: str | None = None,
               tokenizer_model: str = "gpt2", pre: str = "default", extra: dict[str, np.ndarray] | None = None) -> Path:
    """Convert the transformers checkpoint in `folder` to `path`; 2-D weights quantised as `quant`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    family = cfg.model_type
    state = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    if getattr(cfg, "tie_word_embeddings", False) and family != "gpt2":
        state.pop("lm_head.weight", None)
    arch = arch or ARCH[family]
    w = gguf.GGUFWriter(str(path), arch)
    if family == "gpt2":
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        if family == "gpt_neox":
            w.add_rope_dimension_count(int(head_dim * cfg.rope_parameters.get("partial_rotary_factor", 1.0)))
            w.add_layer_norm_eps(cfg.layer_norm_eps)
            w.add_bool(f"{arch}.use_parallel_residual", cfg.use_parallel_residual)
        else:
            w.add_rope_dimension_count(head_dim)
            w.add_head_count_kv(cfg.num_key_value_heads)
            w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens = BYTE_TOKENS[: cfg.vocab_size] + [f"<extra{i}>" for i in range(cfg.vocab_size - len(BYTE_TOKENS))]
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges([])
    w.add_eos_token_id(len(tokens) - 1)
    for name, t in {**gguf_tensors(family, cfg, state), **(extra or {})}.items():
        data = t.float().numpy() if isinstance(t, torch.Tensor) else t
        if quant is not None and data.ndim == 2 and data.shape[1] % 32 == 0 and name != "token_embd.weight":
            w.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
