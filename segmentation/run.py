"""One pass over a dataset that scores several saliency methods, resumes from a per-image map cache and shards by rank.

A `Method` is one way to turn the explain forward into maps: saliency space, softmax, layers, noise level t and blur.
Methods with the same t share one forward per image: the pipeline is called once with `keep_grid=True` and every
method's maps come from `result.select(space, softmax, layers)`. Those maps are cached per image under
`OUT/cache/<forward hash>/<image key>.pt` (written atomically), so an interrupted run picks up where it stopped and a
later run with more methods only computes what is missing; each entry records what made it (`cache.py`).

Everything that can be checked without the model is checked first (`prepare`): the methods, the output folder, every
selected image's size against its mask and its concepts under the class map. The command line then checks the layers
against the checkpoint's headers before loading the weights.

Sharding: rank r of w takes every w-th selected image (`RANK`/`WORLD_SIZE` from torchrun, or explicit arguments) and
writes `OUT/shards/rank-r-of-w.json` with per-image sufficient statistics (intersections, unions, correct, labelled and
ignored pixel counts, APs). When all w shards are present the last rank to finish merges them (`merge` does it by hand)
into `OUT/results.json` (every setting and number) and `OUT/results.md` (a table); sums run in image order, so a sharded
run gives the same numbers as one process.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import metrics
from .cache import MapCache, digest, weights_fingerprint
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

SPACES = ("output", "attention", "value", "cross_attention")


@dataclass(frozen=True)
class Method:
    space: str = "output"
    softmax: bool = True
    layers: tuple[int, ...] | None = None  # None = every double block
    t: float = 0.5
    blur: bool = False

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"method space {self.space!r}; choose one of {', '.join(SPACES)}")
        if not 0.0 <= self.t <= 1.0:
            raise ValueError(f"t = {self.t:g}: the noise level must lie in [0, 1]")
        if self.layers is not None:
            layers = tuple(int(i) for i in self.layers)
            if not layers:
                raise ValueError("layers = (): name at least one double block, or None (--layers all) for every one")
            if min(layers) < 0 or len(set(layers)) != len(layers):
                raise ValueError(f"layers {list(layers)}: give distinct block indices from 0")
            object.__setattr__(self, "layers", layers)

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
    """'all' -> None, '14-17' -> (14, 15, 16, 17), '3,5' -> (3, 5), '0-2,5' -> (0, 1, 2, 5)."""
    if text.strip().lower() == "all":
        return None
    usage = "give a block (18), a range (14-17), a list (3,5) or all"
    out: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ValueError(f"layers {text!r}: {part.strip()!r} is not a block index or a range; {usage}")
        lo, hi = int(match[1]), int(match[2] or match[1])
        if hi < lo:
            raise ValueError(f"layers {text!r}: the range {lo}-{hi} is empty (it runs downwards); write {hi}-{lo}")
        out += range(lo, hi + 1)
    twice = sorted({i for i in out if out.count(i) > 1})
    if twice:
        raise ValueError(f"layers {text!r}: block {twice[0]} is named twice; {usage}")
    return tuple(out)


def check_layers(methods: list[Method], depth: int, where: str, kind: str = "double blocks") -> None:
    """Every method's layers exist among the model's `depth` blocks (`kind`: Flux's double, SD3's joint blocks)."""
    for m in methods:
        if m.layers is not None and max(m.layers) >= depth:
            raise ValueError(f"layers {format_layers(m.layers)}: {where} has {depth} {kind} (0-{depth - 1}); "
                             "pass --layers within them, or all")  # fmt: skip


def method_grid(spaces, softmax, layers, ts, blur) -> list[Method]:
    """Every combination of the given choices, in a stable order."""
    return [Method(*m) for m in itertools.product(spaces, softmax, layers, ts, blur)]


def check_out(out: str | Path) -> Path:
    """The output folder, created, after a test that it can be written (not a file, not read-only)."""
    if not str(out).strip():
        raise ValueError("the output folder is empty: name one (--out runs/NAME)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output folder {out} is a file: name a folder (--out)")
    try:
        (out / "shards").mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"cannot write to the output folder {out} ({error.strerror}); choose another --out") from None
    check_results_are_ours(out)
    return out


RESULT_FILES = ("results.json", "results.md")


def check_results_are_ours(out: Path) -> None:
    """Raise unless OUT's results.json and results.md are absent or provably an earlier merge's (a results.json of
    this program, and a results.md that is exactly its table): a run never overwrites a user's own files."""
    present = [name for name in RESULT_FILES if (out / name).exists()]
    if not present:
        return
    try:
        results = json.loads((out / "results.json").read_text())
        ours = isinstance(results, dict) and "config_hash" in results and "methods" in results
        md = out / "results.md"
        ours = ours and (not md.exists() or md.read_text() == markdown_table(results))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(
            f"the output folder {out} holds {' and '.join(present)} that this program did not write (or that were "
            "changed); nothing was changed: move them away, or give another --out"
        )


@dataclass
class Plan:
    """A run checked before the model loads: the selected images and, for this rank's, their concepts and captions."""

    dataset: object
    protocol: Protocol
    methods: list[Method]
    out: Path
    class_map: str
    selected: list[int]
    rank: int
    world_size: int
    class_names: tuple[str, ...]
    config: dict
    concepts: dict[int, tuple[list[str], str, list]] = field(repr=False)  # image -> (concepts, caption, owners)

    @property
    def mine(self) -> list[int]:
        return self.selected[self.rank :: self.world_size]


def protocol_label(mask: np.ndarray, classes: dict[int, str], protocol: Protocol) -> tuple[np.ndarray, list[str]]:
    """The label at the protocol's size and the classes present in it (binary tasks: object = 1)."""
    label = resize_label(mask, protocol.label_size)
    present = [classes[v] for v in sorted(set(np.unique(label).tolist()) - {0, 255})]
    if protocol.task == "binary":
        label = np.where(label == 255, 255, (label != 0).astype(np.uint8))
    return label, present


def prepare(dataset, protocol: Protocol, methods: list[Method], out: str | Path, limit: int | None = None,
            rank: int = 0, world_size: int = 1, class_map: str | None = None,
            model: str = "custom") -> Plan:  # fmt: skip
    """Check everything that needs no model: shards, methods, the output folder, the images (binary tasks keep those
    whose resized label holds exactly one class), each image's size against its mask, and every concept list."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}: need world size >= 1 and 0 <= rank < world size")
    if not methods:
        raise ValueError("no methods to score: give at least one space, softmax, layers, t and blur choice")
    if limit is not None and limit < 1:
        raise ValueError(f"limit = {limit}: score at least one image (or no limit)")
    binary = protocol.task == "binary"
    if not binary and getattr(dataset, "class_names", None) is None:
        raise ValueError(f"protocol {protocol.name} is multi-class; this dataset has binary masks only")
    out = check_out(out)
    class_map = class_map or protocol.class_map
    names = load_class_map(class_map)
    selected, concepts = [], {}
    for i in range(len(dataset)):
        if limit is not None and len(selected) >= limit:
            break
        mask, classes = dataset.label(i)
        label, present = protocol_label(mask, classes, protocol)
        if binary and len(present) != 1:
            continue
        where = dataset.where(i) if hasattr(dataset, "where") else f"image {dataset.key(i)}"
        if (label == 255).all():
            raise ValueError(f"{where}: every pixel of its mask is 255 (ignored), so it cannot be scored; fix the "
                             "mask or remove the image")  # fmt: skip
        selected.append(i)
        size = dataset.size(i) if hasattr(dataset, "size") else mask.shape
        if size != mask.shape:
            raise ValueError(f"{where}: the image is {tuple(size)} (H, W) and its mask {mask.shape}; they must match")
        if (len(selected) - 1) % world_size == rank:
            concepts[i] = concepts_for(protocol, present, names, class_map)
    if not selected and binary:
        raise ValueError(f"no image qualifies under {protocol.name}: it scores images whose label holds one class only")
    if not selected:
        raise ValueError("the dataset has no images")
    config = {"protocol": protocol.to_json(), "dataset": dataset.describe(), "model": model, "class_map": class_map,
              "limit": limit, "selected": len(selected), "methods": [m.name for m in methods]}  # fmt: skip
    class_names = ("background", "object") if binary else tuple(dataset.class_names)
    return Plan(dataset, protocol, methods, out, class_map, selected, rank, world_size, class_names, config, concepts)


def forward_maps(pipe, cache: MapCache, key: str, image, concepts: list[str], caption: str, protocol: Protocol,
                 t: float, methods: list[Method]) -> dict[str, torch.Tensor]:  # fmt: skip
    """Maps for every method at this t, from the cache or from one explain forward (whose grid serves them all)."""
    from concept_attention import Settings

    record = cache.record(image, concepts, caption)
    maps = cache.load(key, record)
    missing = [m for m in methods if m.select_key not in maps]
    if missing:
        settings = Settings(space=missing[0].space, softmax=missing[0].softmax, normalize=protocol.normalize,
                            token_rule=protocol.token_rule)  # fmt: skip
        result = pipe.explain(image, concepts, prompt=caption, t=t, num_samples=protocol.num_samples,
                              seed=protocol.seed, settings=settings, keep_grid=True,
                              size=(image.height, image.width), progress=False)  # fmt: skip
        for m in missing:
            layers = result.layers if m.layers is None else m.layers  # "all" stays every block (not the recipe's)
            maps[m.select_key] = result.select(space=m.space, softmax=m.softmax, layers=layers).float().cpu()
        cache.save(key, record, maps)
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
    plan = prepare(dataset, protocol, methods, out, limit, rank, world_size, class_map, model)
    return run_plan(pipe, plan, progress)


def run_plan(pipe, plan: Plan, progress: bool = True) -> dict | None:
    """Run a prepared plan; merge and return the results once every shard of this run's settings is in."""
    protocol, methods, out, dataset = plan.protocol, plan.methods, plan.out, plan.dataset
    depth = getattr(pipe, "depth", None)  # Flux's double blocks, SD3's joint blocks
    if depth is not None:
        check_layers(methods, depth, f"the model {plan.config['model']}", pipe.block_kind)
    source = str(getattr(pipe, "source", plan.config["model"]))
    config = {**plan.config, "weights": weights_fingerprint(source), "dtype": str(getattr(pipe, "dtype", None))}
    hashed = {**config, "dataset": {k: v for k, v in config["dataset"].items() if k != "path"}}  # paths may differ
    config_hash = digest(hashed)
    if previous_hash(out) not in (None, config_hash):
        print(f"note: {out}/results.json holds a run with other settings; this run replaces it when all its shards "
              "are in", file=sys.stderr)  # fmt: skip
    caches = {}
    for t in sorted({m.t for m in methods}):
        forward = {"model": config["model"], "weights": config["weights"], "dtype": config["dtype"], "t": t,
                   "num_samples": protocol.num_samples, "seed": protocol.seed, "normalize": protocol.normalize,
                   "token_rule": protocol.token_rule, "resize": protocol.resize,
                   "dataset": config["dataset"]["dataset"]}  # fmt: skip
        caches[t] = MapCache(out, forward)
    binary = protocol.task == "binary"
    class_index = {} if binary else {name: i for i, name in enumerate(plan.class_names)}
    stats: dict[str, list[metrics.ImageStats]] = {m.name: [] for m in methods}
    mine = plan.mine
    if progress:
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc=f"{protocol.name} rank {plan.rank}/{plan.world_size}", unit="image", position=plan.rank)
    for i in mine:
        sample = dataset[i]
        label, _ = protocol_label(sample.mask, sample.classes, protocol)
        concepts, caption, owners = plan.concepts[i]
        image = resize_image(sample.image, protocol.resize)
        for t, cache in caches.items():
            group = [m for m in methods if m.t == t]
            maps = forward_maps(pipe, cache, sample.key, image, concepts, caption, protocol, t, group)
            for m in group:
                pred, scores = score(m, maps[m.select_key], owners, label, protocol, len(plan.class_names),
                                     class_index)  # fmt: skip
                s = metrics.image_stats(i, sample.key, pred, label, len(plan.class_names), scores)
                s.extra = {"concepts": concepts, "caption": caption}
                stats[m.name].append(s)
    for cache in caches.values():
        if cache.stale:
            print(f"note: {cache.stale} cached entries in {cache.dir} were made from another image, concept list or "
                  "caption and were recomputed", file=sys.stderr)  # fmt: skip
    shard = {"config": config, "config_hash": config_hash, "rank": plan.rank, "world_size": plan.world_size,
             "indices": plan.mine, "class_names": list(plan.class_names),
             "methods": [{"name": m.name, "settings": asdict(m)} for m in methods],
             "stats": {name: [s.to_json() for s in v] for name, v in stats.items()}}  # fmt: skip
    path = out / "shards" / f"rank-{plan.rank}-of-{plan.world_size}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(shard))
    os.replace(tmp, path)
    done = len(same_run(out, plan.world_size, config_hash)) == plan.world_size
    return merge(out, plan.world_size, config_hash) if done else None


def previous_hash(out: Path) -> str | None:
    """The settings hash of the results already in OUT ("" when they are unreadable or older; None when absent)."""
    try:
        return json.loads((out / "results.json").read_text()).get("config_hash", "")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return ""


def same_run(out: Path, world_size: int, config_hash: str) -> list[Path]:
    """The shard files of `world_size` in OUT/shards written with these settings (others are an earlier run's)."""

    def settings(file: Path) -> str | None:
        try:
            return json.loads(file.read_text()).get("config_hash")
        except (OSError, ValueError, AttributeError):  # damaged: not this run's (merge names it)
            return None

    return [f for f in sorted((out / "shards").glob(f"rank-*-of-{world_size}.json")) if settings(f) == config_hash]


SHARD_KEYS = ("config", "config_hash", "rank", "world_size", "indices", "class_names", "methods", "stats")


def merge(out: str | Path, world_size: int | None = None, config_hash: str | None = None) -> dict:
    """Combine the shard files of one run (same settings) into results.json and results.md; with `config_hash`, only
    the shards of those settings (others are left from an earlier run into the same folder)."""
    out = Path(out)
    files = sorted((out / "shards").glob("rank-*-of-*.json"))
    if not files:
        raise FileNotFoundError(f"no shard files in {out / 'shards'}: run `python -m segmentation run` into it first")
    files = [f for f in files if re.fullmatch(r"rank-\d+-of-\d+", f.stem)]
    if world_size is None and files:
        world_size = max(int(f.stem.rsplit("-", 1)[1]) for f in files)
    shards = []
    for f in files:
        if f.stem.endswith(f"-of-{world_size}"):
            try:
                shard = json.loads(f.read_text())
                missing = [k for k in SHARD_KEYS if k not in shard]
                if missing or not isinstance(shard["stats"], dict) or not isinstance(shard["indices"], list):
                    raise ValueError(f"missing or malformed {', '.join(missing) or 'stats or indices'}")
                if any(method["name"] not in shard["stats"] for method in shard["methods"]):
                    raise ValueError("a method has no statistics")
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"shard file {f} is damaged ({error!r}); rerun its rank") from None
            shards.append(shard)
    if config_hash is not None:
        shards = [s for s in shards if s.get("config_hash") == config_hash]
    if len(shards) != world_size:
        have = sorted(s["rank"] for s in shards)
        raise FileNotFoundError(f"{out / 'shards'}: {len(shards)} of {world_size} shards present (ranks {have})")
    hashes = sorted({s["config_hash"] for s in shards})
    if len(hashes) != 1:
        groups = "; ".join(f"ranks {sorted(s['rank'] for s in shards if s['config_hash'] == h)}" for h in hashes)
        raise ValueError(f"{out / 'shards'}: the shards were run with different settings ({groups}); rerun the odd "
                         "ranks with the same settings, or use one --out per run")  # fmt: skip
    first = shards[0]
    config, protocol = first["config"], first["config"]["protocol"]
    indices = sorted(i for s in shards for i in s["indices"])
    if len(indices) != config["selected"] or len(set(indices)) != len(indices):
        raise ValueError(f"{out / 'shards'}: shards cover {len(indices)} images, the run selected {config['selected']}")
    results = {"config": config, "config_hash": first["config_hash"], "world_size": world_size,
               "created": time.strftime("%Y-%m-%d %H:%M:%S"), "definitions": metrics.DEFINITIONS,
               "methods": []}  # fmt: skip
    for method in first["methods"]:
        try:
            stats = [metrics.ImageStats.from_json(d) for s in shards for d in s["stats"][method["name"]]]
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            raise ValueError(f"{out / 'shards'}: a shard's statistics of {method['name']} are damaged ({error!r}); "
                             "rerun the ranks") from None  # fmt: skip
        numbers = metrics.summarize(stats, tuple(first["class_names"]), tuple(protocol["paper"]))
        results["methods"].append({**method, "metrics": numbers})
    check_results_are_ours(out)  # again: they may have appeared while the run was computing
    for name, text in (("results.json", json.dumps(results, indent=1)), ("results.md", markdown_table(results))):
        tmp = out / f"{name}.tmp{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out / name)
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
