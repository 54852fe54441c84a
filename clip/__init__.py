"""CLIP-L text encoder (FLUX.1's text_encoder, for the pooled vector) and its BPE tokenizer (tokenizer)."""

from .model import CONFIGS, CLIPTextConfig, CLIPTextEncoder
from .tokenizer import CLIPTokenizer

__all__ = ["CONFIGS", "CLIPTextConfig", "CLIPTextEncoder", "CLIPTokenizer"]
