"""The measured benchmark of the built-in model: concept maps against the exact masks of held-out scenes, scored by
the segmentation harness (`segmentation.run`), beside trivial baselines.

    python -m shapes.benchmark --scenes 500 --out runs/shapes-benchmark

Two protocols, both on scenes whose seeds training never draws (`shapes.scenes.held_out_seeds`):
- `shapes-multi`: concepts = the shape words of the scene + "background"; every pixel goes to its argmax concept;
  pixel accuracy and mIoU over background and the six shapes, mAP = per image the mean AP of each shape's map;
- `shapes-single`: one item per (scene, shape): concepts = [shape, "background"], mask = the shape's map above its
  mean (the paper's rule); two-class mIoU (the shape and the rest), the shape's AP. Chance is about 0.3 here.
Each compares the output space, the attention-score space, the value space and the cross-attention baseline, with and
without softmax, for every single double block and for all of them, at several noise levels, from one forward per
image and noise level. The baselines use no model: "all background" and "centred disc" (a disc of the mean shape
size in the middle, given to the scene's first shape).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from segmentation import metrics
from segmentation.datasets import FolderSegmentation
from segmentation.protocols import Protocol
from segmentation.run import method_grid, run
from shapes.scenes import SceneConfig, held_out_seeds, make_scene, model_scenes

SPACES = ("output", "attention", "value", "cross_attention")


def protocol(name: str, size: int, caption: str) -> Protocol:
    """The shapes protocols: a scene at its own size, no resizing, scored at full resolution."""
    multi = name == "shapes-multi"
    return Protocol(
        name=name, task="multiclass" if multi else "binary", background=("background",), class_first=True,
        caption=caption, resize=((size, "nearest"),), label_size=size, t=0.5, num_samples=1, seed=0, space="output",
        softmax=True, layers=None, normalize=False, blur=False, rule="mean", score_scale="minmax", token_rule="mean",
        class_map="none",
    )  # fmt: skip


def write_scenes(folder: Path, count: int, config: SceneConfig, per_shape: bool) -> FolderSegmentation:
    """Held-out scenes as a folder dataset (images/, masks/, concepts.json). With `per_shape`, one item per
    (scene, shape) with that shape's binary mask; otherwise one item per scene with an index mask of its shapes."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    index: dict[str, list[str]] = {}
    for n, seed in enumerate(held_out_seeds(count)):
        scene = make_scene(seed, config)
        kinds = [kind for _, kind in scene.shapes]
        items = [(f"{n:04d}_{kind}", [kind]) for kind in kinds] if per_shape else [(f"{n:04d}", kinds)]
        for stem, classes in items:
            mask = np.zeros((config.size, config.size), dtype=np.uint8)
            for k, kind in enumerate(classes, start=1):
                mask[scene.masks[kind]] = k
            Image.fromarray(scene.image).save(folder / "images" / f"{stem}.png")
            Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")
            index[f"{stem}.png"] = classes
    (folder / "concepts.json").write_text(json.dumps(index, indent=0))
    return FolderSegmentation(folder)


def baselines(dataset: FolderSegmentation, binary: bool, size: int) -> dict[str, dict]:
    """Scores of two predictions that look at no image: everything background, and a centred disc."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
    disc = (np.hypot(x, y) < 0.21).astype(np.int64)  # the mean shape radius, as a fraction of the size
    class_names = ("background", "object") if binary else dataset.class_names
    out = {}
    for name, shape in (("all background", np.zeros_like(disc)), ("centred disc", disc)):
        stats = []
        for i in range(len(dataset)):
            label, classes = dataset.label(i)
            first = dataset.class_names.index(dataset.items[i][1][0])
            if binary:
                label = np.where(label == 255, 255, (label != 0).astype(np.uint8))
                pred, scores = shape, shape.astype(float)
            else:
                pred = shape * first
                scores = {dataset.class_names.index(c): shape.astype(float) for c in dataset.items[i][1]}
            stats.append(metrics.image_stats(i, dataset.key(i), pred, label, len(class_names), scores))
        out[name] = metrics.summarize(stats, class_names)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapes.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="the built-in model, or another folder")
    parser.add_argument("--scenes", type=int, default=500, help="held-out scenes (default 500)")
    parser.add_argument("--size", type=int, default=None, help="scene size (default: the model card's)")
    parser.add_argument("--t", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="noise levels compared")
    parser.add_argument("--caption", default="", help="prompt template, e.g. 'a {name}' (default: empty prompt)")
    parser.add_argument("--out", default="runs/shapes-benchmark")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from concept_attention import ConceptAttentionPipeline

    pipe = ConceptAttentionPipeline.from_pretrained(args.model, device=args.device)
    config = model_scenes(pipe.source, args.size)  # the world the model was trained on, at its size
    size = config.size
    depth = len(pipe.flux.double_blocks)
    layers = [None, *[(i,) for i in range(depth)]]
    out = Path(args.out)
    summary = {}
    for name in ("shapes-multi", "shapes-single"):
        binary = name == "shapes-single"
        data = write_scenes(out / name / "data", args.scenes, config, per_shape=binary)
        methods = method_grid(SPACES, [True, False], layers, args.t, [False])
        results = run(pipe, data, protocol(name, size, args.caption), methods, out / name, model=args.model)
        summary[name] = {"methods": {m["name"]: m["metrics"] for m in results["methods"]},
                         "baselines": baselines(data, binary, size)}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(report(summary, args.scenes))
    return 0


def report(summary: dict, scenes: int) -> str:
    """The README's table: each space at its best layer choice and noise level, with and without softmax."""
    lines = []
    for name, part in summary.items():
        lines += [f"### {name} ({scenes} held-out scenes)", "", "| method | Acc | mIoU | mAP |", "|---|---|---|---|"]
        rows = []
        for space in SPACES:
            for softmax in (True, False):
                tag = f"{space}{' softmax' if softmax else ''}"
                cands = {k: v for k, v in part["methods"].items() if k.split(" layers=")[0] == tag}
                best = max(cands, key=lambda k: cands[k]["miou"])
                every = next(k for k in cands if "layers=all" in k and "t=0.5" in k)
                rows += [(every, cands[every]), (f"{best} (best on these scenes)", cands[best])]
        rows += [(k, v) for k, v in part["baselines"].items()]
        for label, m in rows:
            ap = "-" if m.get("map") is None else f"{100 * m['map']:.1f}"
            lines.append(f"| {label} | {100 * m['acc']:.1f} | {100 * m['miou']:.1f} | {ap} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
