"""`make demo`: the main job on the built-in shapes model, offline, on the CPU, in seconds.

1. `concept_attention.py generate`: the model draws a caption of its own world ("a red circle and a blue square on
   a black background" for the shaded world; the full world's captions also name places) and the concept maps for
   its two shapes and background are collected during the same sampling;
2. `concept_attention.py explain`: a held-out scene (a seed training never drew) is drawn, written with its true masks,
   and explained with the concepts of its shapes and "background".
Everything lands in `out/demo/` (image, overlay, heatmaps, masks, maps, settings), and the commands are printed so
they can be rerun by hand.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from PIL import Image

import concept_attention
from concept_attention import BUILTIN_MODEL
from shapes.scenes import held_out_seeds, make_scene, model_scenes

PROMPTS = {  # per world (shapes.scenes.WORLDS): two shapes, their colours and places, and the background
    "full": ("a red circle at the top left and a blue star at the bottom right on a white background", "circle",
             "star"),
    "simple": ("a red circle at the top left and a blue square at the bottom right on a black background", "circle",
               "square"),
    "shaded": ("a red circle and a blue square on a black background", "circle", "square"),  # most saw no places
}  # fmt: skip


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
    scene = make_scene(next(s for s in held_out_seeds(50, start=7) if len(make_scene(s, config).shapes) == 2), config)
    (out_dir / "scene" / "true_masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene.image).save(out_dir / "scene" / "scene.png")
    concepts = [kind for _, kind in scene.shapes] + ["background"]
    for word in concepts:
        Image.fromarray(scene.masks[word].astype("uint8") * 255).save(out_dir / "scene" / "true_masks" / f"{word}.png")
    code = command(["explain", "--model", "shapes", "--image", str(out_dir / "scene" / "scene.png"),
                    "--concepts", *concepts, "--out", str(out_dir / "explain")])  # fmt: skip
    if code == 0:
        print(f"look at {out_dir}/generate/overlay.png and {out_dir}/explain/overlay.png "
              f"(true masks of the scene: {out_dir}/scene/true_masks/)")  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
