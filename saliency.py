"""From what the double blocks give back to concept maps: the settings, the reduction of one layer's saliency to
[C, N], the running sums (or the layer x step grid) and the result object with its picture and file helpers.

The blocks (`mmdit.DoubleStreamBlock`) return per layer, as `mmdit.ConceptSaliency`, the output space o_c . o_x
[B, C', N], the value space v_c . v_x, and per head the concept rows' attention weights over image keys and the
paper-table cross-attention (image queries . concept keys). Here a layer's values become [C, N]: the rows of a concept's
T5 pieces are averaged, softmax over concepts is applied (per head for the head-wise spaces, as the official evaluation
does for cross-attention), heads are averaged. Softmax comes before averaging layers and steps (paper eq. 11).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

import imaging
from mmdit import ConceptSaliency

SPACES = ("output", "attention", "value", "cross_attention")
TARGETS = ("concepts+image", "image", "concepts", "none")
TOKEN_RULES = ("first", "mean", "pieces")


@dataclass(frozen=True)
class Settings:
    """How concept maps are made. Defaults: the paper's output space with softmax over concepts, all double blocks,
    all sampling steps, concepts attending to concepts and image, the mean of a concept's T5 pieces."""

    space: str = "output"  # output | attention | value | cross_attention (see mmdit.ConceptSaliency)
    softmax: bool = True  # softmax over concepts per layer and step (per head for head-wise spaces), before averaging
    layers: tuple[int, ...] | None = None  # double-block indices averaged; None = all
    steps: tuple[int, ...] | None = None  # generate: sampling steps averaged; explain: noise samples; None = all
    target: str = "concepts+image"  # what the concept rows attend to (the paper's Table 4 ablation)
    normalize: bool = False  # the official evaluation's concept normalisation of o_c (and v_c) before the dot product
    token_rule: str = "mean"  # first | mean | pieces: how a concept of several T5 pieces becomes tokens
    value_per_head: bool = False  # value space: softmax per head, then the head mean (the official baseline's)

    def __post_init__(self):
        for name, value, allowed in (
            ("space", self.space, SPACES),
            ("target", self.target, TARGETS),
            ("token_rule", self.token_rule, TOKEN_RULES),
        ):
            if value not in allowed:
                raise ValueError(f"Settings.{name} = {value!r}; choose one of {', '.join(allowed)}")
        for name in ("softmax", "normalize", "value_per_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Settings.{name} = {getattr(self, name)!r}; give True or False")
        for name in ("layers", "steps"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_indices(value, f"Settings.{name}"))


PRESETS: dict[str, Settings] = {
    "default": Settings(),
    # The official API (generate_image and encode_image): blocks 15-18 of 19, every step, the first piece only.
    "official": Settings(layers=(15, 16, 17, 18), token_rule="first"),
    # The official hosted demo: blocks 10-18, sampling steps 2 and 3.
    "official-demo": Settings(layers=tuple(range(10, 19)), steps=(2, 3), token_rule="first"),
    # The run behind the paper's ImageNet-Segmentation row (with 5 noise samples and a blur, set by the benchmark);
    # its value space is the official baseline's (softmax per head, then the head mean).
    "paper-imagenet": Settings(layers=(14, 15, 16, 17), normalize=True, token_rule="first", value_per_head=True),
}


def check_indices(value, what: str) -> tuple[int, ...]:
    """A non-empty collection of distinct non-negative ints (a single int is one index); strings are refused, so that
    "12" never becomes (1, 2)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{what} = {value!r}: give a tuple of block or step indices, e.g. (12,) or (14, 15, 16, 17)")
    value = tuple(value)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in value):
        bad = next(i for i in value if isinstance(i, bool) or not isinstance(i, int))
        raise ValueError(f"{what} = {value!r}: {bad!r} is not an integer index")
    if not value or min(value) < 0 or len(set(value)) != len(value):
        raise ValueError(f"{what} = {value}: give distinct non-negative indices (at least one), or None for all")
    return value


def check_concepts(concepts: list[str] | tuple[str, ...]) -> list[str]:
    """Concepts must be a non-empty list of distinct, non-blank strings."""
    if isinstance(concepts, str):
        raise ValueError(f"concepts must be a list of words, got the string {concepts!r}; wrap it in a list")
    if not isinstance(concepts, (list, tuple)):
        raise ValueError(f"concepts must be a list of strings, got {type(concepts).__name__}")
    for c in concepts:
        if not isinstance(c, str):
            raise ValueError(f"concept {c!r} is a {type(c).__name__}; every concept must be a string")
    concepts = [c.strip() for c in concepts]
    if not concepts:
        raise ValueError("no concepts given; name at least one, e.g. --concepts cat sky")
    if any(not c for c in concepts):
        raise ValueError("a concept is empty or blank; every concept needs at least one character")
    seen = set()
    for c in concepts:
        if c in seen:
            raise ValueError(f"duplicate concept {c!r}; each concept must appear once")
        seen.add(c)
    return concepts


def group_pieces(x: Tensor, owner: Tensor, num_concepts: int) -> Tensor:
    """Average the rows of x [..., C', N] that belong to the same concept (owner [C'] -> concept index): [..., C, N]."""
    weights = F.one_hot(owner, num_concepts).to(x.dtype)  # (C', C)
    weights = weights / weights.sum(0, keepdim=True)
    return torch.einsum("...pn,pc->...cn", x, weights)


def reduce_space(value: Tensor, owner: Tensor, num_concepts: int, softmax: bool, sum_heads: bool = False) -> Tensor:
    """One layer's saliency in one space -> [B, C, N]: pieces averaged per concept, optional softmax over concepts
    (per head for the head-wise spaces), then the mean over heads. `sum_heads` first sums a per-head score over heads
    (the dot product of the concatenated heads), so that one softmax is taken over the whole score."""
    x = value.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)  # (B, 1, C', N): spaces without a head axis
    if sum_heads:
        x = x.sum(dim=1, keepdim=True)  # (B, 1, C', N)
    x = group_pieces(x, owner, num_concepts)  # (B, H, C, N)
    if softmax:
        x = x.softmax(dim=2)
    return x.mean(dim=1)


class MapCollector:
    """Reduces each forward's per-layer saliency as it arrives: a running sum of [C, N] for one space, or, with
    `keep_grid`, the [layers, steps, C, N] grid of every space with and without softmax."""

    def __init__(self, settings: Settings, layers: tuple[int, ...], owner: Tensor, num_concepts: int, keep_grid: bool):
        self.settings, self.layers, self.owner, self.num_concepts = settings, layers, owner, num_concepts
        self.keep_grid = keep_grid
        self.spaces = SPACES if keep_grid else (settings.space,)
        self.rows: dict[tuple[str, bool], list[Tensor]] = {}  # per (space, softmax): one [L, C, N] per step
        self.total: Tensor | None = None
        self.count = 0

    def wants(self, step: int) -> bool:
        return self.keep_grid or self.settings.steps is None or step in self.settings.steps

    def add(self, saliency: dict[int, ConceptSaliency]) -> None:
        for space in self.spaces:
            for softmax in (False, True) if self.keep_grid else (self.settings.softmax,):
                sum_heads = space == "value" and not self.settings.value_per_head
                per_layer = [
                    reduce_space(getattr(saliency[i], space), self.owner, self.num_concepts, softmax, sum_heads)[0]
                    for i in self.layers
                ]
                self.rows.setdefault((space, softmax), []).append(torch.stack(per_layer).cpu())  # (L, C, N)
        if not self.keep_grid:
            step_sum = self.rows.pop((self.settings.space, self.settings.softmax))[0].sum(0)  # (C, N)
            self.total = step_sum if self.total is None else self.total + step_sum
            self.count += len(self.layers)

    def grid(self) -> dict[str, Tensor]:
        """{"output": [L, T, C, N], "output+softmax": ..., ...} (raw maps of each layer and step)."""
        return {f"{s}{'+softmax' if m else ''}": torch.stack(r, dim=1) for (s, m), r in self.rows.items()}


@dataclass
class ConceptResult:
    """What `generate` and `explain` return. `maps` is [C, H/16, W/16] float32 on the CPU; `grid` (with keep_grid)
    holds the per-layer x per-step maps of every space so `select` can recompute `maps` for other settings."""

    image: Image.Image
    concepts: list[str]
    maps: Tensor
    settings: Settings
    record: dict
    layers: tuple[int, ...] = ()
    grid: dict[str, Tensor] | None = None

    def select(self, space=None, softmax=None, layers=None, steps=None) -> Tensor:
        """Maps [C, h, w] for another space, softmax choice, layer or step selection, from the kept grid."""
        if self.grid is None:
            raise ValueError("select() needs the per-layer grid: call generate/explain with keep_grid=True")
        space = self.settings.space if space is None else space
        softmax = self.settings.softmax if softmax is None else softmax
        key = f"{space}{'+softmax' if softmax else ''}"
        if key not in self.grid:
            raise ValueError(f"unknown space {space!r}; choose one of {', '.join(SPACES)}")
        grid = self.grid[key]  # (L, T, C, N)
        layers = self.settings.layers if layers is None else layers
        steps = self.settings.steps if steps is None else steps
        if layers is not None:
            layers = check_indices(layers, "layers")
            missing = sorted(set(layers) - set(self.layers))
            if missing:
                raise ValueError(f"layers {missing} were not recorded; recorded: {list(self.layers)}")
            grid = grid[[self.layers.index(i) for i in layers]]
        if steps is not None:
            steps = check_indices(steps, "steps")
            if max(steps) >= grid.shape[1]:
                raise ValueError(f"steps {list(steps)} out of range: {grid.shape[1]} steps were recorded")
            grid = grid[:, list(steps)]
        h, w = self.maps.shape[-2:]
        return rearrange(grid.mean(dim=(0, 1)), "c (h w) -> c h w", h=h, w=w)

    def upsample(self, size: tuple[int, int] | None = None, mode: str = "bilinear") -> Tensor:
        """Maps resized to `size` (default: the image's (H, W)): [C, H, W]."""
        size = size or (self.image.height, self.image.width)
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        return F.interpolate(self.maps[None], size=size, mode=mode, **kwargs)[0]

    def masks(self, rule: str = "mean", size: tuple[int, int] | None = None) -> Tensor:
        """Boolean masks [C, H, W]: "mean" keeps pixels above each map's mean, "argmax" gives each pixel to its best
        concept."""
        maps = self.upsample(size)
        if rule == "mean":
            return maps > maps.mean(dim=(1, 2), keepdim=True)
        if rule == "argmax":
            return F.one_hot(maps.argmax(0), len(self.concepts)).permute(2, 0, 1).bool()
        raise ValueError(f"mask rule {rule!r}; choose 'mean' or 'argmax'")

    def heatmaps(self) -> list[Image.Image]:
        """One coloured map per concept, at the image size."""
        return [imaging.colorize(m).resize(self.image.size, Image.BILINEAR) for m in self.maps]

    def overlay(self, alpha: float = 0.55) -> Image.Image:
        """The image and each concept's map over it, captioned, in one grid."""
        tiles = [self.image] + [imaging.blend(self.image, h, alpha) for h in self.heatmaps()]
        return imaging.captioned_grid(tiles, ["image", *self.concepts])

    def save(self, out: str | Path) -> Path:
        """Write image.png, overlay.png, heatmaps/, masks/, maps.safetensors and settings.json under `out`."""
        out = Path(out)
        (out / "heatmaps").mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(exist_ok=True)
        self.image.save(out / "image.png")
        self.overlay().save(out / "overlay.png")
        masks = self.masks("mean")
        for i, (name, heat) in enumerate(zip(self.concepts, self.heatmaps(), strict=True)):
            stem = f"{i:02d}_{''.join(ch if ch.isalnum() else '_' for ch in name)}"
            heat.save(out / "heatmaps" / f"{stem}.png")
            Image.fromarray(masks[i].numpy().astype("uint8") * 255).save(out / "masks" / f"{stem}.png")
        tensors = {"maps": self.maps.contiguous()}
        tensors.update({f"grid.{k}": v.contiguous() for k, v in (self.grid or {}).items()})
        save_file(tensors, out / "maps.safetensors", metadata={"concepts": json.dumps(self.concepts)})
        record = {**self.record, "concepts": self.concepts, "settings": dataclasses.asdict(self.settings)}
        (out / "settings.json").write_text(json.dumps(record, indent=2) + "\n")
        return out
