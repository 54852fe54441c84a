"""CogVideoX's transformer (2B and 5B) with ConceptAttention's concept stream as an input.

Follows diffusers' `CogVideoXTransformer3DModel` (parameter names and shapes equal the `transformer/` folder of
THUDM/CogVideoX-2b and -5b, so it loads with strict=True and no rename table; it equals diffusers' model on the same
weights, tested) for CogVideoX 1.0 (per-frame 2 x 2 patches); differs in:
- `CogVideoXConfig` is frozen and validated, with named presets in `CONFIGS`; its field names are config.json's;
- the positions are computed inside `forward` from the latent grid: the 2B's 3D sin-cos table (added to the video
  tokens), the 5B's 3D RoPE with the crop-region grid diffusers' pipeline computes (`image_rotary_emb` there);
- `CogVideoX.forward` takes optional `concepts` (an `mmdit.ConceptInput`): concept tokens go through
  `patch_embed.text_proj` (with no position: the text rows of the 2B's table are zeros) and travel through every
  block with the text expert's modulation; the result then is a `CogVideoXOutput` with the per-block
  `ConceptSaliency`, over N = frames x h x w video tokens (frame-major, then row-major);
- `stop_after_concepts=True` ends the forward after the last block that reports;
- no CogVideoX 1.5 (`patch_size_t`, `ofs` embedding, learned positions), no image-to-video channel concatenation
  beyond `in_channels`, no gradient checkpointing, no LoRA scaling.

Notable features: the prediction is computed by the same operations with and without concepts (tested bitwise);
any latent grid (the 2B's table and the 5B's rotations are computed for it); the text may have any length (diffusers'
2B needs exactly `max_text_seq_length` = 226 tokens, the length its table was built for).

Shape letters: B batch, F latent frames, Z latent channels, N video tokens (F x h x w), T text tokens, C concepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmdit import ConceptInput, ConceptSaliency
from mmdit.layers import EmbedND
from mmdit.math import timestep_embedding

from .layers import CogVideoXBlock, rope_axes, rope_positions, sincos_table

__all__ = ["CONFIGS", "CogVideoX", "CogVideoXConfig", "CogVideoXOutput"]


@dataclass(frozen=True)
class CogVideoXConfig:
    """The transformer's shape; field names are those of diffusers' `CogVideoXTransformer3DModel` config.json."""

    num_attention_heads: int  # 30 (2B), 48 (5B)
    num_layers: int  # 30 (2B), 42 (5B)
    use_rotary_positional_embeddings: bool  # False: 3D sin-cos table (2B); True: 3D RoPE (5B)
    attention_head_dim: int = 64
    in_channels: int = 16  # latent channels
    out_channels: int = 16
    text_embed_dim: int = 4096  # T5-XXL
    time_embed_dim: int = 512
    patch_size: int = 2
    sample_height: int = 60  # the training latent grid (480 x 720 px): the RoPE crop region's reference
    sample_width: int = 90
    sample_frames: int = 49  # video frames (13 latent frames)
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226  # the prompt length it was trained with (T5 tokens, padded)
    spatial_interpolation_scale: float = 1.875  # sin-cos table: positions / scale
    temporal_interpolation_scale: float = 1.0
    norm_eps: float = 1e-5
    attention_bias: bool = True
    rope_theta: float = 10_000.0
    manual_attention: bool = False

    def __post_init__(self):
        for name in ("num_attention_heads", "num_layers", "attention_head_dim", "in_channels", "out_channels",
                     "text_embed_dim", "time_embed_dim", "patch_size", "sample_height", "sample_width",
                     "sample_frames", "temporal_compression_ratio", "max_text_seq_length"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CogVideoXConfig.{name} must be a positive int, got {value!r}")
        if self.use_rotary_positional_embeddings:
            if self.attention_head_dim % 16:  # axes of D/4, 3D/8, 3D/8 dimensions, each an even number
                raise ValueError(f"3D RoPE needs attention_head_dim divisible by 16, got {self.attention_head_dim}")
        elif self.inner_dim % 16:
            raise ValueError(f"the 3D sin-cos table needs num_attention_heads x attention_head_dim divisible by 16, "
                             f"got {self.inner_dim}")  # fmt: skip
        if self.sample_height % self.patch_size or self.sample_width % self.patch_size:
            raise ValueError(f"sample size {self.sample_height} x {self.sample_width} is not a multiple of the patch "
                             f"size {self.patch_size}")  # fmt: skip

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


_TINY = dict(attention_head_dim=32, num_attention_heads=2, num_layers=3, in_channels=4, out_channels=4,
             text_embed_dim=32, time_embed_dim=32, sample_height=8, sample_width=12, sample_frames=9,
             max_text_seq_length=7)  # fmt: skip

CONFIGS: dict[str, CogVideoXConfig] = {
    "cogvideox-2b": CogVideoXConfig(num_attention_heads=30, num_layers=30, use_rotary_positional_embeddings=False),
    "cogvideox-5b": CogVideoXConfig(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
    # for tests: 2 heads of 32 dims, 3 blocks, 4 latent channels, 32-d text, a 4 x 6 token training grid
    "tiny-2b": CogVideoXConfig(**_TINY, use_rotary_positional_embeddings=False),
    "tiny-5b": CogVideoXConfig(**_TINY, use_rotary_positional_embeddings=True),
}


@dataclass
class CogVideoXOutput:
    prediction: Tensor | None  # (B, F, Z, H, W) the v-prediction; None after stop_after_concepts
    saliency: dict[int, ConceptSaliency] = field(default_factory=dict)  # block index -> its saliency over N tokens


class PatchEmbed(nn.Module):
    """Per-frame 2 x 2 latent patches -> tokens (`proj`, a strided convolution); T5 tokens -> width (`text_proj`)."""

    def __init__(self, in_channels: int, dim: int, text_embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.text_proj = nn.Linear(text_embed_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, F, Z, H, W) -> (B, F*h*w, dim), frame-major then row-major."""
        B = x.shape[0]
        tokens = self.proj(rearrange(x, "B F Z H W -> (B F) Z H W"))  # (B*F, dim, h, w)
        return rearrange(tokens, "(B F) dim h w -> B (F h w) dim", B=B)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear, from the sinusoidal embedding (width inner_dim) to time_embed_dim."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class AdaLayerNorm(nn.Module):
    """The final adaLN: (shift, scale) from the time embedding (shift first), an affine LayerNorm."""

    def __init__(self, time_embed_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        shift, scale = self.linear(F.silu(temb))[:, None, :].chunk(2, dim=-1)  # each (B, 1, dim)
        return self.norm(x) * (1 + scale) + shift


class CogVideoX(nn.Module):
    """CogVideoX's transformer: patch embed (+ sin-cos table or RoPE), `num_layers` expert-norm blocks, final adaLN."""

    block_lists = ("transformer_blocks",)  # what the memory modes stream or store in fp8 (`mmdit.memory`)

    def __init__(self, config: CogVideoXConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.patch_embed = PatchEmbed(config.in_channels, dim, config.text_embed_dim, config.patch_size)
        self.time_embedding = TimestepEmbedding(dim, config.time_embed_dim)
        self.transformer_blocks = nn.ModuleList(
            CogVideoXBlock(dim, config.num_attention_heads, config.attention_head_dim, config.time_embed_dim,
                           config.norm_eps, config.attention_bias, config.manual_attention)
            for _ in range(config.num_layers)
        )  # fmt: skip
        self.norm_final = nn.LayerNorm(dim, eps=config.norm_eps)
        self.norm_out = AdaLayerNorm(config.time_embed_dim, dim, config.norm_eps)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.out_channels)
        self.rope = EmbedND(config.attention_head_dim, config.rope_theta, rope_axes(config.attention_head_dim))

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        concepts: ConceptInput | None = None,
        stop_after_concepts: bool = False,
    ) -> Tensor | CogVideoXOutput:
        """x (B, F, Z, H, W) latents (frames before channels, as diffusers), timesteps (B,) the scheduler's timesteps
        in [0, 1000), context (B, T, text_embed_dim) T5 tokens.

        Returns the v-prediction (B, F, Z, H, W), or a `CogVideoXOutput` when `concepts` is given or
        `stop_after_concepts`.
        """
        if x.ndim != 5 or context.ndim != 3:
            raise ValueError(f"x must be (B, F, Z, H, W) and context (B, T, D), got {tuple(x.shape)}, "
                             f"{tuple(context.shape)}")  # fmt: skip
        cfg = self.config
        p = cfg.patch_size
        frames, h, w = x.shape[1], x.shape[-2] // p, x.shape[-1] // p
        if (h * p, w * p) != tuple(x.shape[-2:]):
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")

        # time embedding, shared by every block
        temb = self.time_embedding(timestep_embedding(timesteps, cfg.inner_dim, time_factor=1.0).to(x.dtype))
        video = self.patch_embed(x)  # (B, N, dim)
        text = self.patch_embed.text_proj(context)  # (B, T, dim)
        pe = None
        if cfg.use_rotary_positional_embeddings:
            ids = rope_positions(frames, h, w, cfg.sample_height // p, cfg.sample_width // p).to(x.device)
            pe = self.rope(ids[None])  # (1, 1, N, D/2, 2, 2)
        else:
            table = sincos_table(cfg.inner_dim, frames, h, w, cfg.spatial_interpolation_scale,
                                 cfg.temporal_interpolation_scale)  # fmt: skip
            video = video + table.to(device=x.device, dtype=video.dtype)

        last = -1  # the last block that carries concepts
        if concepts is not None:
            cpt, last = self._concept_stream_inputs(concepts, x.shape[0])

        saliency: dict[int, ConceptSaliency] = {}
        for i, block in enumerate(self.transformer_blocks):
            if i > last:
                if stop_after_concepts:
                    break
                video, text = block(video, text, temb, pe)
                continue
            spaces = concepts.spaces if concepts.layers is None or i in concepts.layers else ()
            video, text, cpt, s = block(video, text, temb, pe, cpt, concepts.target, spaces, concepts.normalize)
            if s is not None:
                saliency[i] = s
        if stop_after_concepts:
            return CogVideoXOutput(None, saliency)

        out = self.proj_out(self.norm_out(self.norm_final(video), temb))  # (B, N, Z*p*p)
        prediction = rearrange(out, "B (F h w) (Z p q) -> B F Z (h p) (w q)", F=frames, h=h, p=p, q=p)
        return prediction if concepts is None else CogVideoXOutput(prediction, saliency)

    def _concept_stream_inputs(self, concepts: ConceptInput, batch: int) -> tuple[Tensor, int]:
        """Concept tokens (B, C, dim) and the last block to carry them."""
        if concepts.txt.shape[0] != batch:
            raise ValueError(f"concepts have batch {concepts.txt.shape[0]}, the video has {batch}")
        if concepts.y is not None or concepts.ids is not None:
            raise ValueError("CogVideoX concepts take no pooled vector `y` and no positions `ids` (it has neither)")
        depth = len(self.transformer_blocks)
        layers = range(depth) if concepts.layers is None else concepts.layers
        if any(not 0 <= i < depth for i in layers):
            raise ValueError(f"concept layers must be block indices in [0, {depth}), got {concepts.layers}")
        last = max(layers, default=-1) if concepts.spaces else -1
        return self.patch_embed.text_proj(concepts.txt), last
