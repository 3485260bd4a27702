"""Loader errors name the file and the tensor; nothing half-loaded is returned."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minirt import LLM
from minirt.config import ConfigError
from minirt.weights.loader import WeightsError


def test_missing_shard(tiny_checkpoint):
    folder = tiny_checkpoint("llama", save_kwargs={"max_shard_size": "40KB"})
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"shard {shard.name} is missing"):
        LLM.load(folder, device="cpu")


def edit_tensors(folder, edit) -> None:
    """Rewrite the checkpoint's model.safetensors with edit(tensors) applied."""
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_tensor_of_wrong_shape(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    edit_tensors(folder, lambda t: t.update({"model.layers.1.mlp.down_proj.weight": torch.zeros(64, 100)}))
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor model\.layers\.1\.mlp\.down_proj\.weight has shape \(64, 100\), expected \(64, 128\)"):
        LLM.load(folder, device="cpu")


def test_missing_tensor(tiny_checkpoint):
    folder = tiny_checkpoint("gpt2")
    edit_tensors(folder, lambda t: t.pop("transformer.h.0.ln_2.bias"))
    with pytest.raises(WeightsError, match=r"tensor transformer\.h\.0\.ln_2\.bias not found"):
        LLM.load(folder, device="cpu")


def test_unknown_model_type(tiny_checkpoint):
    folder = tiny_checkpoint("qwen2")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unknown model_type 'mamba'"):
        LLM.load(folder, device="cpu")


def test_malformed_config(tiny_checkpoint):
    folder = tiny_checkpoint("qwen2")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        LLM.load(folder, device="cpu")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="model_type 'llama' needs field 'num_attention_heads'"):
        LLM.load(folder, device="cpu")


def test_truncated_safetensors(tiny_checkpoint):
    folder = tiny_checkpoint("gpt_neox")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors: cannot read"):
        LLM.load(folder, device="cpu")


def test_no_safetensors(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors"):
        LLM.load(folder, device="cpu")


def test_old_gpt2_names_without_prefix(tiny_checkpoint):
    """The original gpt2 upload stores 'h.0.attn...' with no 'transformer.' prefix."""
    from parity import hf_greedy, max_logit_diff, minirt_greedy
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoint("gpt2")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    file = folder / "model.safetensors"
    save_file({k.removeprefix("transformer."): v for k, v in load_file(file).items()}, file)
    llm = LLM.load(folder, device="cpu", dtype="fp32")
    ids = [5, 17, 3, 42, 8]
    assert max_logit_diff(hf_greedy(ref, ids, 3)[0], minirt_greedy(llm, ids, 3)[0]) <= 1e-4


def test_unsupported_rope_type(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported rope type 'yarn'"):
        LLM.load(folder, device="cpu")
