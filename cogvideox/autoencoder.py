"""CogVideoX's 3D causal VAE: videos (B, 3, F, H, W) in [-1, 1] <-> latents (B, 16, 1 + (F - 1) / 4, H / 8, W / 8),
with diffusers' tensor names, so that the `vae/` folders of `THUDM/CogVideoX-2b` and `-5b` load with
`load_state_dict(strict=True)`.

Follows diffusers' `AutoencoderKLCogVideoX` (`autoencoder_kl_cogvideox.py`, with `CogVideoXDownsample3D` and
`CogVideoXUpsample3D`), which the tests run side by side with this file; differs in:
- the conv cache (each causal conv's last k - 1 input frames, carried from one chunk of frames to the next) is held by
  the convs for the length of one `encode` / `decode` call (`carried_time_context`) instead of nested dicts that every
  forward takes and returns; outside that context a causal conv always pads with its first frame;
- what every CogVideoX VAE leaves unused is not built: `temb` (0 channels), dropout (0.0), the 3x3x3 `conv_shortcut`
  variant, the "replicate" pad mode, quant convs, gradient checkpointing, slicing;
- no tiling (diffusers' `enable_tiling`, off by default there): it blends overlapping tiles and changes the result;
- `encode` returns scaling_factor * the posterior mean; it samples the posterior only when given a `torch.Generator`
  (as `retrieve_latents(..., generator)` does in diffusers' video-to-video pipeline; there is no shift);
- `encode` refuses frame counts other than 1 + 4k and sizes that are not multiples of 8 (diffusers rounds them away).

Notable features: the chunking is part of the maths and is reproduced exactly: the encoder runs on chunks of 8 frames
and the decoder on chunks of 2 latent frames, the remainder joining the first chunk (`frame_chunks`), and every
GroupNorm takes its statistics over the frames of one chunk. An odd frame count keeps its first frame alone through
every change of frame rate (the causal VAE's lone first frame): 9 frames -> 5 -> 3 latent frames, and back.
Shape legend: B batch, C channels, F frames, H/W height/width, Z latent channels (16).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from autoencoder import sample_gaussian

EPS = 1e-6  # every norm of the model (diffusers' norm_eps and the fixed eps of its norm_out / spatial norms)
SAFE_CONV_ELEMENTS = 2**30  # inputs above this many elements go through a 3D conv in chunks of frames (diffusers' 2 GB)


@dataclass(frozen=True)
class VideoAutoEncoderConfig:
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]  # width of each level; len - 1 spatial halvings
    layers_per_block: int  # resnets per encoder level (decoder levels have one more)
    latent_channels: int
    norm_num_groups: int
    temporal_compression_ratio: int  # the first log2(ratio) levels also halve the frame rate
    scaling_factor: float  # latents = scaling_factor * posterior
    encode_chunk_frames: int = 8  # frames per encoder call (diffusers' num_sample_frames_batch_size)
    decode_chunk_latents: int = 2  # latent frames per decoder call (diffusers' num_latent_frames_batch_size)

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                     "temporal_compression_ratio", "encode_chunk_frames", "decode_chunk_latents"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"VideoAutoEncoderConfig.{name} must be a positive int, got {value!r}")
        widths = self.block_out_channels
        if not widths or any(not isinstance(w, int) or w <= 0 or w % self.norm_num_groups for w in widths):
            raise ValueError(
                f"block_out_channels {widths} must be positive ints divisible by norm_num_groups={self.norm_num_groups}"
            )
        ratio = self.temporal_compression_ratio
        if ratio & (ratio - 1) or ratio > self.spatial_factor:
            raise ValueError(f"temporal_compression_ratio must be a power of 2 <= {self.spatial_factor}, got {ratio}")
        if not self.scaling_factor > 0:
            raise ValueError(f"VideoAutoEncoderConfig.scaling_factor must be positive, got {self.scaling_factor}")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def time_halvings(self) -> int:
        return self.temporal_compression_ratio.bit_length() - 1

    def check_video(self, frames: int, height: int, width: int) -> None:
        """A one-line ValueError naming the valid neighbours unless frames = 1 + 4k and H, W are multiples of 8."""
        t, s = self.temporal_compression_ratio, self.spatial_factor
        if frames < 1 or (frames - 1) % t:
            below = 1 + t * ((frames - 1) // t)
            hint = f"use {below} or {below + t}" if frames > 1 else "use 1"
            raise ValueError(
                f"CogVideoX's VAE takes 1 + {t}k frames (1, {1 + t}, {1 + 2 * t}, ...), got {frames}: {hint}"
            )
        for name, size in (("height", height), ("width", width)):
            if size < s or size % s:
                below = s * (size // s)
                hint = f"use {below} or {below + s}" if below else f"use {s}"
                raise ValueError(f"video {name} {size} is not a multiple of the VAE's factor {s}: {hint}")

    @classmethod
    def from_diffusers(cls, config: dict) -> VideoAutoEncoderConfig:
        """From a diffusers `vae/config.json` dict; refuses the options this file does not build."""
        unsupported = {"use_quant_conv": False, "use_post_quant_conv": False, "act_fn": "silu", "norm_eps": EPS}
        for key, expected in unsupported.items():
            if config.get(key, expected) != expected:
                raise ValueError(f"vae config {key}={config[key]!r} is not supported (CogVideoX uses {expected!r})")
        return cls(
            in_channels=config.get("in_channels", 3),
            out_channels=config.get("out_channels", 3),
            block_out_channels=tuple(config.get("block_out_channels", (128, 256, 256, 512))),
            layers_per_block=config.get("layers_per_block", 3),
            latent_channels=config.get("latent_channels", 16),
            norm_num_groups=config.get("norm_num_groups", 32),
            temporal_compression_ratio=int(config.get("temporal_compression_ratio", 4)),
            scaling_factor=config.get("scaling_factor", 1.15258426),
        )


# `vae/config.json` of THUDM/CogVideoX-2b and -5b: the same network, another latent scale.
CONFIGS: dict[str, VideoAutoEncoderConfig] = {
    "cogvideox-2b": VideoAutoEncoderConfig(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 512),
        layers_per_block=3,
        latent_channels=16,
        norm_num_groups=32,
        temporal_compression_ratio=4,
        scaling_factor=1.15258426,
    ),
    "cogvideox-5b": VideoAutoEncoderConfig(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 512),
        layers_per_block=3,
        latent_channels=16,
        norm_num_groups=32,
        temporal_compression_ratio=4,
        scaling_factor=0.7,
    ),
    # The same topology (4 levels: space x8, time x4, 16 latent channels) at a width tests can afford; the widths
    # change between levels so that the 1x1x1 conv shortcuts are exercised.
    "tiny": VideoAutoEncoderConfig(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        temporal_compression_ratio=4,
        scaling_factor=1.15258426,
    ),
}
CONFIGS["cogvideox"] = CONFIGS["cogvideox-2b"]  # the network (names, shapes) of both


def frame_chunks(frames: int, chunk: int) -> list[slice]:
    """diffusers' chunks along time: max(frames // chunk, 1) chunks of `chunk` frames, the remainder frames % chunk
    joining the first. 17 frames by 8: [0:9], [9:17]; 49 frames: [0:9], [9:17], ..., [41:49]; 5 latents by 2: [0:3],
    [3:5]; 5 frames by 8: [0:5]."""
    count, extra = max(frames // chunk, 1), frames % chunk
    return [slice(0 if i == 0 else chunk * i + extra, chunk * (i + 1) + extra) for i in range(count)]


def halve_frames(x: Tensor) -> Tensor:
    """Average consecutive pairs of frames, (B, C, F, H, W) -> (B, C, F / 2, H, W); an odd count keeps its first frame
    alone: 1 + 2m -> 1 + m."""
    first, rest = x[:, :, : x.shape[2] % 2], x[:, :, x.shape[2] % 2 :]
    pairs = rearrange(rest, "B C (F two) H W -> B C F two H W", two=2)
    return torch.cat([first, (pairs[:, :, :, 0] + pairs[:, :, :, 1]) / 2], dim=2)


def double_frames_and_size(x: Tensor) -> Tensor:
    """Nearest-neighbour x2 in time, height and width; an odd count keeps its first frame single: 1 + m -> 1 + 2m."""
    if x.shape[2] % 2 == 1:
        first = F.interpolate(x[:, :, :1], scale_factor=(1.0, 2.0, 2.0))  # (B, C, 1, 2H, 2W)
        rest = F.interpolate(x[:, :, 1:], scale_factor=2.0)  # (B, C, 2(F - 1), 2H, 2W)
        return torch.cat([first, rest], dim=2)
    return F.interpolate(x, scale_factor=2.0)


def per_frame(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 2D conv applied to every frame of (B, C, F, H, W)."""
    out = conv(rearrange(x, "B C F H W -> (B F) C H W"))
    return rearrange(out, "(B F) C H W -> B C F H W", B=x.shape[0])


class SafeConv3d(nn.Conv3d):
    """nn.Conv3d that runs inputs over SAFE_CONV_ELEMENTS in overlapping chunks of frames (each chunk after the first
    starts with the k - 1 frames before it): one conv's result in less memory (diffusers' CogVideoXSafeConv3d)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() <= SAFE_CONV_ELEMENTS:
            return super().forward(x)
        overlap = self.kernel_size[0] - 1
        parts = list(x.chunk(x.numel() // SAFE_CONV_ELEMENTS + 1, dim=2))
        if overlap:
            parts = parts[:1] + [
                torch.cat([prev[:, :, -overlap:], part], dim=2) for prev, part in zip(parts, parts[1:], strict=False)
            ]
        return torch.cat([super(SafeConv3d, self).forward(part) for part in parts], dim=2)


class CausalConv3d(nn.Module):
    """A k x k x k conv whose output frame t sees input frames t - k + 1 .. t: time is padded in front with k - 1
    frames, copies of the first frame or, inside `carried_time_context`, the last k - 1 (padded) input frames of the
    previous chunk; height and width are zero-padded by (k - 1) / 2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.time_pad = kernel_size - 1
        self.conv = SafeConv3d(in_channels, out_channels, kernel_size, padding=(0, kernel_size // 2, kernel_size // 2))
        self.carry = False  # set by carried_time_context
        self.context: Tensor | None = None  # the previous chunk's last time_pad input frames

    def forward(self, x: Tensor) -> Tensor:
        if self.time_pad:
            past = self.context if self.context is not None else x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat([past, x], dim=2)  # (B, C, k - 1 + F, H, W)
            if self.carry:
                self.context = x[:, :, -self.time_pad :].clone()
        return self.conv(x)  # (B, C_out, F, H, W)


@contextmanager
def carried_time_context(module: nn.Module) -> Iterator[None]:
    """Within the block, the causal convs of `module` carry their last input frames from one call to the next (one
    chunk of frames to the next); the carried frames are dropped on exit."""
    convs = [m for m in module.modules() if isinstance(m, CausalConv3d)]
    for conv in convs:
        conv.carry, conv.context = True, None
    try:
        yield
    finally:
        for conv in convs:
            conv.carry, conv.context = False, None


class SpatialNorm3D(nn.Module):
    """The decoder's norm: GroupNorm of the features f, scaled and shifted per position by 1x1x1 convs of the latents
    z, resized (nearest) to f's frames and size; for an odd frame count > 1, f's first frame takes z's first alone."""

    def __init__(self, channels: int, z_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=EPS)
        self.conv_y = CausalConv3d(z_channels, channels, 1)
        self.conv_b = CausalConv3d(z_channels, channels, 1)

    def forward(self, f: Tensor, z: Tensor) -> Tensor:
        frames, size = f.shape[2], f.shape[-2:]
        if frames > 1 and frames % 2 == 1:
            first = F.interpolate(z[:, :, :1], size=(1, *size))
            rest = F.interpolate(z[:, :, 1:], size=(frames - 1, *size))
            z = torch.cat([first, rest], dim=2)  # (B, Z, F, H, W)
        else:
            z = F.interpolate(z, size=f.shape[-3:])
        return self.norm_layer(f) * self.conv_y(z) + self.conv_b(z)


class ResnetBlock3D(nn.Module):
    """norm, silu, causal conv, twice, plus the input (through a 1x1x1 conv when the width changes). The norms are
    GroupNorms in the encoder and SpatialNorm3Ds conditioned on the latents z in the decoder (z_channels given)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, z_channels: int | None = None):
        super().__init__()
        if z_channels is None:
            self.norm1 = nn.GroupNorm(groups, in_channels, eps=EPS)
            self.norm2 = nn.GroupNorm(groups, out_channels, eps=EPS)
        else:
            self.norm1 = SpatialNorm3D(in_channels, z_channels, groups)
            self.norm2 = SpatialNorm3D(out_channels, z_channels, groups)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        if in_channels != out_channels:
            self.conv_shortcut = SafeConv3d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        h = self.norm1(x) if z is None else self.norm1(x, z)
        h = self.conv1(F.silu(h))
        h = self.norm2(h) if z is None else self.norm2(h, z)
        h = self.conv2(F.silu(h))
        skip = self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x
        return skip + h


class Downsample3D(nn.Module):
    """Frame pairs averaged (when compress_time), then a stride-2 3x3 conv on every frame after one zero column right
    and one zero row below: (B, C, F, H, W) -> (B, C, F or F / 2, H / 2, W / 2)."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        if self.compress_time:
            x = halve_frames(x)
        return per_frame(self.conv, F.pad(x, (0, 1, 0, 1)))


class Upsample3D(nn.Module):
    """Nearest x2 in space, and in time when compress_time and there is more than one frame, then a 3x3 conv on every
    frame: (B, C, F, H, W) -> (B, C, F or ~2F, 2H, 2W)."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.compress_time and x.shape[2] > 1:
            x = double_frames_and_size(x)
        else:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0))  # space only
        return per_frame(self.conv, x)


class DownBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, config: VideoAutoEncoderConfig, level: int):
        super().__init__()
        widths = [in_channels] + [out_channels] * config.layers_per_block
        groups = config.norm_num_groups
        self.resnets = nn.ModuleList(ResnetBlock3D(widths[i], widths[i + 1], groups) for i in range(len(widths) - 1))
        if level < len(config.block_out_channels) - 1:
            self.downsamplers = nn.ModuleList([Downsample3D(out_channels, compress_time=level < config.time_halvings)])

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if hasattr(self, "downsamplers") else x


class MidBlock3D(nn.Module):
    def __init__(self, channels: int, groups: int, z_channels: int | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3D(channels, channels, groups, z_channels) for _ in range(2))

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, z)
        return x


class UpBlock3D(nn.Module):
    """`up_blocks[i]` is the i-th level from the coarsest (diffusers' order: they run in index order)."""

    def __init__(self, in_channels: int, out_channels: int, config: VideoAutoEncoderConfig, level: int):
        super().__init__()
        widths = [in_channels] + [out_channels] * (config.layers_per_block + 1)
        groups, z_channels = config.norm_num_groups, config.latent_channels
        self.resnets = nn.ModuleList(
            ResnetBlock3D(widths[i], widths[i + 1], groups, z_channels) for i in range(len(widths) - 1)
        )
        if level < len(config.block_out_channels) - 1:
            self.upsamplers = nn.ModuleList([Upsample3D(out_channels, compress_time=level < config.time_halvings)])

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, z)
        return self.upsamplers[0](x) if hasattr(self, "upsamplers") else x


class Encoder3D(nn.Module):
    """One chunk of frames (B, C, F, H, W) -> moments (B, 2Z, F', H/8, W/8): mean and log-variance on channels."""

    def __init__(self, config: VideoAutoEncoderConfig):
        super().__init__()
        widths = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = CausalConv3d(config.in_channels, widths[0], 3)
        self.down_blocks = nn.ModuleList(
            DownBlock3D(widths[max(i - 1, 0)], widths[i], config, level=i) for i in range(len(widths))
        )
        self.mid_block = MidBlock3D(widths[-1], groups)
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = CausalConv3d(widths[-1], 2 * config.latent_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, widths[0], F, H, W)
        for block in self.down_blocks:
            h = block(h)  # halves H and W (and F in the first time_halvings levels) except at the last level
        h = self.mid_block(h)  # (B, widths[-1], F', H/8, W/8)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2Z, F', H/8, W/8)


class Decoder3D(nn.Module):
    """One chunk of latents z (B, Z, f, h, w) -> frames (B, C, F, 8h, 8w); every norm is conditioned on z."""

    def __init__(self, config: VideoAutoEncoderConfig):
        super().__init__()
        widths = config.block_out_channels[::-1]  # from the coarsest level
        groups, z_channels = config.norm_num_groups, config.latent_channels
        self.conv_in = CausalConv3d(z_channels, widths[0], 3)
        self.mid_block = MidBlock3D(widths[0], groups, z_channels)
        self.up_blocks = nn.ModuleList(
            UpBlock3D(widths[max(i - 1, 0)], widths[i], config, level=i) for i in range(len(widths))
        )
        self.norm_out = SpatialNorm3D(widths[-1], z_channels, groups)
        self.conv_out = CausalConv3d(widths[-1], config.out_channels, 3)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z), z)  # (B, widths[0], f, h, w)
        for block in self.up_blocks:
            h = block(h, z)  # doubles H and W (and F in the first time_halvings levels) except at the last level
        return self.conv_out(F.silu(self.norm_out(h, z)))  # (B, C, F, 8h, 8w)


def decoded_frames(latent_frames: int, config: VideoAutoEncoderConfig) -> int:
    """Frames `decode` returns for a latent frame count: per chunk, 1 + 4(n - 1) for odd n, 4n for even n (so 13 latents
    -> 49 frames, but 2 latents -> 8 frames, not 5: diffusers' decoder doubles every frame of an even chunk)."""
    total = 0
    for chunk in frame_chunks(latent_frames, config.decode_chunk_latents):
        n = len(range(latent_frames)[chunk])
        for _ in range(config.time_halvings):
            n = n if n == 1 else 2 * n - n % 2
        total += n
    return total


class VideoAutoEncoder(nn.Module):
    def __init__(self, config: VideoAutoEncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)

    def encode_moments(self, video: Tensor) -> Tensor:
        """(B, C, F, H, W) -> (B, 2Z, F', H/8, W/8): the encoder over diffusers' chunks of 8 frames, convs carrying
        their last frames from chunk to chunk."""
        with carried_time_context(self.encoder):
            chunks = [
                self.encoder(video[:, :, s]) for s in frame_chunks(video.shape[2], self.config.encode_chunk_frames)
            ]
        return torch.cat(chunks, dim=2)

    def encode(self, video: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Videos (B, C, 1 + 4k, H, W) in [-1, 1] -> latents (B, Z, 1 + k, H/8, W/8): scaling_factor * the posterior
        mean, or * a posterior sample when `generator` is given."""
        if video.ndim != 5:
            raise ValueError(f"encode takes videos (B, C, F, H, W), got shape {tuple(video.shape)}")
        self.config.check_video(*video.shape[2:])
        mean, logvar = self.encode_moments(video).chunk(2, dim=1)  # (B, Z, 1 + k, H/8, W/8) each
        z = mean if generator is None else sample_gaussian(mean, logvar.clamp(-30.0, 20.0), generator)
        return self.config.scaling_factor * z

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, Z, T, h, w) -> videos (B, C, decoded_frames(T), 8h, 8w), nominally in [-1, 1] (not clamped):
        the decoder over diffusers' chunks of 2 latent frames, convs carrying their last frames from chunk to chunk."""
        if latents.ndim != 5 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"decode takes latents (B, {self.config.latent_channels}, T, h, w), got {tuple(latents.shape)}"
            )
        z = 1 / self.config.scaling_factor * latents  # written as diffusers' pipeline writes it: the same rounding
        with carried_time_context(self.decoder):
            chunks = [self.decoder(z[:, :, s]) for s in frame_chunks(z.shape[2], self.config.decode_chunk_latents)]
        return torch.cat(chunks, dim=2)

    def forward(self, video: Tensor) -> Tensor:
        return self.decode(self.encode(video))
