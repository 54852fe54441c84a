"""Flux sampling: seeded noise, latent packing, position ids, the schnell/dev schedules and the Euler loop.

Follows black-forest-labs/flux `src/flux/sampling.py` (checkpoints.md §2.6, §3); differs in:
- image sizes: BFL and diffusers floor heights and widths to multiples of 16 (diffusers with a warning). This project
  refuses them instead: `check_size` raises a ValueError that names the nearest valid sizes, and `get_noise`,
  `unpack` and `image_ids` call it, so a generated image always has exactly the size that was asked for;
- `get_noise` draws in the requested dtype (default float32) on a seeded CPU generator, then moves to `device`.
  BFL draws in bfloat16; on the CPU torch draws the same normal values for every float dtype and rounds them, so
  `dtype=torch.bfloat16` reproduces BFL's noise bit for bit and float32 is its unrounded version (tests check both);
- `denoise` takes a `velocity_fn(img, t_vec)` closure instead of the model and its inputs, so the caller runs the
  transformer however it likes and collects side outputs (concept maps) in its own closure; `t_vec` is float32
  (exact schedule values; BFL builds it in img's dtype: cast inside the closure for bit-parity). Each Euler update is
  computed in float32 and cast back to img's dtype, as diffusers' FlowMatchEulerDiscreteScheduler does (BFL adds in
  img's dtype; identical in float32);
- `get_schedule` computes in float64 and returns Python floats (BFL: a float32 linspace).

Shape legend: B batch, N image tokens, L text tokens; latents are (B, 16, H/8, W/8) for an H x W image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import torch
from einops import rearrange, repeat
from torch import Tensor
from tqdm.auto import tqdm

LATENT_CHANNELS = 16  # channels of the Flux autoencoder's latents
PATCH = 2  # latent pixels per token side: one token = 2x2 latent pixels = 16 image pixels


def check_size(height: int, width: int | None = None) -> None:
    """Raise a ValueError unless height and width are both positive multiples of 16 (8 for the autoencoder, times
    the 2x2 packing); the message gives the nearest valid sizes."""
    if width is None:
        raise ValueError(f"size: give (height, width), two whole numbers; got only {height!r}")
    problems = []
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int):
            problems.append(f"{name} must be an int, got {size!r}")
        elif size < 16:
            problems.append(f"{name} {size} is too small; the smallest valid size is 16")
        elif size % 16:
            below, above = 16 * (size // 16), 16 * (size // 16 + 1)
            problems.append(f"{name} {size} is not a multiple of 16; nearest valid: {below} or {above}")
    if problems:
        raise ValueError("image size must be a positive multiple of 16: " + "; ".join(problems))


def get_noise(
    batch: int,
    height: int,
    width: int,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Seeded Gaussian latents (B, 16, 2*ceil(H/16), 2*ceil(W/16)) = (B, 16, H/8, W/8), drawn on the CPU so a seed
    gives the same noise on every device."""
    check_size(height, width)
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, LATENT_CHANNELS, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def pack(z: Tensor) -> Tensor:
    """Latents (B, C, h, w) -> tokens (B, h/2 * w/2, C*4); token index r * (w/2) + c, channel index c*4 + ph*2 + pw."""
    return rearrange(z, "B C (h ph) (w pw) -> B (h w) (C ph pw)", ph=PATCH, pw=PATCH)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """Tokens (B, N, C*4) of an H x W image -> latents (B, C, H/8, W/8); the inverse of `pack`."""
    check_size(height, width)
    h, w = height // 16, width // 16  # tokens per column and per row
    return rearrange(x, "B (h w) (C ph pw) -> B C (h ph) (w pw)", h=h, w=w, ph=PATCH, pw=PATCH)


def image_ids(batch: int, height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids (B, N, 3) of the image tokens in `pack` order: (0, row, column), float32."""
    check_size(height, width)
    h, w = height // 16, width // 16
    ids = torch.zeros(h, w, 3, dtype=torch.float32, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]  # row index
    ids[..., 2] = torch.arange(w, device=device)[None, :]  # column index
    return repeat(ids, "h w three -> B (h w) three", B=batch)


def text_ids(batch: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids (B, L, 3) of the text tokens: all zeros (text has no position in the RoPE grid)."""
    return torch.zeros(batch, length, 3, dtype=torch.float32, device=device)


def time_shift(mu: float, t: float) -> float:
    """Shift t in [0, 1] towards 1 (more steps at high noise): e^mu / (e^mu + (1/t - 1)); maps 0 -> 0 and 1 -> 1."""
    if t == 0.0:
        return 0.0
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def shift_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The line through (256 tokens, base_shift) and (4096 tokens, max_shift), evaluated at image_seq_len."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return base_shift + slope * (image_seq_len - 256)


def get_schedule(
    num_steps: int, image_seq_len: int, shift: bool = False, base_shift: float = 0.5, max_shift: float = 1.15
) -> list[float]:
    """num_steps + 1 times from 1 (noise) down to 0 (image). schnell: linspace(1, 0, num_steps + 1), no shift;
    dev (shift=True): each time moved by `time_shift` with mu growing with the number of image tokens."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    times = [1.0 - i / num_steps for i in range(num_steps + 1)]
    if shift:
        mu = shift_mu(image_seq_len, base_shift, max_shift)
        times = [time_shift(mu, t) for t in times]
    return times


def flow_match_schedule(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> list[float]:
    """SD3's num_steps + 1 sigmas, as diffusers' FlowMatchEulerDiscreteScheduler (static shift) makes them: the
    training grid's ends moved by s -> shift * s / (1 + (shift - 1) * s), a linspace between them, each value moved
    again (so the end point 1/1000 is shifted twice: 0.00896 for shift 3), then a final 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")

    def shifted(s: float) -> float:
        return shift * s / (1 + (shift - 1) * s)

    top = float(torch.tensor(shifted(1.0), dtype=torch.float32))  # the table is float32 in diffusers
    end = float(torch.tensor(shifted(1 / num_train_timesteps), dtype=torch.float32))
    ramp = [top + (end - top) * i / (num_steps - 1) if num_steps > 1 else top for i in range(num_steps)]
    return [float(torch.tensor(shifted(s), dtype=torch.float32)) for s in ramp] + [0.0]


def euler_step(img: Tensor, velocity: Tensor, t_curr: float, t_prev: float) -> Tensor:
    """img + (t_prev - t_curr) * velocity, in float32, returned in img's dtype."""
    return (img.float() + (t_prev - t_curr) * velocity.float()).to(img.dtype)


def denoise(
    velocity_fn: Callable[[Tensor, Tensor], Tensor], img: Tensor, timesteps: list[float], progress: bool = False
) -> Tensor:
    """Integrate the flow from timesteps[0] to timesteps[-1] with Euler steps.

    velocity_fn(img, t_vec) gets the packed latents (B, N, 64) and the current time as a float32 vector (B,), and
    returns the velocity (B, N, 64). Anything else the model returns (concept maps) is for the closure to keep.
    """
    steps = list(pairwise(timesteps))
    for t_curr, t_prev in tqdm(steps, desc="denoising", disable=not progress):
        t_vec = torch.full((img.shape[0],), t_curr, dtype=torch.float32, device=img.device)
        img = euler_step(img, velocity_fn(img, t_vec), t_curr, t_prev)
    return img
