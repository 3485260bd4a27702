"""minirt: a small decoder runtime with condensate sparse attention, checked against full attention.

Names are imported on first use (PEP 562), so `run.py --help` and the config classes need no torch.
"""
from importlib import import_module

_WHERE = {
    "LLM": "llm", "generate": "generation", "stream_tokens": "generation", "Generation": "generation",
    "Sampling": "config", "CondensateConfig": "config", "ModelConfig": "config", "MODEL_ALIASES": "config",
    "CondensateCache": "cache", "DenseCache": "cache", "Transformer": "model",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'minirt' has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
