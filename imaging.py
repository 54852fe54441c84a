"""Small image helpers shared by the pipeline, the command line and the benchmark: loading, tensors <-> PIL, a
colour map for saliency maps and captioned grids.

Notable features:
- no plotting library: the colour map is a piecewise-linear copy of the anchors of matplotlib's "inferno" (a public
  domain palette), so heatmaps look the same everywhere and matplotlib stays an optional extra;
- `load_image` names the file and says what went wrong instead of a PIL traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from torch import Tensor

# Nine anchors of the "inferno" palette, from black through purple and orange to pale yellow.
_INFERNO = np.array(
    [
        [0, 0, 4],
        [31, 12, 72],
        [85, 15, 109],
        [136, 34, 106],
        [186, 54, 85],
        [227, 89, 51],
        [249, 140, 10],
        [249, 201, 50],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with an error that names the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read {path} as an image ({err}); give a PNG, JPEG or WebP file") from err


def to_tensor(image: Image.Image) -> Tensor:
    """PIL RGB image -> float tensor [3, H, W] in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_pil(x: Tensor) -> Image.Image:
    """Float tensor [3, H, W] in [-1, 1] -> PIL RGB image (rounded, not truncated)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())


def colorize(map2d: Tensor, vmin: float | None = None, vmax: float | None = None) -> Image.Image:
    """A 2-D map -> RGB heatmap with the inferno palette, min-max scaled unless vmin/vmax are given."""
    m = map2d.detach().float().cpu().numpy()
    lo = float(m.min()) if vmin is None else vmin
    hi = float(m.max()) if vmax is None else vmax
    u = np.clip((m - lo) / max(hi - lo, 1e-12), 0.0, 1.0) * (len(_INFERNO) - 1)
    i = np.minimum(u.astype(np.int64), len(_INFERNO) - 2)
    f = (u - i)[..., None]
    rgb = _INFERNO[i] * (1 - f) + _INFERNO[i + 1] * f
    return Image.fromarray(rgb.round().astype(np.uint8))


def blend(image: Image.Image, heat: Image.Image, alpha: float = 0.55) -> Image.Image:
    """Lay a heatmap over an image (the heatmap is resized to the image with bilinear filtering)."""
    heat = heat.resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, alpha)


def captioned_grid(tiles: list[Image.Image], captions: list[str], columns: int | None = None) -> Image.Image:
    """Tiles of equal size in a grid, each with its caption in a strip above it."""
    if not tiles:
        raise ValueError("captioned_grid needs at least one tile")
    font = ImageFont.load_default()
    w, h = tiles[0].size
    strip = 14
    columns = columns or min(len(tiles), 4)
    rows = -(-len(tiles) // columns)
    canvas = Image.new("RGB", (columns * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        x, y = (index % columns) * w, (index // columns) * (h + strip)
        draw.text((x + 3, y + 1), caption, fill="black", font=font)
        canvas.paste(tile.resize((w, h)), (x, y + strip))
    return canvas
