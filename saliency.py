"""From what the double blocks give back to concept maps: the settings, the reduction of one layer's saliency to
[C, N], the running sums (or the layer x step grid) and the result object with its picture and file helpers.

The blocks (`mmdit.DoubleStreamBlock`) return per layer, as `mmdit.ConceptSaliency`, the output space o_c . o_x
[B, C', N], the value space v_c . v_x, and per head the concept rows' attention weights over image keys and the
paper-table cross-attention (image queries . concept keys). Here a layer's values become [C, N]: the rows of a concept's
T5 pieces are averaged, softmax over concepts is applied (per head for the head-wise spaces, as the official evaluation
does for cross-attention), heads are averaged. Softmax comes before averaging layers and steps (paper eq. 11).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor

import imaging
from checks import check_flag, check_number, concept_key
from mmdit import ConceptSaliency
from outputs import OutputFolder

SPACES = ("output", "attention", "value", "cross_attention")
TARGETS = ("concepts+image", "image", "concepts", "none")
TOKEN_RULES = ("first", "mean", "pieces")
CONCEPT_ENCODERS = ("t5", "clip-joined")  # clip-joined: SD3 only (the official SD3 code's encoding)
IMAGE_VECTORS = ("prompt", "concepts")  # concepts: SD3 only (the official SD3 code's second attention)
REDUCTIONS = ("maps", "vectors")
GUIDED_HALVES = ("conditional", "unconditional")
PADDING = -2  # the owner of a padding slot (`pad_concepts`): in the softmax over concepts, then dropped


def check_indices(value, what: str) -> tuple[int, ...]:
    """A non-empty collection of distinct non-negative ints (a single int is one index); strings are refused, so that
    "12" never becomes (1, 2)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{what} = {value!r}: give a tuple of block or step indices, e.g. (12,) or (14, 15, 16, 17)")
    value = tuple(value)
    for i in value:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise ValueError(f"{what} = {value!r}: {i!r} is not an integer index")
    value = tuple(int(i) for i in value)
    if not value or min(value) < 0 or len(set(value)) != len(value):
        raise ValueError(f"{what} = {value}: give distinct non-negative indices (at least one), or None for all")
    return value


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
    # The official SD3 code's recipe, as options (SD3.5 only; Flux refuses anything but the defaults, see
    # `check_family`):
    # concept_encoder "clip-joined": the concepts joined by spaces into one text, encoded by the two CLIPs, rows 0..C
    #   kept (row 0 = BOS, carried through the blocks, dropped from the maps; rows 1..C = the first C tokens of the
    #   text: one per concept only when each concept is one CLIP token). "t5": each concept by T5 on its own.
    concept_encoder: str = "t5"
    # image_vectors "concepts": the output-space image vectors o_x are the image rows of a second attention, image
    #   queries against [image; concepts] keys and values (before the output projection); "prompt": the image rows of
    #   the real joint attention over [image; prompt] (the paper's). Neither changes the image.
    image_vectors: str = "prompt"
    # reduce "vectors": o_c and o_x are averaged over the used steps first, then, per layer, the concept vectors are
    #   L2-normalised (eps 1e-8), dotted with the image vectors, softmaxed over concepts and the layers averaged
    #   (output space only, no grid). "maps": per step and layer maps, averaged (the paper's eq. 11).
    reduce: str = "maps"
    # guided_half: which half of a classifier-free-guidance batch [unconditional; conditional] the maps come from
    #   (SD3.5 and CogVideoX; Flux has no guided batch)
    guided_half: str = "conditional"
    # The official CogVideoX code's recipe, as options (CogVideoX only, see `check_family`):
    # pad_concepts: zero T5 vectors appended to the concept tokens up to the prompt's text length (226), before the
    #   text projection (so each becomes its bias); they travel through the blocks as concepts (queries, keys and
    #   values of the concept attention) and take part in the softmax over concepts, then their rows are dropped.
    pad_concepts: bool = False
    # concept_length: the T5 length each concept is padded to when encoded (the official CogVideoX code: 16); T5 has
    #   no attention mask, so even the first token depends on it. None: the prompt's length (226), as on Flux.
    concept_length: int | None = None

    def __post_init__(self):
        for name, value, allowed in (
            ("space", self.space, SPACES),
            ("target", self.target, TARGETS),
            ("token_rule", self.token_rule, TOKEN_RULES),
            ("concept_encoder", self.concept_encoder, CONCEPT_ENCODERS),
            ("image_vectors", self.image_vectors, IMAGE_VECTORS),
            ("reduce", self.reduce, REDUCTIONS),
            ("guided_half", self.guided_half, GUIDED_HALVES),
        ):
            if value not in allowed:
                raise ValueError(f"Settings.{name} = {value!r}; choose one of {', '.join(allowed)}")
        for name in ("softmax", "normalize", "value_per_head", "pad_concepts"):
            value = getattr(self, name)
            if isinstance(value, str) or value not in (True, False):  # "no" would read as True
                raise ValueError(f"Settings.{name} = {value!r}; give True or False")
            object.__setattr__(self, name, bool(value))
        for name in ("layers", "steps"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_indices(value, f"Settings.{name}"))
        length = self.concept_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 2):
            raise ValueError(f"Settings.concept_length = {length!r}; give a whole number of T5 tokens of at least 2 "
                             "(a piece and the EOS), or None for the prompt's length")  # fmt: skip
        if self.reduce == "vectors" and (self.space != "output" or self.normalize):
            raise ValueError(
                "Settings.reduce = 'vectors' averages the output-space vectors and L2-normalises the concepts: it "
                "needs space='output' and normalize=False"
            )


PRESETS: dict[str, Settings] = {
    "default": Settings(),
    # The official API (generate_image and encode_image): blocks 15-18 of 19, every step, the first piece only.
    "official": Settings(layers=(15, 16, 17, 18), token_rule="first"),
    # The official hosted demo: blocks 10-18, sampling steps 2 and 3.
    "official-demo": Settings(layers=tuple(range(10, 19)), steps=(2, 3), token_rule="first"),
    # The run behind the paper's ImageNet-Segmentation row (with 5 noise samples and a blur, set by the benchmark);
    # its value space is the official baseline's (softmax per head, then the head mean).
    "paper-imagenet": Settings(layers=(14, 15, 16, 17), normalize=True, token_rule="first", value_per_head=True),
    # The official SD3 code (ConceptAttentionSD3Pipeline.generate_image / encode_image): CLIP-joined concepts, image
    # vectors of the second attention, vectors averaged over steps before the dot product, every joint block, the
    # unconditional half under guidance. SD3.5 pipelines read "official" as this one (`for_family`).
    "official-sd3": Settings(
        concept_encoder="clip-joined", image_vectors="concepts", reduce="vectors", guided_half="unconditional"
    ),
    # The official CogVideoX code (ModifiedCogVideoXPipeline): each concept T5-encoded alone at 16 tokens, its first
    # token kept, zero-padded to 226 slots that take part in the attention and the softmax over concepts, the
    # conditional half under guidance, maps averaged over layers and steps (not frames). Layers: all blocks (the
    # official code has no default; its example takes blocks 0-29: all of the 2B's, the first 30 of the 5B's 42).
    # CogVideoX pipelines read "official" as this one (`for_family`).
    "official-cogvideox": Settings(token_rule="first", pad_concepts=True, concept_length=16),
}
# (preset, family) -> the family's own version of the preset
FAMILY_PRESETS = {("official", "sd3"): "official-sd3", ("official", "cogvideox"): "official-cogvideox"}
# the options only some families have: name -> (the default, which every family takes; the families taking others)
FAMILY_OPTIONS = {
    "concept_encoder": ("t5", ("sd3",)),
    "image_vectors": ("prompt", ("sd3",)),
    "reduce": ("maps", ("sd3",)),
    "guided_half": ("conditional", ("sd3", "cogvideox")),
    "pad_concepts": (False, ("cogvideox",)),
    "concept_length": (None, ("cogvideox",)),
}
FAMILY_NAMES = {"sd3": "SD3.5", "cogvideox": "CogVideoX"}


def for_family(settings: Settings, family: str) -> Settings:
    """The family's own version of a preset given as is (`PRESETS["official"]` on SD3.5 is `PRESETS["official-sd3"]`);
    any other settings unchanged."""
    for (name, fam), own in FAMILY_PRESETS.items():
        if fam == family and settings == PRESETS[name]:
            return PRESETS[own]
    return settings


def family_settings(settings: Settings, family: str) -> Settings:
    """The settings a family's pipeline runs with: its own version of a preset (`for_family`), options checked."""
    if not isinstance(settings, Settings):
        raise ValueError(f"settings = {settings!r} is a {type(settings).__name__}; give a Settings (or one of PRESETS)")
    settings = for_family(settings, family)
    check_family(settings, family)
    return settings


def check_family(settings: Settings, family: str) -> None:
    """Refuse an option another family's recipe needs (SD3.5's, CogVideoX's) on a family that has no use for it."""
    for name, (default, families) in FAMILY_OPTIONS.items():
        if family not in families and getattr(settings, name) != default:
            names = " and ".join(FAMILY_NAMES[f] for f in families)
            raise ValueError(f"Settings.{name} = {getattr(settings, name)!r} is for {names} only (an option of the "
                             f"official code's recipe there); {family} takes {default!r}")  # fmt: skip


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
    if any(not concept_key(c) for c in concepts):
        raise ValueError("a concept is empty, blank or invisible; every concept needs at least one visible character")
    seen: dict[str, str] = {}
    for c in concepts:
        key = concept_key(c)  # "cat" with a zero-width space, or in full-width letters, reads as "cat"
        if key in seen:
            same = (
                ""
                if seen[key] == c
                else f" (the same as {seen[key]!r} once invisible and full-width characters "
                "are read as the model reads them)"
            )
            raise ValueError(f"duplicate concept {c!r}{same}; each concept must appear once")
        seen[key] = c
    return concepts


def group_pieces(x: Tensor, owner: Tensor, num_concepts: int) -> Tensor:
    """Average the rows of x [..., C', N] that belong to the same concept (owner [C'] -> concept index): [..., C, N].
    Rows owned by -1 (a BOS token carried along, as the official SD3 code does) or `PADDING` are dropped."""
    keep = owner >= 0
    if not bool(keep.all()):
        x, owner = x[..., keep.to(x.device), :], owner[keep]
    weights = F.one_hot(owner, num_concepts).to(x.dtype)  # (C', C)
    weights = weights / weights.sum(0, keepdim=True)
    return torch.einsum("...pn,pc->...cn", x, weights)


def reduce_space(value: Tensor, owner: Tensor, num_concepts: int, softmax: bool, sum_heads: bool = False) -> Tensor:
    """One layer's saliency in one space -> [B, C, N]: pieces averaged per concept, optional softmax over concepts
    (per head for the head-wise spaces), then the mean over heads. `sum_heads` first sums a per-head score over heads
    (the dot product of the concatenated heads), so that one softmax is taken over the whole score. Rows owned by
    `PADDING` (`pad_concepts`) join the softmax as slots of their own and are dropped after it."""
    x = value.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)  # (B, 1, C', N): spaces without a head axis
    if sum_heads:
        x = x.sum(dim=1, keepdim=True)  # (B, 1, C', N)
    padding = (owner == PADDING).to(x.device)
    pads = x[:, :, padding] if softmax and bool(padding.any()) else None  # (B, H, P, N)
    x = group_pieces(x, owner, num_concepts)  # (B, H, C, N)
    if pads is not None:
        x = torch.cat((x, pads), dim=2).softmax(dim=2)[:, :, :num_concepts]  # the softmax over C + P slots
    elif softmax:
        x = x.softmax(dim=2)
    return x.mean(dim=1)


def vector_maps(o_c: Tensor, o_x: Tensor, owner: Tensor, num_concepts: int, softmax: bool, eps: float = 1e-8) -> Tensor:
    """One layer's map [C, N] from (step-averaged) vectors, as the official SD3 code makes it: concept rows owned by
    -1 (BOS) dropped, each concept vector o_c [C', D] divided by (its L2 norm + eps), dotted with the image vectors
    o_x [N, D] over the concatenated heads, optional softmax over concepts. A concept of several rows averages them
    (the official code has one row per concept)."""
    o_c = o_c.float()
    o_c = o_c / (o_c.norm(dim=-1, keepdim=True) + eps)
    x = group_pieces((o_c @ o_x.float().T)[None], owner, num_concepts)[0]  # (C, N)
    return x.softmax(dim=0) if softmax else x


class MapCollector:
    """Reduces each forward's per-layer saliency as it arrives: a running sum of [C, N] for one space, or, with
    `keep_grid`, the [layers, steps, C, N] grid of every space with and without softmax."""

    def __init__(self, settings: Settings, layers: tuple[int, ...], owner: Tensor, num_concepts: int, keep_grid: bool):
        self.settings, self.layers, self.owner, self.num_concepts = settings, layers, owner, num_concepts
        self.keep_grid = check_flag(keep_grid, "keep_grid")
        if keep_grid and settings.reduce == "vectors":
            raise ValueError("reduce='vectors' averages vectors over the steps before any map is made: there is no "
                             "layer x step grid of maps to keep; use keep_grid=False (no --grid)")  # fmt: skip
        self.spaces = SPACES if keep_grid else (settings.space,)
        self.rows: dict[tuple[str, bool], list[Tensor]] = {}  # per (space, softmax): one [L, C, N] per step
        self.total: Tensor | None = None
        self.count = 0
        self.vectors: list[tuple[Tensor, Tensor]] = []  # reduce="vectors": per layer, sums of (o_c [C', D], o_x [N, D])
        self.vector_steps = 0

    def wants(self, step: int) -> bool:
        return self.keep_grid or self.settings.steps is None or step in self.settings.steps

    def add(self, saliency: dict[int, ConceptSaliency]) -> None:
        if self.settings.reduce == "vectors":
            return self._add_vectors(saliency)
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

    def _add_vectors(self, saliency: dict[int, ConceptSaliency]) -> None:
        """reduce="vectors": sum each layer's vectors (batch row 0) over the steps, then remake `total` (the sum over
        layers of the maps of the mean vectors) so that `total / count` is always the current result."""
        for j, i in enumerate(self.layers):
            s = saliency[i]
            if getattr(s, "concept_vectors", None) is None:
                raise ValueError("reduce='vectors' needs the blocks' vectors; this model does not report them")
            pair = (s.concept_vectors[0].float(), s.image_vectors[0].float())  # (C', D), (N, D)
            if j == len(self.vectors):
                self.vectors.append(pair)
            else:
                self.vectors[j] = (self.vectors[j][0] + pair[0], self.vectors[j][1] + pair[1])
        self.vector_steps += 1
        maps = [vector_maps(c / self.vector_steps, x / self.vector_steps, self.owner, self.num_concepts,
                            self.settings.softmax) for c, x in self.vectors]  # fmt: skip
        self.total, self.count = torch.stack(maps).sum(0).cpu(), len(maps)

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
        softmax = self.settings.softmax if softmax is None else check_flag(softmax, "softmax")
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
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)
        ):
            raise ValueError(f"size = {size!r}: give (height, width), two positive whole numbers")
        if mode not in ("bilinear", "nearest", "bicubic"):
            raise ValueError(f"mode = {mode!r}: choose bilinear, nearest or bicubic")
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        return F.interpolate(self.maps[None], size=size, mode=mode, **kwargs)[0]

    def masks(self, rule: str = "mean", size: tuple[int, int] | None = None) -> Tensor:
        """Boolean masks [C, H, W]: "mean" keeps pixels above each map's mean, "argmax" gives each pixel to its best
        concept."""
        maps = self.upsample(size)
        if rule == "mean":  # a constant map (one token: --size 16) has no pixel above its mean; its upsampled copy
            constant = self.maps.amax(dim=(1, 2)) == self.maps.amin(dim=(1, 2))  # varies in the last bit
            return (maps > maps.mean(dim=(1, 2), keepdim=True)) & ~constant[:, None, None]
        if rule == "argmax":
            return F.one_hot(maps.argmax(0), len(self.concepts)).permute(2, 0, 1).bool()
        raise ValueError(f"mask rule {rule!r}; choose 'mean' or 'argmax'")

    def scale(self) -> tuple[float, float]:
        """The one colour scale of every map of this result: [0, 1] after the softmax over concepts, else the range
        shared by all concepts' maps (so that a flat map looks flat, and maps compare by colour)."""
        if self.settings.softmax:
            return 0.0, 1.0
        return float(self.maps.min()), float(self.maps.max())

    def scale_label(self) -> str:
        space = f"{self.settings.space.replace('_', ' ')} space"
        return f"{space}, softmax over concepts" if self.settings.softmax else f"{space}, raw scores"

    def flat_note(self, spread: float = 0.05) -> str | None:
        """A sentence when every map is nearly flat: its own range below `spread` of the colour scale's width (the
        width: 1 after the softmax; without it, the largest magnitude of any map). None otherwise."""
        lo, hi = self.scale()
        width = 1.0 if self.settings.softmax else max(abs(lo), abs(hi), 1e-12)
        flat = self.maps.flatten(1)  # (C, everything else): images and videos alike
        ranges = (flat.amax(dim=1) - flat.amin(dim=1)).tolist()
        if max(ranges) >= spread * width:
            return None
        return (
            f"every map is nearly flat: each varies by at most {max(ranges):.3g} on a scale of "
            f"{imaging.format_value(lo)} to {imaging.format_value(hi)} ({self.scale_label()}); the maps carry little "
            "contrast. Other spaces, layers or steps may separate the concepts (--space, --layers, --grid)"
        )

    def heatmaps(self) -> list[Image.Image]:
        """One coloured map per concept, at the image size, all on the result's one scale (`scale`)."""
        lo, hi = self.scale()
        return [imaging.colorize(m, lo, hi).resize(self.image.size, Image.BILINEAR) for m in self.maps]

    def overlay(self, alpha: float = 0.55) -> Image.Image:
        """The image and each concept's map over it, captioned, in one grid, with the colour bar of their scale."""
        alpha = check_number(alpha, "alpha", 0.0, 1.0)
        tiles = [self.image] + [imaging.blend(self.image, h, alpha) for h in self.heatmaps()]
        return imaging.with_colorbar(imaging.captioned_grid(tiles, ["image", *self.concepts]), *self.scale(),
                                     self.scale_label())  # fmt: skip

    def grid_image(self, tile: int = 96) -> Image.Image | None:
        """With the kept grid (keep_grid): one row per recorded layer, one column per concept, each the layer's map
        averaged over the steps, in the result's space and softmax choice, all on one scale with its colour bar.
        None without the grid. The picture where deeper blocks localise and shallow ones do not."""
        if self.grid is None:
            return None
        key = f"{self.settings.space}{'+softmax' if self.settings.softmax else ''}"
        h, w = self.maps.shape[-2:]
        per_layer = rearrange(self.grid[key].mean(dim=1), "L C (h w) -> L C h w", h=h, w=w)  # steps averaged
        lo, hi = (0.0, 1.0) if self.settings.softmax else (float(per_layer.min()), float(per_layer.max()))
        size = (tile, max(1, round(tile * w / h)))
        tiles, captions = [], []
        for layer, maps in zip(self.layers, per_layer, strict=True):
            for concept, m in zip(self.concepts, maps, strict=True):
                tiles.append(imaging.colorize(m, lo, hi).resize((size[1], size[0]), Image.NEAREST))
                captions.append(f"block {layer}: {concept}"[:24])
        grid = imaging.captioned_grid(tiles, captions, columns=len(self.concepts))
        return imaging.with_colorbar(grid, lo, hi, self.scale_label())

    @property
    def source(self) -> Path | None:
        """The file `explain` read the image from (None for a generated image, a PIL image or a tensor)."""
        path = self.image.info.get(imaging.SOURCE_KEY)
        return Path(path) if path else None

    def write_files(self, folder: Path, stems: list[str]) -> None:
        """image.png, overlay.png, grid.png (with the grid), heatmaps/ and masks/ (a file per concept, named `stems`)
        into `folder`; `OutputFolder.write` adds maps.safetensors and settings.json."""
        self.image.save(folder / "image.png")
        self.overlay().save(folder / "overlay.png")
        if self.grid is not None:
            self.grid_image().save(folder / "grid.png")
        masks = self.masks("mean")
        for i, (stem, heat) in enumerate(zip(stems, self.heatmaps(), strict=True)):
            heat.save(folder / "heatmaps" / f"{stem}.png")
            Image.fromarray(masks[i].numpy().astype("uint8") * 255).save(folder / "masks" / f"{stem}.png")

    def save(self, out: str | Path) -> Path:
        """Write image.png, overlay.png, heatmaps/, masks/, maps.safetensors and settings.json as the folder `out`:
        written beside it first and moved into place at the end (see `OutputFolder`); an earlier result of this
        program there is replaced, a folder holding anything else (or the explained image) is refused."""
        inputs = (self.source,) if self.source is not None else ()
        return OutputFolder(out, self.concepts, inputs=inputs).write(self)
