"""The CLIP text encoder (FLUX.1's CLIP-L; SD3's CLIP-L and bigG, by config) and its BPE tokenizer."""

from .model import CONFIGS, CLIPTextConfig, CLIPTextEncoder
from .tokenizer import CLIPTokenizer

__all__ = ["CONFIGS", "CLIPTextConfig", "CLIPTextEncoder", "CLIPTokenizer"]
