"""Does a generated image look like its prompt? The placement score of a shapes model.

    python -m shapes.placement --weights shapes/weights --scenes 100 --num-steps 4 20 50

For each held-out scene the caption names every shape with its colour and its place on a 3 x 3 grid ("a red circle
at the top left and a blue star in the middle"); the model draws an image from that caption, and a named shape counts
as placed when at least `coverage` of the pixels of its grid cell have its colour. Colours are recognised by hue, not
by exact value, so shaded shapes count: a pixel is classified as the world colour its RGB direction is closest to, when
it is saturated enough (max - min channel >= 48) and bright enough (max >= 60) to be a shape and not the background.

The score is the share of named shapes placed, over all scenes. The same measure on the held-out scenes' own images
(the ceiling: a shape's centroid lies in its cell, and shapes are large, so nearly all count) and on images generated
from the captions of other scenes (the floor: right colours in wrong places by chance) is printed beside it.

For a model whose captions never named places (`positions` 0 in its recipe) the presence score says the same without
places: from captions that name colours and shapes only, the share of named shapes whose colour covers at least 3 % of
the image (a shape of the smallest radius covers more than that), with the same ceiling and floor.
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from shapes.eval import load, sample
from shapes.scenes import COLOURS, WORLDS, Scene, SceneConfig, caption_for, held_out_seeds, make_scene

ROWS = {"top": 0, "bottom": 2}
COLUMNS = {"left": 0, "right": 2}


def cell_of(place: str) -> tuple[int, int]:
    """(row, column) on the 3 x 3 grid of a place name: "top left" -> (0, 0), "middle" -> (1, 1), "right" -> (1, 2)."""
    words = place.split()
    row = next((ROWS[w] for w in words if w in ROWS), 1)
    col = next((COLUMNS[w] for w in words if w in COLUMNS), 1)
    return row, col


def classify_colours(image: np.ndarray, colours: tuple[str, ...]) -> np.ndarray:
    """(H, W) index into `colours` of each pixel of a uint8 (H, W, 3) image, -1 where it is not a shape colour."""
    rgb = image.astype(np.float64)
    references = np.array([COLOURS[c] for c in colours], dtype=np.float64)  # (K, 3)
    directions = references / np.linalg.norm(references, axis=1, keepdims=True)
    cosine = rgb @ directions.T / np.linalg.norm(rgb, axis=-1, keepdims=True).clip(min=1e-6)  # (H, W, K)
    labels = cosine.argmax(-1)
    shape_like = (rgb.max(-1) - rgb.min(-1) >= 48) & (rgb.max(-1) >= 60)
    return np.where(shape_like, labels, -1)


def placed(image: np.ndarray, shapes: list[tuple[str, str]], places: list[str], colours: tuple[str, ...],
           coverage: float = 0.25) -> list[bool]:  # fmt: skip
    """For each named (colour, shape) at its place: does its colour cover at least `coverage` of that grid cell?"""
    labels = classify_colours(image, colours)
    size = image.shape[0]
    edges = [round(i * size / 3) for i in range(4)]
    hits = []
    for (colour, _), place in zip(shapes, places, strict=True):
        row, col = cell_of(place)
        cell = labels[edges[row] : edges[row + 1], edges[col] : edges[col + 1]]
        hits.append(bool((cell == colours.index(colour)).mean() >= coverage))
    return hits


def present(image: np.ndarray, shapes: list[tuple[str, str]], colours: tuple[str, ...], share: float = 0.03):
    """For each named (colour, shape): does its colour cover at least `share` of the image?"""
    labels = classify_colours(image, colours)
    return [bool((labels == colours.index(colour)).mean() >= share) for colour, _ in shapes]


def positioned_captions(scenes: list[Scene], config: SceneConfig, positions: float = 1.0) -> list[str]:
    """Every shape named with its colour (and with `positions` 1, its place), no background phrase."""
    captions = replace(config, positions=positions, colourless=0.0, background_phrase=0.0)
    rng = np.random.default_rng(0)  # unused by these options, but caption_for draws from it
    return [caption_for(s.shapes, s.background, s.places, rng, captions) for s in scenes]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()


def placement_score(images: np.ndarray, scenes: list[Scene], colours: tuple[str, ...], places: bool = True) -> float:
    """Share of the named shapes placed (or, without `places`, present), images (B, H, W, 3) uint8 against the scenes
    whose captions drew them."""
    hits = [
        h
        for image, s in zip(images, scenes, strict=True)
        for h in (placed(image, s.shapes, s.places, colours) if places else present(image, s.shapes, colours))
    ]
    return float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description="Placement score: do generated images follow their captions?")
    parser.add_argument("--weights", type=Path, required=True, help="a folder written by shapes.train")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--num-steps", type=int, nargs="+", default=[4, 20, 50])
    parser.add_argument("--shift", action="store_true", help="the shifted (dev) schedule instead of schnell's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    flux, t5, tok, ae, max_length = load(args.weights)
    world = json.loads((args.weights / "recipe.json").read_text()).get("world", "full")
    config = SceneConfig(size=ae.config.resolution, **WORLDS[world])
    scenes = [make_scene(s, config) for s in held_out_seeds(args.scenes)]
    own = np.stack([s.image for s in scenes])
    report = {}
    with torch.no_grad():
        for places in (True, False):
            measure = "placement" if places else "presence"
            captions = positioned_captions(scenes, config, 1.0 if places else 0.0)
            report[f"{measure}: ceiling (the scenes' own images)"] = placement_score(
                own, scenes, config.colours, places
            )
            for num_steps in args.num_steps:
                for name, prompts in (("", captions), (" (captions of other scenes)", captions[1:] + captions[:1])):
                    images = torch.cat([
                        sample(flux, t5, tok, ae, prompts[i : i + 25], max_length, num_steps, args.seed + i, args.shift)
                        for i in range(0, len(prompts), 25)
                    ])  # fmt: skip
                    score = placement_score(to_uint8(images), scenes, config.colours, places)
                    report[f"{measure}: {num_steps} steps{name}"] = score
    for name, value in report.items():
        print(f"{name:56s} {value:.3f}")


if __name__ == "__main__":
    main()
