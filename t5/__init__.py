"""T5 v1.1 encoder (FLUX.1's text_encoder_2) and its SentencePiece tokenizer (tokenizer_2)."""

from .model import CONFIGS, T5Config, T5Encoder
from .tokenizer import T5Tokenizer

__all__ = ["CONFIGS", "T5Config", "T5Encoder", "T5Tokenizer"]
