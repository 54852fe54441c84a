"""CogVideoX (2B and 5B) with ConceptAttention's concept stream in its expert-norm block.

`layers.py` holds the block and the positions (3D sin-cos table, 3D RoPE grid), `model.py` the configs and the
transformer; the samplers and the 3D autoencoder have their own files. The pure maths and the saliency spaces are
Flux's (`mmdit.math`, `mmdit.layers`).
"""

from .model import CONFIGS, CogVideoX, CogVideoXConfig, CogVideoXOutput

__all__ = ["CONFIGS", "CogVideoX", "CogVideoXConfig", "CogVideoXOutput"]
