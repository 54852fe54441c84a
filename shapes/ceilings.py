"""Floors and ceilings of `shapes.eval`'s metric on a world's held-out scenes at a token grid, with no model involved.

    python -m shapes.ceilings --size 256 --world shaded --scenes 100

For the shape words of every scene (concepts: the world's shapes and "background", as `shapes.eval` scores them):
random maps; a centred disc of the mean shape radius (0.21 of the image, as `shapes.benchmark`'s baseline), the same
for every concept; every shape of the scene, pooled, the same for every concept ("all shapes": a map that finds the
objects but cannot tell them apart, the level a raw map must beat to show it reads its word); the true masks
average-pooled to the token grid (the best a map of that grid can do, "pooled oracle"); and the pooled masks sharpened
by a softmax over the concepts (8 x pooled). Each map is scored exactly as a model's map is (`shapes.measures.score`):
upsampled, thresholded at its mean, foreground and background IoU averaged (mIoU), and with each pixel given to the
word whose map is highest there (argmax).
"""

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from shapes.eval import world_concepts
from shapes.measures import score
from shapes.scenes import WORLDS, SceneConfig, held_out_seeds, make_scene


def ceilings(size: int, world: str = "shaded", scenes: int = 100) -> dict[str, dict[str, float]]:
    """The scores of `shapes.measures.score` for the five reference maps on `scenes` held-out scenes of `world` at
    `size` pixels (a token grid of size / 16)."""
    config = SceneConfig(size=size, **WORLDS[world])
    drawn = [make_scene(s, config) for s in held_out_seeds(scenes)]
    concepts = list(world_concepts(world)[0])
    g = size // 16
    words = [concepts] * scenes
    empty = np.zeros((size, size), dtype=bool)
    pooled = torch.stack([
        torch.stack([F.adaptive_avg_pool2d(torch.from_numpy(s.masks.get(c, empty)).float()[None], (g, g))[0]
                     for c in concepts])
        for s in drawn
    ])  # fmt: skip
    y, x = torch.meshgrid((torch.arange(g) + 0.5) / g - 0.5, (torch.arange(g) + 0.5) / g - 0.5, indexing="ij")
    disc = (torch.hypot(x, y) < 0.21).float()
    shapes = [i for i, c in enumerate(concepts) if c != "background"]
    objects = pooled[:, shapes].amax(1, keepdim=True)  # (S, 1, g, g): pooled union bound, every shape at full weight
    maps = {
        "random": torch.rand(scenes, len(concepts), g, g, generator=torch.Generator().manual_seed(0)),
        "centred disc": disc.expand(scenes, len(concepts), g, g).clone(),
        "all shapes": objects.expand(scenes, len(concepts), g, g).clone(),
        "pooled oracle": pooled,
        "sharpened oracle": (8 * pooled).softmax(1),
    }
    return {name: {k: round(v, 3) for k, v in score(m, drawn, words).items()} for name, m in maps.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapes.ceilings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs="+", default=[128, 256], help="scene sizes (grid = size / 16)")
    parser.add_argument("--world", default="shaded", choices=sorted(WORLDS))
    parser.add_argument("--scenes", type=int, default=100)
    args = parser.parse_args(argv)
    for size in args.size:
        print(json.dumps({"size": size, "grid": size // 16, "world": args.world, "scenes": args.scenes,
                          **ceilings(size, args.world, args.scenes)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
