"""The layout of a video result, on the CPU in seconds: a tiny CogVideoX with RANDOM weights explains a drawn clip of a
red circle moving past a blue square, and the result folder is written (video.webp, contact_sheet.png, per-concept
heatmap animations, maps.safetensors). The maps of random weights mean nothing: this shows what a run writes and how
to read it, not the method working (that needs the real THUDM/CogVideoX-2b or -5b on a GPU).

Text: the built-in shapes model's T5 and tokenizer (shapes/weights), so that nothing is downloaded.

    .venv/bin/python -m cogvideox.example --out out/cogvideox-example
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import weights
from cogvideox.autoencoder import CONFIGS as AE_CONFIGS
from cogvideox.autoencoder import VideoAutoEncoder
from cogvideox.model import CONFIGS, CogVideoX
from cogvideox.pipeline import CogVideoXPipeline
from cogvideox.sampling import NoiseSchedule

SHAPES = Path(__file__).resolve().parents[1] / "shapes" / "weights"


def randomized(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """N(0, std^2) weights, norm weights around 1: untrained layers that still do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            near_one = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if near_one else 0.0))
    return module.eval()


def moving_clip(frames: int = 9, height: int = 64, width: int = 96) -> list[Image.Image]:
    """A red circle moving left to right past a still blue square, on black."""
    clip = []
    for i in range(frames):
        image = Image.new("RGB", (width, height), "black")
        draw = ImageDraw.Draw(image)
        draw.rectangle((width - 34, 18, width - 10, 42), fill=(40, 80, 230))
        x = 8 + i * (width - 60) / max(frames - 1, 1)
        draw.ellipse((x, 20, x + 22, 42), fill=(230, 40, 40))
        clip.append(image)
    return clip


def tiny_pipeline(seed: int = 0) -> CogVideoXPipeline:
    t5 = weights.load_t5_encoder(SHAPES, "cpu", torch.float32)
    config = CONFIGS["tiny-5b"]
    config = type(config)(**{**config.__dict__, "text_embed_dim": t5.config.d_model, "in_channels": 16,
                             "out_channels": 16})  # fmt: skip
    transformer = randomized(CogVideoX(config), seed)
    autoencoder = randomized(VideoAutoEncoder(AE_CONFIGS["tiny"]), seed + 1, std=0.1)
    tokenizer = weights.load_t5_tokenizer(SHAPES)
    return CogVideoXPipeline(transformer, autoencoder, t5, tokenizer, NoiseSchedule(sampler="dpm", snr_shift_scale=1.0),
                             "cpu", torch.float32, source="tiny random CogVideoX", max_length=16)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/cogvideox-example", help="the result folder (default %(default)s)")
    args = parser.parse_args(argv)
    pipe = tiny_pipeline()
    clip = moving_clip()
    result = pipe.explain(clip, ["circle", "square", "background"], "a red circle and a blue square", t=0.5,
                          num_samples=2, progress=False)  # fmt: skip
    result.record["note"] = "tiny CogVideoX with random weights: the layout of a result, not the method at work"
    from outputs import OutputFolder

    out = OutputFolder(args.out, result.concepts).write(result)
    print(f"wrote {out}/: video.webp, contact_sheet.png, heatmaps/, masks/, maps.safetensors, settings.json "
          f"(maps {list(result.maps.shape)}: concepts x latent frames x tokens; random weights)")  # fmt: skip
    print(np.round(result.frame_mean().mean(dim=(1, 2)).numpy(), 3), "mean map per concept")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
