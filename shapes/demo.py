"""`make demo`: the main job on the built-in shapes model, offline, on the CPU, in about a minute and a half.

1. `concept_attention.py generate`: the model draws a caption of its own world ("a red circle and a blue square on
   a black background" for the shaded world; the full world's captions also name places) and the concept maps for
   its two shapes and background are collected during the same sampling;
2. `concept_attention.py explain`, twice, on one held-out test scene (a seed training never drew, written with its
   true masks) with its caption as the prompt: once with the world's shape words and "background", once with its
   colour words and "background". Both use the model's own concept layers (its recipe.json `layers`), as every
   command does when no `--layers` is given;
3. the two side by side in one picture, `explained.png`: for each word its map over the scene and its true mask,
   every map on the one fixed scale of the softmax over the concepts (0 to 1), with its colour bar, and a title that
   says which layers were read. The numbers that say how typical this scene is are in the README (500 test scenes).
Everything lands in `out/demo/` (images, overlays, heatmaps, masks, maps, settings), and the commands are printed so
they can be rerun by hand.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file

import concept_attention
import imaging
from concept_attention import BUILTIN_MODEL
from shapes.scenes import Scene, held_out_seeds, make_scene, model_scenes

PROMPTS = {  # per world (shapes.scenes.WORLDS): two shapes, their colours and places, and the background
    "full": ("a red circle at the top left and a blue star at the bottom right on a white background", "circle",
             "star"),
    "simple": ("a red circle at the top left and a blue square at the bottom right on a black background", "circle",
               "square"),
    "shaded": ("a red circle and a blue square on a black background", "circle", "square"),  # most saw no places
}  # fmt: skip
FIGURE = "explained.png"  # the side-by-side picture (docs/demo_explained.png in the README is a copy)


def python() -> str:
    """This interpreter as a user types it: `.venv/bin/python` from the repository, else its absolute path."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def command(argv: list[str]) -> int:
    print(f"$ {python()} concept_attention.py " + " ".join(shlex.quote(a) for a in argv), flush=True)
    return concept_attention.main(argv)


def explained_figure(scene: Scene, parts: list[tuple[str, Path]]) -> Image.Image:
    """One block per (title, explain output folder): a row of the scene and each concept's map over it, and a row of
    each concept's true mask; every map on the softmax's fixed scale [0, 1], one colour bar under all of them."""
    font = ImageFont.load_default()
    blocks = []
    for title, folder in parts:
        settings = json.loads((folder / "settings.json").read_text())
        maps = load_file(folder / "maps.safetensors")["maps"]  # [C, h, w], softmaxed over the concepts
        concepts = settings["concepts"]
        image = Image.open(folder / "image.png").convert("RGB")
        heat = [imaging.colorize(m, 0.0, 1.0).resize(image.size, Image.BILINEAR) for m in maps]
        empty = np.zeros(scene.image.shape[:2], dtype=bool)
        truth = [Image.fromarray(scene.masks.get(c, empty).astype(np.uint8) * 255).convert("RGB") for c in concepts]
        tiles = [image, *(imaging.blend(image, h) for h in heat), Image.new("RGB", image.size, "white"), *truth]
        captions = ["scene", *(f"map: {c}" for c in concepts), "", *(f"true: {c}" for c in concepts)]
        grid = imaging.captioned_grid(tiles, captions, columns=len(concepts) + 1)
        layers = settings.get("layers_used", [])
        where = settings.get("layers_from")
        where = "the model's recipe.json" if where == "recipe.json" else where
        block = "blocks" if len(layers) > 1 else "block"
        header = f"{title}: double {block} {', '.join(map(str, layers))} ({where}), t = {settings['t']:g}"
        canvas = Image.new("RGB", (grid.width, grid.height + 16), "white")
        ImageDraw.Draw(canvas).text((3, 2), header, fill="black", font=font)
        canvas.paste(grid, (0, 16))
        blocks.append(canvas)
    width = max(b.width for b in blocks)
    stacked = Image.new("RGB", (width, sum(b.height for b in blocks) + 6 * (len(blocks) - 1)), "white")
    y = 0
    for b in blocks:
        stacked.paste(b, (0, y))
        y += b.height + 6
    return imaging.with_colorbar(stacked, 0.0, 1.0, "output space, softmax over each row's words")


def main(out: str = "out/demo") -> int:
    if not (BUILTIN_MODEL / "recipe.json").is_file():
        print(f"error: the built-in model is missing from {BUILTIN_MODEL}; train it with `{python()} -m shapes.train`")
        return 2
    config = model_scenes(BUILTIN_MODEL)  # the world the model was trained on, at its size
    size = config.size
    prompt, *shapes = PROMPTS[json.loads((BUILTIN_MODEL / "recipe.json").read_text()).get("world", "full")]
    out_dir = Path(out)
    code = command(["generate", "--model", "shapes", "--prompt", prompt, "--concepts", *shapes, "background",
                    "--size", str(size), "--seed", "0", "--out", str(out_dir / "generate")])  # fmt: skip
    if code:
        return code
    # the first two-shape scene from test seed 7 on: a fixed choice, not the best-looking one
    scene = make_scene(next(s for s in held_out_seeds(50, start=7) if len(make_scene(s, config).shapes) == 2), config)
    (out_dir / "scene" / "true_masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene.image).save(out_dir / "scene" / "scene.png")
    words = {"shape words": [*config.shapes, "background"], "colour words": [*config.colours, "background"]}
    for word in {w for group in words.values() for w in group}:
        mask = scene.masks.get(word, np.zeros(scene.image.shape[:2], dtype=bool))
        Image.fromarray(mask.astype("uint8") * 255).save(out_dir / "scene" / "true_masks" / f"{word}.png")
    parts = []
    for title, concepts in words.items():
        folder = out_dir / f"explain_{title.split()[0]}s"
        code = command(["explain", "--model", "shapes", "--image", str(out_dir / "scene" / "scene.png"),
                        "--prompt", scene.caption, "--concepts", *concepts, "--out", str(folder)])  # fmt: skip
        if code:
            return code
        parts.append((title, folder))
    explained_figure(scene, parts).save(out_dir / FIGURE)
    print(f"look at {out_dir}/{FIGURE} (the scene explained with shape words and with colour words, beside the true "
          f"masks) and {out_dir}/generate/overlay.png")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
