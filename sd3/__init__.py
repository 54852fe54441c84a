"""Stable Diffusion 3.5's MM-DiT (Large, Large Turbo, Medium) with ConceptAttention's concept stream in its joint block.

`layers.py` holds the joint block, `model.py` the configs and the model, `text.py` the prompt encoding (CLIP-L,
OpenCLIP bigG and T5-XXL). The pure maths and the saliency spaces are Flux's (`mmdit.math`, `mmdit.layers`).
"""

from .model import CONFIGS, SD3, SD3Config, SD3Output

__all__ = ["CONFIGS", "SD3", "SD3Config", "SD3Output"]
