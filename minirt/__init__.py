"""minirt: a small decoder runtime with condensate sparse attention, checked against full attention."""
from .cache import CondensateCache, CondensateConfig, DenseCache
from .config import MODEL_ALIASES, ModelConfig
from .generate import Generation, Sampling, generate, stream_tokens
from .llm import LLM
from .model import Transformer

__all__ = [
    "LLM", "generate", "stream_tokens", "Sampling", "Generation", "CondensateConfig", "CondensateCache",
    "DenseCache", "ModelConfig", "MODEL_ALIASES", "Transformer",
]
