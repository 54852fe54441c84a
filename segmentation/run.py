"""One pass over a dataset that scores several saliency methods, resumes from a per-image map cache and shards by rank.

A `Method` is one way to turn the explain forward into maps: saliency space, softmax, layers, noise level t and blur.
Methods with the same t share one forward per image: the pipeline is called once with `keep_grid=True` and every
method's maps come from `result.select(space, softmax, layers)`. Those maps are cached per image under
`OUT/cache/<forward hash>/<image key>.pt` (written atomically), so an interrupted run picks up where it stopped and a
later run with more methods only computes what is missing.

Sharding: rank r of w takes every w-th selected image (`RANK`/`WORLD_SIZE` from torchrun, or explicit arguments) and
writes `OUT/shards/rank-r-of-w.json` with per-image sufficient statistics (intersections, unions, correct, labelled and
ignored pixel counts, APs). When all w shards are present the last rank to finish merges them (`merge` does it by hand)
into `OUT/results.json` (every setting and number) and `OUT/results.md` (a table); sums run in image order, so a sharded
run gives the same numbers as one process.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import metrics
from .protocols import (
    Protocol,
    binary_prediction,
    blur3x3,
    concepts_for,
    load_class_map,
    multiclass_prediction,
    resize_image,
    resize_label,
    score_map,
    upsample_nearest,
)


@dataclass(frozen=True)
class Method:
    space: str = "output"
    softmax: bool = True
    layers: tuple[int, ...] | None = None
    t: float = 0.5
    blur: bool = False

    @property
    def name(self) -> str:
        layers = "all" if self.layers is None else format_layers(self.layers)
        softmax, blur = " softmax" if self.softmax else "", " blur" if self.blur else ""
        return f"{self.space}{softmax} layers={layers} t={self.t:g}{blur}"

    @property
    def select_key(self) -> str:
        return f"{self.space}|{int(self.softmax)}|{'all' if self.layers is None else format_layers(self.layers)}"


def format_layers(layers: tuple[int, ...]) -> str:
    if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(i) for i in layers)


def parse_layers(text: str) -> tuple[int, ...] | None:
    """'all' -> None, '14-17' -> (14, 15, 16, 17), '3,5' -> (3, 5)."""
    if text == "all":
        return None
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return tuple(out)


def method_grid(spaces, softmax, layers, ts, blur) -> list[Method]:
    """Every combination of the given choices, in a stable order."""
    return [Method(*m) for m in itertools.product(spaces, softmax, layers, ts, blur)]


def digest(data) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def select_images(dataset, protocol: Protocol, limit: int | None) -> list[int]:
    """Indices scored under the protocol: binary tasks keep images whose resized label holds exactly one class."""
    chosen = []
    for i in range(len(dataset)):
        if limit is not None and len(chosen) >= limit:
            break
        if protocol.task == "binary":
            values = set(np.unique(resize_label(dataset.label(i)[0], protocol.label_size)).tolist()) - {0, 255}
            if len(values) != 1:
                continue
        chosen.append(i)
    return chosen


class MapCache:
    """Per-image maps of each `select_key`, for one forward configuration (t, samples, seed, model, concepts...)."""

    def __init__(self, root: Path, forward: dict):
        self.forward = forward
        self.dir = root / "cache" / digest(forward)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "forward.json").write_text(json.dumps(forward, indent=1, default=str))

    def load(self, key: str, concepts: list[str], caption: str) -> dict[str, torch.Tensor]:
        path = self.dir / f"{key}.pt"
        if not path.is_file():
            return {}
        data = torch.load(path, weights_only=True)
        if data["concepts"] != concepts or data["caption"] != caption:
            return {}  # written under another concept list: recompute
        return data["maps"]

    def save(self, key: str, concepts: list[str], caption: str, maps: dict[str, torch.Tensor]) -> None:
        path = self.dir / f"{key}.pt"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"concepts": concepts, "caption": caption, "maps": maps}, tmp)
        os.replace(tmp, path)


def forward_maps(pipe, cache: MapCache, key: str, image, concepts: list[str], caption: str, protocol: Protocol,
                 t: float, methods: list[Method]) -> dict[str, torch.Tensor]:  # fmt: skip
    """Maps for every method at this t, from the cache or from one explain forward (whose grid serves them all)."""
    from concept_attention import Settings

    maps = cache.load(key, concepts, caption)
    missing = [m for m in methods if m.select_key not in maps]
    if missing:
        settings = Settings(space=missing[0].space, softmax=missing[0].softmax, normalize=protocol.normalize,
                            token_rule=protocol.token_rule)  # fmt: skip
        result = pipe.explain(image, concepts, prompt=caption, t=t, num_samples=protocol.num_samples,
                              seed=protocol.seed, settings=settings, keep_grid=True, progress=False)  # fmt: skip
        for m in missing:
            maps[m.select_key] = result.select(space=m.space, softmax=m.softmax, layers=m.layers).float().cpu()
        cache.save(key, concepts, caption, maps)
    return maps


def score(method: Method, maps: torch.Tensor, owners: list, label: np.ndarray, protocol: Protocol,
          num_classes: int, class_index: dict[str, int]) -> tuple[np.ndarray, np.ndarray | dict]:  # fmt: skip
    """Prediction and scores at the label's size: the foreground score map (binary tasks) or one score map per listed
    class (multi-class tasks)."""
    if method.blur:
        maps = blur3x3(maps)
    size = protocol.label_size
    if protocol.task == "binary":
        target = next(i for i, o in enumerate(owners) if o is not None)
        pred = upsample_nearest(binary_prediction(maps, target, protocol.rule), size).long().numpy()
        scores = upsample_nearest(score_map(maps, target, protocol.score_scale), size).numpy()
        return pred, scores
    labels = [0 if o is None else class_index[o] for o in owners]
    pred = upsample_nearest(multiclass_prediction(maps, labels), size).long().numpy()
    # scores per listed class (its first concept's map), for the per-class AP of multi-class tasks
    scores = {c: upsample_nearest(score_map(maps, labels.index(c), protocol.score_scale), size).numpy()
              for c in sorted(set(labels) - {0})}  # fmt: skip
    return pred, scores


def run(pipe, dataset, protocol: Protocol, methods: list[Method], out: str | Path, limit: int | None = None,
        rank: int = 0, world_size: int = 1, class_map: str | None = None, model: str = "custom",
        progress: bool = True) -> dict | None:  # fmt: skip
    """Score `methods` on this rank's share of the images; merge and return the results once every shard is in."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if not methods:
        raise ValueError("no methods to score: give at least one space, softmax, layers, t and blur choice")
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    class_map = class_map or protocol.class_map
    names = load_class_map(class_map)
    selected = select_images(dataset, protocol, limit)
    config = {"protocol": protocol.to_json(), "dataset": dataset.describe(), "model": model, "class_map": class_map,
              "limit": limit, "selected": len(selected), "methods": [m.name for m in methods]}  # fmt: skip
    caches = {}
    for t in sorted({m.t for m in methods}):
        forward = {"model": model, "t": t, "num_samples": protocol.num_samples, "seed": protocol.seed,
                   "normalize": protocol.normalize, "token_rule": protocol.token_rule, "resize": protocol.resize,
                   "dataset": config["dataset"]["dataset"]}  # fmt: skip
        caches[t] = MapCache(out, forward)
    binary = protocol.task == "binary"
    if not binary and getattr(dataset, "class_names", None) is None:
        raise ValueError(f"protocol {protocol.name} is multi-class; this dataset has binary masks only")
    class_names = ("background", "object") if binary else dataset.class_names
    class_index = {} if binary else {name: i for i, name in enumerate(class_names)}
    stats: dict[str, list[metrics.ImageStats]] = {m.name: [] for m in methods}
    mine = selected[rank::world_size]
    if progress:
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc=f"{protocol.name} rank {rank}/{world_size}", unit="image", position=rank)
    for i in mine:
        sample = dataset[i]
        label = resize_label(sample.mask, protocol.label_size)
        present = [sample.classes[v] for v in sorted(set(np.unique(label).tolist()) - {0, 255})]
        if binary:
            label = np.where(label == 255, 255, (label != 0).astype(np.uint8))
        concepts, caption, owners = concepts_for(protocol, present, names, class_map)
        image = resize_image(sample.image, protocol.resize)
        for t, cache in caches.items():
            group = [m for m in methods if m.t == t]
            maps = forward_maps(pipe, cache, sample.key, image, concepts, caption, protocol, t, group)
            for m in group:
                pred, scores = score(m, maps[m.select_key], owners, label, protocol, len(class_names), class_index)
                s = metrics.image_stats(i, sample.key, pred, label, len(class_names), scores)
                s.extra = {"concepts": concepts, "caption": caption}
                stats[m.name].append(s)
    hashed = {**config, "dataset": {k: v for k, v in config["dataset"].items() if k != "path"}}  # paths may differ
    shard = {"config": config, "config_hash": digest(hashed), "rank": rank, "world_size": world_size,
             "indices": selected[rank::world_size], "class_names": list(class_names),
             "methods": [{"name": m.name, "settings": asdict(m)} for m in methods],
             "stats": {name: [s.to_json() for s in v] for name, v in stats.items()}}  # fmt: skip
    path = out / "shards" / f"rank-{rank}-of-{world_size}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(shard))
    os.replace(tmp, path)
    shards = sorted((out / "shards").glob(f"rank-*-of-{world_size}.json"))
    return merge(out, world_size) if len(shards) == world_size else None


def merge(out: str | Path, world_size: int | None = None) -> dict:
    """Combine the shard files of one run (same settings) into results.json and results.md."""
    out = Path(out)
    files = sorted((out / "shards").glob("rank-*-of-*.json"))
    if world_size is None and files:
        world_size = max(int(f.stem.rsplit("-", 1)[1]) for f in files)
    files = [f for f in files if f.stem.endswith(f"-of-{world_size}")]
    shards = [json.loads(f.read_text()) for f in files]
    if len(shards) != world_size:
        have = sorted(s["rank"] for s in shards)
        raise FileNotFoundError(f"{out / 'shards'}: {len(shards)} of {world_size} shards present (ranks {have})")
    if len({s["config_hash"] for s in shards}) != 1:
        raise ValueError(f"{out / 'shards'}: the shards were run with different settings; use one OUT per run")
    first = shards[0]
    config, protocol = first["config"], first["config"]["protocol"]
    indices = sorted(i for s in shards for i in s["indices"])
    if len(indices) != config["selected"] or len(set(indices)) != len(indices):
        raise ValueError(f"{out / 'shards'}: shards cover {len(indices)} images, the run selected {config['selected']}")
    results = {"config": config, "world_size": world_size, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
               "definitions": metrics.DEFINITIONS, "methods": []}  # fmt: skip
    for method in first["methods"]:
        stats = [metrics.ImageStats.from_json(d) for s in shards for d in s["stats"][method["name"]]]
        numbers = metrics.summarize(stats, tuple(first["class_names"]), tuple(protocol["paper"]))
        results["methods"].append({**method, "metrics": numbers})
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown_table(results))
    return results


def markdown_table(results: dict) -> str:
    config = results["config"]
    protocol = config["protocol"]
    cols = [("Acc", "acc"), ("mIoU", "miou"), ("mAP", "map"), ("paper Acc", "paper_acc"),
            ("paper mIoU = Acc/(2-Acc)", "paper_miou"), ("paper mAP (two-channel)", "paper_map")]  # fmt: skip
    cols = [(title, key) for title, key in cols if any(m["metrics"].get(key) is not None for m in results["methods"])]
    title = f"# {protocol['name']} on {config['dataset']['dataset']} ({config['selected']} images)"
    header = "| method | images | " + " | ".join(t for t, _ in cols) + " |"
    lines = [title, "", f"Model {config['model']}, class map {config['class_map']}.", "", header]
    lines.append("|---|---|" + "---|" * len(cols))
    for m in results["methods"]:
        values = [m["metrics"].get(key) for _, key in cols]
        cells = ["-" if v is None else f"{100 * v:.2f}" for v in values]
        lines.append(f"| {m['name']} | {m['metrics']['images']} | " + " | ".join(cells) + " |")
    settings = ", ".join(f"{k}={v}" for k, v in protocol.items() if k != "name")
    lines += [
        "",
        f"Protocol: {settings} (each method sets its own space, softmax, layers, t and blur).",
        "",
        "Numbers in %. 'paper' columns are what the official scripts compute (see segmentation/metrics.py); ours are "
        "the correct definitions.",
    ]
    return "\n".join(lines) + "\n"
