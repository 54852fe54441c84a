"""The Flux.1 MM-DiT with ConceptAttention's concept stream built into the double-stream block.

`math.py` holds the pure maths, `layers.py` the blocks, `model.py` the configs and the model.
"""

from .layers import ConceptSaliency
from .model import CONFIGS, ConceptInput, Flux, FluxConfig, FluxOutput

__all__ = ["CONFIGS", "ConceptInput", "ConceptSaliency", "Flux", "FluxConfig", "FluxOutput"]
