"""Small image helpers shared by the pipeline, the command line and the benchmark: loading, tensors <-> PIL, a
colour map for saliency maps with its colour bar, and captioned grids.

Notable features:
- no plotting library: the colour map is a piecewise-linear copy of the anchors of matplotlib's "inferno" (a public
  domain palette), so heatmaps look the same everywhere and matplotlib stays an optional extra;
- `load_image` decodes every mode Pillow reads into upright 8-bit RGB (EXIF orientation, 16-bit and float data scaled,
  alpha composited over white) or refuses it in one line that names the file; a decompression bomb is refused too.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
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


BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # where Pillow refuses a decompression bomb: about 179 million pixels
SOURCE_KEY = "concept_attention.source"  # `load_image` keeps the file's path in the image's info under this key


def load_image(path: str | Path, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Open an image file as 8-bit RGB, upright, with errors that name the file.

    EXIF orientation is applied (phone photos come out as they are shown); alpha is composited over `background`
    (default white); 16-bit data is scaled by 255/65535 and float data in [0, 1] by 255; a multi-frame file gives its
    first frame. Modes that cannot be mapped to RGB faithfully, float data outside [0, 1], integer data outside
    0..65535 and images above Pillow's decompression-bomb limit are refused with a one-line error. The file's
    absolute path is kept in `image.info[SOURCE_KEY]` (so that a result is never saved over its own input)."""
    if not str(path).strip():
        raise ValueError("the image path is empty; give a PNG, JPEG, TIFF or WebP file")
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an image file; give one PNG, JPEG, TIFF or WebP file")
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked here instead
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ValueError(
                        f"{path} is {im.width} x {im.height} pixels, above the {MAX_PIXELS} pixel limit for images "
                        "(a possible decompression bomb); resize it first"
                    )
                im.load()
                rgb = to_rgb(ImageOps.exif_transpose(im), path, background)
                rgb.info[SOURCE_KEY] = str(path.resolve())
                return rgb
    except Image.DecompressionBombError as err:
        raise ValueError(f"{path}: {err}; resize it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read {path} as an image ({err}); give a PNG, JPEG, TIFF or WebP file") from None


def to_rgb(im: Image.Image, name: str | Path = "image", background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16-bit and float data scaled to 0..255, alpha composited over `background`."""
    if im.mode in ("RGB", "L", "1", "P", "CMYK", "YCbCr") and "transparency" not in im.info:
        return im.convert("RGB")
    if im.mode.startswith(("I", "F")):  # one channel of 16- or 32-bit integers, or 32-bit floats
        data = np.asarray(im, dtype=np.float64)
        lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
        if not np.isfinite(data).all():
            raise ValueError(f"{name}: the {im.mode} image holds NaN or infinite values; save it as an 8-bit PNG")
        if im.mode == "F":
            if lo < 0 or hi > 1:
                raise ValueError(
                    f"{name}: float image with values in [{lo:g}, {hi:g}]; only [0, 1] is understood, "
                    "save it scaled to [0, 1] or as an 8-bit PNG"
                )
            data = data * 255
        elif im.mode.startswith("I;16") or hi > 255:  # 16-bit data (a 32-bit "I" above 255 is read as 16-bit)
            if lo < 0 or hi > 65535:
                raise ValueError(
                    f"{name}: integer image with values in [{lo:g}, {hi:g}], outside 0..65535; save it as 8-bit"
                )
            data = data * (255 / 65535)
        gray = Image.fromarray(np.round(data).astype(np.uint8))
        return gray.convert("RGB")
    try:
        rgba = im.convert("RGBA")  # LA, PA, RGBa, La, P or RGB with a transparent colour, ...
    except ValueError as err:
        raise ValueError(f"{name}: images in mode {im.mode} are not supported ({err}); save it as RGB") from None
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def tensor_to_image(x: Tensor) -> Image.Image:
    """A float tensor [3, H, W] with values in [0, 1] -> PIL RGB; values outside [0, 1] are refused, not clamped."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[0] != 3 or not x.is_floating_point():
        shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"image tensor of shape {shape}: give a float tensor [3, H, W] with values in [0, 1]")
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("the image tensor holds NaN or infinite values; give values in [0, 1]")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(
            f"image tensor values lie in [{lo:g}, {hi:g}]; the tensor input takes [0, 1] (from [-1, 1]: (x + 1) / 2)"
        )
    return to_pil(x * 2 - 1)


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


def format_value(x: float) -> str:
    """A colour-bar label: 3 significant digits, plain notation when it reads well."""
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


def colorbar(width: int, lo: float, hi: float, label: str, height: int = 30) -> Image.Image:
    """A horizontal colour bar for `colorize(..., vmin=lo, vmax=hi)`: the palette from lo (left) to hi (right), with
    both ends and the middle written under it and `label` (what the colours measure) on its left."""
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    left = min(max(8 + int(draw.textlength(label, font=font)) + 8, width // 4), width // 2)
    bar_width = max(width - left - 24, 8)
    ramp = torch.linspace(lo, hi, bar_width)[None].expand(10, -1)
    canvas.paste(colorize(ramp, lo, hi), (left, 3))
    draw.text((4, 2), label, fill="black", font=font)
    for frac in (0.0, 0.5, 1.0):
        text = format_value(lo + frac * (hi - lo))
        x = left + int(frac * (bar_width - 1)) - int(frac * draw.textlength(text, font=font))
        draw.text((x, 15), text, fill="black", font=font)
    return canvas


def with_colorbar(image: Image.Image, lo: float, hi: float, label: str) -> Image.Image:
    """`image` with a colour bar strip (see `colorbar`) underneath."""
    bar = colorbar(image.width, lo, hi, label)
    canvas = Image.new("RGB", (image.width, image.height + bar.height), "white")
    canvas.paste(image.convert("RGB"), (0, 0))
    canvas.paste(bar, (0, image.height))
    return canvas


# ---- sizes and their memory cost ------------------------------------------------------------------------------------
def auto_size(height: int, width: int, native: int) -> tuple[int, int]:
    """A size the model takes for an image of height x width: kept when both sides are multiples of 16 and the long
    side is at most `native`; otherwise scaled (never up) so that the long side is at most `native`, each side rounded
    to the nearest multiple of 16 (at least 16). The aspect ratio changes by at most 8 px per side."""
    if height % 16 == 0 and width % 16 == 0 and max(height, width) <= native:
        return height, width
    scale = min(1.0, native / max(height, width))
    return tuple(max(16, int(side * scale / 16 + 0.5) * 16) for side in (height, width))  # halves round up


def device_memory(device: torch.device) -> int | None:
    """Bytes the device can hold: a CUDA card's total memory, the host's available memory for the CPU (None where
    unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return None


def estimate_memory(height: int, width: int, device: torch.device, dtype: torch.dtype, ae_channels: int,
                    hidden_size: int, text_tokens: int) -> dict[str, int]:  # fmt: skip
    """Activation bytes that grow with the image, for the largest of the autoencoder and the transformer forwards:
    - autoencoder: about 8 live tensors of `ae_channels` x H x W at the full-resolution level, plus on the CPU the
      mid-block attention's (H/8 * W/8)^2 score matrix and its softmax (measured on this project's CPU: 2.2-2.4 times
      one such matrix in float32; CUDA's fused attention kernels do not materialise it);
    - transformer: about 16 x (T + N) x hidden values per block (the MLP's 4x widening, q, k, v and residuals).
    Weights are not included."""
    size = torch.finfo(dtype).bits // 8
    ae = 8 * ae_channels * height * width * size
    if device.type != "cuda":
        ae += int(2.5 * (height * width // 64) ** 2 * 4)
    transformer = 16 * (text_tokens + height * width // 256) * hidden_size * size
    return {"autoencoder": ae, "transformer": transformer}


def check_memory(height: int, width: int, device: torch.device, dtype: torch.dtype, ae_channels: int,
                 hidden_size: int, text_tokens: int, frames: int = 1) -> None:  # fmt: skip
    """Refuse a size whose activation estimate exceeds what the device holds, with the estimate. `frames`: latent
    frames of a video, whose tokens stack like rows of one tall image."""
    have = device_memory(device)
    need = estimate_memory(height * frames, width, device, dtype, ae_channels, hidden_size, text_tokens)
    if have is not None and max(need.values()) > have:
        gb = 1024**3
        video = f" with {frames} latent frames" if frames > 1 else ""
        fix = "a smaller --size or fewer --frames" if frames > 1 else "a smaller --size (size=(height, width))"
        raise ValueError(
            f"size {height}x{width}{video} needs about {max(need.values()) / gb:.1f} GB on {device} for activations "
            f"alone (autoencoder {need['autoencoder'] / gb:.1f} GB, transformer {need['transformer'] / gb:.1f} GB), "
            f"more than the {have / gb:.1f} GB it has; give {fix}"
        )
