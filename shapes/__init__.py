"""The built-in shapes model: procedurally drawn scenes with exact masks, and the small Flux trained on them.

- `shapes.scenes`: the seeded scene generator (images, captions, per-word masks, the held-out seed range);
- `shapes.train`: `python -m shapes.train --out DIR` trains the tokenizer, the autoencoder, T5 and Flux;
- `shapes.eval`: quick alignment scores (concept-map IoU against the exact masks) on held-out scenes;
- `shapes/weights/`: the trained model, and `shapes/MODEL_CARD.md`: how it was made and what was measured.
"""

from .scenes import HELD_OUT_SEED_START, SHAPES, Scene, SceneConfig, held_out_seeds, make_batch, make_scene

__all__ = ["HELD_OUT_SEED_START", "SHAPES", "Scene", "SceneConfig", "held_out_seeds", "make_batch", "make_scene"]
