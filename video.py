"""Videos for ConceptAttention on CogVideoX: reading a clip, writing animations, and the result of a video with its
concept maps per latent frame.

Notable features: no video library: frames are read with Pillow from an animated GIF or WebP, or from a folder of
PNG/JPEG frames, and written as animated WebP (Pillow); a `VideoResult` is a `saliency.ConceptResult` whose maps are
[C, F, h, w] (F latent frames) and whose pictures are the video, one heatmap animation per concept, a contact sheet
of overlays (frames x concepts, one colour scale, a colour bar) and per-concept strips, written by the same
`OutputFolder` (nothing of the user's is replaced).

Frames and latent frames: CogVideoX's autoencoder keeps the first frame as latent frame 0 and packs each next four
frames into one latent frame, so decoded frame i belongs to latent frame 0 (i = 0) or (i - 1) // 4 + 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence, UnidentifiedImageError
from torch import Tensor

import imaging
from saliency import ConceptResult

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TIME_FACTOR = 4  # decoded frames per latent frame after the first


def load_video(path: str | Path, max_frames: int = 1000) -> list[Image.Image]:
    """RGB frames of an animated GIF / WebP, or of the image files of a folder in name order; one-line errors."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"the folder {path} holds no frames ({', '.join(FRAME_SUFFIXES)} files)")
        frames = [imaging.load_image(p) for p in files[:max_frames]]
    elif path.is_file():
        try:
            with Image.open(path) as clip:
                frames = []
                for frame in ImageSequence.Iterator(clip):
                    frames.append(imaging.to_rgb(frame.copy(), path))
                    if len(frames) == max_frames:
                        break
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(
                f"cannot read {path} as a video ({error}); give an animated GIF/WebP or a folder of frames"
            ) from None
    else:
        raise FileNotFoundError(f"the video {path} does not exist; give an animated GIF/WebP or a folder of frames")
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"the frames of {path} differ in size ({sorted(sizes)[:3]}); give frames of one size")
    return frames


def save_animation(frames: list[Image.Image], path: str | Path, fps: float = 8.0) -> None:
    """An animated WebP (lossless), looping."""
    frames = [f.convert("RGB") for f in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0, lossless=True)


def latent_frames(frames: int) -> int:
    """Latent frames of a clip of 1 + 4k frames: the first alone, then one per TIME_FACTOR."""
    return 1 + (frames - 1) // TIME_FACTOR


def latent_index(frame: int) -> int:
    """The latent frame a decoded frame belongs to."""
    return 0 if frame == 0 else (frame - 1) // TIME_FACTOR + 1


def even_picks(count: int, most: int) -> list[int]:
    """At most `most` indices spread evenly over range(count), first and last included."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


@dataclass
class VideoResult(ConceptResult):
    """`generate` / `explain` on a video: `frames` the decoded (or given) frames, `maps` [C, F, h, w] per latent
    frame; `image` is the first frame."""

    frames: list[Image.Image] = field(default_factory=list)
    fps: float = 8.0

    def frame_maps(self) -> Tensor:
        """Maps per decoded frame [C, len(frames), h, w] (each frame takes its latent frame's map)."""
        index = [min(latent_index(i), self.maps.shape[1] - 1) for i in range(len(self.frames))]
        return self.maps[:, index]

    def frame_mean(self) -> Tensor:
        """The maps averaged over latent frames [C, h, w] (the reduction over frames the paper's text speaks of)."""
        return self.maps.mean(dim=1)

    def _heat(self, m: Tensor, size: tuple[int, int]) -> Image.Image:
        lo, hi = self.scale()
        return imaging.colorize(m, lo, hi).resize(size, Image.BILINEAR)

    def heatmap_frames(self, concept: int, alpha: float = 0.55) -> list[Image.Image]:
        """The concept's map over each frame, on the result's one scale."""
        maps = self.frame_maps()[concept]
        return [imaging.blend(f, self._heat(m, f.size), alpha) for f, m in zip(self.frames, maps, strict=True)]

    def contact_sheet(self, rows: int = 8, alpha: float = 0.55) -> Image.Image:
        """Rows of frames (at most `rows`, evenly spread), columns: the frame, then each concept's map over it; one
        colour scale with its bar."""
        tiles, captions = [], []
        maps = self.frame_maps()
        for i in even_picks(len(self.frames), rows):
            frame = self.frames[i]
            tiles.append(frame)
            captions.append(f"frame {i}")
            for c, concept in enumerate(self.concepts):
                tiles.append(imaging.blend(frame, self._heat(maps[c, i], frame.size), alpha))
                captions.append(concept[:24])
        sheet = imaging.captioned_grid(tiles, captions, columns=1 + len(self.concepts))
        return imaging.with_colorbar(sheet, *self.scale(), self.scale_label())

    def overlay(self, alpha: float = 0.55) -> Image.Image:
        return self.contact_sheet(alpha=alpha)

    def masks(self, rule: str = "mean", size: tuple[int, int] | None = None) -> Tensor:
        """Boolean masks per latent frame [C, F, H, W]: pixels above the concept's mean over the whole clip."""
        if rule != "mean":
            raise ValueError(f"mask rule {rule!r}: videos take 'mean'")
        size = size or (self.image.height, self.image.width)
        maps = F.interpolate(self.maps, size=size, mode="bilinear", align_corners=False)  # (C, F, H, W) per frame
        return maps > self.maps.mean(dim=(1, 2, 3))[:, None, None, None]

    def write_files(self, folder: Path, stems: list[str]) -> None:
        """video.webp, contact_sheet.png, and per concept heatmaps/{stem}.webp (the animation) and heatmaps/, masks/
        {stem}.png (strips over the latent frames); `OutputFolder.write` adds maps.safetensors and settings.json."""
        save_animation(self.frames, folder / "video.webp", self.fps)
        self.contact_sheet().save(folder / "contact_sheet.png")
        masks = self.masks()
        lo, hi = self.scale()
        for c, stem in enumerate(stems):
            save_animation(self.heatmap_frames(c), folder / "heatmaps" / f"{stem}.webp", self.fps)
            strip = torch.cat(list(self.maps[c]), dim=1)  # (h, F * w): the latent frames side by side
            imaging.colorize(strip, lo, hi).resize((self.image.width * len(self.maps[c]), self.image.height),
                                                   Image.NEAREST).save(folder / "heatmaps" / f"{stem}.png")  # fmt: skip
            Image.fromarray(np.concatenate(list(masks[c].numpy()), axis=1).astype("uint8") * 255).save(
                folder / "masks" / f"{stem}.png"
            )
