"""The Flux autoencoder: images in [-1, 1] <-> 16-channel latents at 1/8 resolution, with BFL's tensor names.

Follows black-forest-labs/flux `src/flux/modules/autoencoder.py` (the KL autoencoder of latent diffusion, without
quant convs and without attention inside the levels); differs in:
- the levels are small named classes (`EncoderLevel`, `DecoderLevel`, `MidBlock`) instead of bare `nn.Module()`s
  filled in a loop; attribute names are unchanged, so `ae.safetensors` loads with `load_state_dict(strict=True)`;
- `encode(x)` returns the posterior mean; it samples only when given a `torch.Generator` (BFL builds a `reg` module
  whose `sample` flag is fixed at construction and draws with the global RNG);
- float16 is refused with a `ValueError` (weights, inputs, or an active float16 autocast): the decoder's activations
  exceed float16's range and the reference silently returns NaNs / black images. Use float32 or bfloat16;
- `encode` refuses image sizes that are not multiples of the downsampling factor (8 for Flux) instead of letting the
  padded stride-2 convs floor them;
- swish is `F.silu` (BFL writes x * sigmoid(x): the same function, one fused kernel);
- no cast to the up-blocks' dtype in the decoder (mixed-dtype loading is not supported; one dtype per model).

Notable features: the maths of every block fits on a few lines (checkpoints.md §6); `decode` returns the decoder's raw
output, nominally in [-1, 1] and unclamped like both references: clamp before converting to pixels.
Shape legend: B batch, C channels, H/W height/width, Z latent channels, f the downsampling factor (8 for Flux).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

NUM_GROUPS = 32  # GroupNorm groups in every norm of the model (fixed in the reference too)


@dataclass(frozen=True)
class AutoEncoderConfig:
    resolution: int  # training resolution; informational, no layer depends on it
    in_channels: int
    ch: int  # width of the first level
    out_ch: int
    ch_mult: tuple[int, ...]  # width of level i = ch * ch_mult[i]; len(ch_mult) - 1 downsamplings
    num_res_blocks: int  # resnet blocks per encoder level (decoder levels have one more)
    z_channels: int
    scale_factor: float
    shift_factor: float

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        for name in ("resolution", "in_channels", "ch", "out_ch", "num_res_blocks", "z_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AutoEncoderConfig.{name} must be a positive int, got {value!r}")
        if not self.ch_mult or any(not isinstance(m, int) or m <= 0 for m in self.ch_mult):
            raise ValueError(
                f"AutoEncoderConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}"
            )
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % NUM_GROUPS for w in widths):
            raise ValueError(
                f"every level width ch * ch_mult = {widths} must be divisible by the {NUM_GROUPS} GroupNorm groups"
            )
        if not self.scale_factor > 0:
            raise ValueError(f"AutoEncoderConfig.scale_factor must be positive, got {self.scale_factor}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


CONFIGS: dict[str, AutoEncoderConfig] = {
    # BFL `configs["flux-schnell"].ae_params` (the same autoencoder serves flux-dev).
    "flux": AutoEncoderConfig(
        resolution=256,
        in_channels=3,
        ch=128,
        out_ch=3,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        z_channels=16,
        scale_factor=0.3611,
        shift_factor=0.1159,
    ),
    # SD3 / SD3.5 (`first_stage_model.` in the single files; diffusers vae/config.json): Flux's topology, another
    # latent scale and shift
    "sd3": AutoEncoderConfig(
        resolution=256,
        in_channels=3,
        ch=128,
        out_ch=3,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        z_channels=16,
        scale_factor=1.5305,
        shift_factor=0.0609,
    ),
    # Same topology (4 levels, factor 8, 16 latent channels) at a width tests can afford.
    "tiny": AutoEncoderConfig(
        resolution=32,
        in_channels=3,
        ch=32,
        out_ch=3,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=1,
        z_channels=16,
        scale_factor=0.3611,
        shift_factor=0.1159,
    ),
}


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NUM_GROUPS, channels, eps=1e-6, affine=True)


def refuse_float16(x: Tensor, weight: Tensor) -> None:
    """Raise instead of running in float16, where the reference autoencoder overflows to NaN."""
    device = x.device.type
    autocast_fp16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    if x.dtype == torch.float16 or weight.dtype == torch.float16 or autocast_fp16:
        raise ValueError(
            "the Flux autoencoder does not run in float16: its activations exceed float16's range and give NaN "
            "(black) images; use float32 or bfloat16 (weights, inputs and autocast)"
        )


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; q, k, v, proj_out are 1x1 convs (weights [C, C, 1, 1])."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        q, k, v = (rearrange(proj(h), "B C H W -> B 1 (H W) C") for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C), scale 1/sqrt(C)
        h = rearrange(h, "B 1 (H W) C -> B C H W", H=height, W=width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 1, 0, 1))  # asymmetric: one zero column right, one zero row below
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(cin, cout) for cin, cout in pairwise(widths))
        if downsample:
            self.downsample = Downsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x) if hasattr(self, "downsample") else x


class DecoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(cin, cout) for cin, cout in pairwise(widths))
        if upsample:
            self.upsample = Upsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x) if hasattr(self, "upsample") else x


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> moments (B, 2Z, H/f, W/f): mean and log-variance stacked on channels."""

    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        widths = [config.ch * m for m in (1, *config.ch_mult)]  # level i maps widths[i] -> widths[i + 1]
        last = len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList(
            EncoderLevel(widths[i], widths[i + 1], config.num_res_blocks, downsample=i != last)
            for i in range(len(config.ch_mult))
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        refuse_float16(x, self.conv_in.weight)
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # halves H and W except at the last level
        h = self.mid(h)  # (B, ch * ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2Z, H/f, W/f)


class Decoder(nn.Module):
    """Latents (B, Z, h, w) -> images (B, out_ch, f*h, f*w). `up[i]` is the level at the i-th resolution (up[0] is the
    finest), as in the checkpoint; they run from the coarsest, `up[-1]`, to `up[0]`."""

    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        inputs = widths[1:] + widths[-1:]  # level i receives the output width of level i + 1 (the mid width at the top)
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        self.up = nn.ModuleList(
            DecoderLevel(inputs[i], widths[i], config.num_res_blocks + 1, upsample=i != 0)
            for i in range(len(config.ch_mult))
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        refuse_float16(z, self.conv_in.weight)
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)  # doubles H and W except at level 0
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, f*h, f*w)


def sample_gaussian(mean: Tensor, logvar: Tensor, generator: torch.Generator) -> Tensor:
    """mean + exp(logvar / 2) * eps, eps drawn on the generator's device (so a CPU generator reproduces anywhere)."""
    eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps.to(mean.device)


class AutoEncoder(nn.Module):
    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> scaled latents (B, Z, H/f, W/f): the posterior mean, or a sample of the
        posterior when `generator` is given; then scale_factor * (z - shift_factor)."""
        factor = self.config.downsample_factor
        height, width = x.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} is not a multiple of the autoencoder's factor {factor}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # (B, Z, H/f, W/f) each
        z = mean if generator is None else sample_gaussian(mean, logvar, generator)
        return self.config.scale_factor * (z - self.config.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents (B, Z, h, w) -> images (B, C, f*h, f*w), nominally in [-1, 1] (not clamped)."""
        z = z / self.config.scale_factor + self.config.shift_factor
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
