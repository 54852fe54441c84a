"""Procedural scenes for the built-in shapes model: images, captions and exact per-pixel masks.

A scene is one to three flat-coloured shapes (distinct kinds, distinct colours, no overlap) on a background with a
soft brightness gradient. Every scene is a pure function of its integer seed, so the held-out split is simply a seed
range the training loop never draws from (`HELD_OUT_SEED_START` and up).

Notable features:
- masks are exact: the image is painted *from* the masks (point-in-shape tests at pixel centres, no anti-aliasing),
  so `masks["circle"]` is precisely the set of pixels that show the circle;
- masks exist for every word a concept list may use: each shape word, each colour word (the shapes of that colour,
  or the background if it has that colour) and "background";
- captions come from a few templates ("a red circle and a blue star on a gray background"); the background phrase,
  the colours and the places ("a red circle at the top left", from each shape's centroid on a 3 x 3 grid) are
  optional, and a one-shape scene can instead get a one-word caption (the shape's name alone) so that a word encoded
  on its own, as ConceptAttention encodes concepts, is a caption the model has seen. Caption draws come after the
  painting, so the options never change a seed's image.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (235, 235, 235), "black": (25, 25, 25), "gray": (128, 128, 128)}
HELD_OUT_SEED_START = 1_000_000_000  # training never draws seeds at or above this
# The held-out seeds are split in two ranges that never meet: TEST scenes (`held_out_seeds`: every number the model
# card and the README report) from HELD_OUT_SEED_START, VALIDATION scenes (`validation_seeds`: what a model's choices,
# such as its recipe's concept layers, are made on) from VALIDATION_SEED_START.
VALIDATION_SEED_START = 1_500_000_000
SPLIT_SIZE = VALIDATION_SEED_START - HELD_OUT_SEED_START  # the most scenes either held-out split can hold
# Scene worlds by name (SceneConfig fields). "simple" is the research log's r9 world; "shaded" is "simple" with larger
# shapes, each painted in a shade of its colour that no caption names (shapes/MODEL_CARD.md, third round).
_SIMPLE = {"shapes": SHAPES[:3], "colours": ("red", "green", "blue"), "backgrounds": ("black",)}
WORLDS: dict[str, dict] = {
    "full": {},
    "simple": _SIMPLE,
    "shaded": {**_SIMPLE, "min_radius": 0.20, "max_radius": 0.30, "shade": (0.6, 1.15)},
}


@dataclass(frozen=True)
class SceneConfig:
    size: int = 128  # image height = width in pixels
    max_shapes: int = 3
    min_radius: float = 0.16  # shape radius as a fraction of the image size
    max_radius: float = 0.26
    background_phrase: float = 0.5  # probability that the caption names the background
    single_word: float = 0.0  # probability of a one-shape scene captioned by the shape's name alone
    colourless: float = 0.0  # probability that the caption leaves out the colours ("a circle and a star")
    positions: float = 0.0  # probability that the caption says where each shape is ("a red circle at the top left")
    shapes: tuple[str, ...] = SHAPES  # the world's vocabulary (see WORLDS); a seed's draws depend only on the sizes
    colours: tuple[str, ...] = tuple(COLOURS)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    shade: tuple[float, float] = (1.0, 1.0)  # each shape's colour times a factor drawn uniformly from this range

    def __post_init__(self):
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        if not 1 <= self.max_shapes <= 3:
            raise ValueError(f"max_shapes must be 1, 2 or 3, got {self.max_shapes}")
        if not 0 < self.min_radius <= self.max_radius <= 0.3:
            raise ValueError(f"need 0 < min_radius <= max_radius <= 0.3, got {self.min_radius}, {self.max_radius}")
        for name, known in (("shapes", SHAPES), ("colours", tuple(COLOURS)), ("backgrounds", tuple(BACKGROUNDS))):
            words = getattr(self, name)
            if not words or len(set(words)) != len(words) or not set(words) <= set(known):
                raise ValueError(f"{name} must be distinct words from {known}, got {words}")
        if min(len(self.shapes), len(self.colours)) < self.max_shapes:
            raise ValueError(f"{self.max_shapes} shapes of distinct kinds and colours need as many shapes and colours")
        if not 0.0 < self.shade[0] <= self.shade[1] <= 1.5:
            raise ValueError(f"shade must be a range (low, high) with 0 < low <= high <= 1.5, got {self.shade}")
        for name in ("background_phrase", "single_word", "colourless", "positions"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    masks: dict[str, np.ndarray]  # word -> (H, W) bool, for every shape, colour and "background" word in the scene
    shapes: list[tuple[str, str]]  # (colour, shape) in caption order
    background: str
    places: list[str]  # where each shape's centroid lies on a 3 x 3 grid: "top left", "middle", "bottom", ...


def polygon_mask(x: np.ndarray, y: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of pixel centres (x, y) against corners (K, 2)."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(corners, np.roll(corners, -1, axis=0), strict=True):
        crosses = (y0 > y) != (y1 > y)
        x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0 + 1e-12)
        inside ^= crosses & (x < x_cross)
    return inside


def regular_corners(n: int, radius: float, angle: float, inner: float | None = None) -> np.ndarray:
    """Corners of a regular n-gon (or an n-pointed star when `inner` is the inner radius), first corner at `angle`."""
    k = 2 * n if inner is not None else n
    theta = angle + 2 * np.pi * np.arange(k) / k
    r = np.full(k, radius) if inner is None else np.where(np.arange(k) % 2 == 0, radius, inner)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def shape_mask(kind: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Exact (size, size) mask of one shape centred at (cx, cy) with radius r, all in pixels; y points down."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    x, y = x - cx, y - cy
    up = -np.pi / 2  # first corner straight up
    if kind == "circle":
        return x**2 + y**2 <= r**2
    if kind == "square":
        return (np.abs(x) <= 0.8 * r) & (np.abs(y) <= 0.8 * r)
    if kind == "diamond":
        return np.abs(x) / (0.75 * r) + np.abs(y) / r <= 1.0
    if kind == "triangle":
        return polygon_mask(x, y - 0.2 * r, regular_corners(3, 1.2 * r, up))
    if kind == "star":
        return polygon_mask(x, y, regular_corners(5, 1.1 * r, up, inner=0.45 * r))
    if kind == "heart":
        u, v = x / r, -(y + 0.1 * r) / r  # implicit heart curve (u^2 + v^2 - 1)^3 - u^2 v^3 <= 0, v up
        u, v = 1.1 * u, 1.1 * v
        return (u**2 + v**2 - 1) ** 3 - u**2 * v**3 <= 0
    raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")


def place_of(mask: np.ndarray) -> str:
    """The 3 x 3 cell of a mask's centroid: "top left", "top", ..., "middle", ..., "bottom right"."""
    rows, cols = np.nonzero(mask)
    row = ("top", "", "bottom")[min(2, int(3 * rows.mean() / mask.shape[0]))]
    col = ("left", "", "right")[min(2, int(3 * cols.mean() / mask.shape[1]))]
    return f"{row} {col}".strip() or "middle"


def caption_for(
    shapes: list[tuple[str, str]], background: str, places: list[str], rng: np.random.Generator, config: SceneConfig
) -> str:
    colourless = rng.random() < config.colourless
    positioned = rng.random() < config.positions
    phrases = [f"a {kind}" if colourless else f"a {colour} {kind}" for colour, kind in shapes]
    if positioned:
        phrases = [
            f"{p} in the middle" if at == "middle" else f"{p} at the {at}"
            for p, at in zip(phrases, places, strict=True)
        ]
    text = " and ".join(phrases)
    if rng.random() < config.background_phrase:
        text += f" on a {background} background"
    return text


def make_scene(seed: int, config: SceneConfig = SceneConfig()) -> Scene:
    """The scene of one seed; deterministic."""
    rng = np.random.default_rng(seed)
    size = config.size
    single = rng.random() < config.single_word
    count = 1 if single else int(rng.integers(1, config.max_shapes + 1))
    kinds = rng.choice(len(config.shapes), size=count, replace=False)
    colours = rng.choice(len(config.colours), size=count, replace=False)
    background = config.backgrounds[int(rng.integers(len(config.backgrounds)))]
    # place shapes one by one; a position is rejected when the shape, grown by 15 %, touches one already placed
    placed: list[tuple[str, str, np.ndarray]] = []
    taken = np.zeros((size, size), dtype=bool)
    for c, k in zip(colours, kinds, strict=True):
        for _attempt in range(50):
            r = size * rng.uniform(config.min_radius, config.max_radius)
            cx, cy = rng.uniform(r, size - r, size=2)
            if not (shape_mask(config.shapes[k], cx, cy, 1.15 * r, size) & taken).any():
                mask = shape_mask(config.shapes[k], cx, cy, r, size)
                placed.append((config.colours[int(c)], config.shapes[int(k)], mask))
                taken |= mask
                break
    # a shape that found no room is left out of the scene and its caption
    shapes = [(colour, kind) for colour, kind, _ in placed]
    # background: flat colour with a gentle linear brightness ramp in a random direction
    angle = rng.uniform(0, 2 * np.pi)
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
    ramp = 1.0 + 0.15 * (np.cos(angle) * x + np.sin(angle) * y)  # (H, W), values in [0.85, 1.15]
    image = np.clip(np.asarray(BACKGROUNDS[background], dtype=np.float64) * ramp[..., None], 0, 255)
    masks: dict[str, np.ndarray] = {}
    foreground = np.zeros((size, size), dtype=bool)
    # shades come from their own generator, so a world without them draws exactly the same scenes
    shades = np.random.default_rng([seed, 1]).uniform(*config.shade, size=len(placed))
    for (colour, kind, mask), shade in zip(placed, shades, strict=True):
        image[mask] = np.minimum(255.0, np.asarray(COLOURS[colour], dtype=np.float64) * shade)
        masks[kind] = mask
        masks[colour] = mask
        foreground |= mask
    masks["background"] = ~foreground
    masks[background] = ~foreground
    places = [place_of(mask) for _, _, mask in placed]
    caption = shapes[0][1] if single else caption_for(shapes, background, places, rng, config)
    return Scene(image.round().astype(np.uint8), caption, masks, shapes, background, places)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [-1, 1], the autoencoder's range."""
    x = torch.from_numpy(np.stack(images)).float()  # (B, H, W, 3)
    return x.permute(0, 3, 1, 2) / 127.5 - 1.0


def make_batch(seeds: list[int], config: SceneConfig = SceneConfig()) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """Images (B, 3, H, W) in [-1, 1], captions and the scenes themselves for a list of seeds."""
    scenes = [make_scene(s, config) for s in seeds]
    return to_tensor([s.image for s in scenes]), [s.caption for s in scenes], scenes


def model_scenes(folder: str | Path, size: int | None = None) -> SceneConfig:
    """The scenes a model folder was trained on: the world named by its recipe.json (the full world when there is no
    recipe or it names none) at the recipe's size, or at `size`."""
    path = Path(folder) / "recipe.json"
    recipe = json.loads(path.read_text()) if path.is_file() else {}
    if size is None and "size" not in recipe:
        raise ValueError(f"{path} is missing, so the scene size is unknown: give it (--size)")
    world = recipe.get("world", "full")
    if world not in WORLDS:
        raise ValueError(f"{Path(folder) / 'recipe.json'} names the world {world!r}; known: {sorted(WORLDS)}")
    return SceneConfig(size=size or int(recipe["size"]), **WORLDS[world])


def held_out_seeds(count: int, start: int = 0) -> list[int]:
    """Seeds of the held-out TEST scenes (never drawn in training, never used to choose anything)."""
    return [HELD_OUT_SEED_START + i for i in _split_range(count, start)]


def validation_seeds(count: int, start: int = 0) -> list[int]:
    """Seeds of the held-out VALIDATION scenes (never drawn in training, disjoint from every test seed): the split a
    model's choices are made on (`python -m shapes.eval --choose-layers`)."""
    return [VALIDATION_SEED_START + i for i in _split_range(count, start)]


def _split_range(count: int, start: int) -> range:
    if start < 0 or count < 0 or start + count > SPLIT_SIZE:
        raise ValueError(f"held-out scenes {start}..{start + count - 1}: a split holds seeds 0..{SPLIT_SIZE - 1}")
    return range(start, start + count)


def training_seeds(generator: torch.Generator, count: int) -> list[int]:
    """A fresh batch of training seeds, all below HELD_OUT_SEED_START."""
    return torch.randint(0, HELD_OUT_SEED_START, (count,), generator=generator).tolist()


def vocabulary() -> list[str]:
    """Every word a caption or a concept list can use."""
    places = ["at", "in", "the", "top", "bottom", "left", "right", "middle"]
    return ["a", "and", "on", "background", *places, *SHAPES, *COLOURS, *BACKGROUNDS]


def world_words(folder: str | Path) -> frozenset[str] | None:
    """Every word the captions of a model folder's world can hold (its recipe's world: shapes, colours, backgrounds,
    "background" and the place words), or None for a folder without a recipe naming a world (a real model)."""
    path = Path(folder) / "recipe.json"
    try:
        world = json.loads(path.read_text()).get("world") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    if world not in WORLDS:
        return None
    config = SceneConfig(size=32, **WORLDS[world])
    places = ("at", "in", "the", "top", "bottom", "left", "right", "middle")
    return frozenset(("a", "and", "on", "background", *places, *config.shapes, *config.colours, *config.backgrounds))


def corpus(count: int = 2000) -> list[str]:
    """Captions for training the tokenizer (with and without every option), plus every vocabulary word alone."""
    config = SceneConfig(size=32, positions=0.5, colourless=0.2)
    return [make_scene(s, config).caption for s in range(count)] + vocabulary()
