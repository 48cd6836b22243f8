"""superlinear_lab.model: the small hybrid causal LM (Mamba-2 SSM + superlinear attention blocks), its static
cache, byte tokenizer, config and safetensors weights."""
from .config import ModelConfig
from .hybrid import HybridCache, HybridLM
from .io import describe_model, load_model, model_fingerprint, save_model
from .tokenizer import ByteTokenizer

__all__ = ["ModelConfig", "HybridLM", "HybridCache", "ByteTokenizer", "load_model", "save_model",
           "model_fingerprint", "describe_model"]
