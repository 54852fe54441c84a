"""Stable Diffusion 3.5's MM-DiT (Large, Large Turbo, Medium) with ConceptAttention's concept stream as an input.

Follows Stability-AI/sd3.5 `mmditx.py` (`MMDiTX`; parameter names and shapes equal the single-file checkpoint's
`model.diffusion_model.*`) and diffusers' `SD3Transformer2DModel` (which it equals on the same weights, tested);
differs in:
- `SD3Config` is frozen and validated, with named presets in `CONFIGS`, read from a checkpoint by `weights`;
- `SD3.forward` takes timesteps in [0, 1] (the flow's sigma; both references take sigma * 1000) and optional
  `concepts` (an `mmdit.ConceptInput`): concept tokens go through `context_embedder`, are modulated with the prompt's
  conditioning vector t_emb(t) + y_emb(y) (or the pooled vector `concepts.y` if given) and travel through every joint
  block; the result then is an `SD3Output` with the per-block `ConceptSaliency`;
- `concepts` may be an `SD3ConceptInput`, which also says where the output space's image vectors come from
  (`image_vectors`: "prompt" or "concepts", the official SD3 code's second attention) and whether the blocks hand back
  the vectors themselves (`vectors`);
- `stop_after_concepts=True` ends the forward after the last block that reports (real-image saliency needs no more);
- no registers, no ControlNet inputs, no skip-layer guidance, no SD3.0 variants (no q/k norm): only what SD3.5 uses.

Notable features: the velocity is computed by the same operations with and without concepts (tested bitwise); any
token grid up to the position table's (192 x 192 tokens for Large: 3072 px; 384 x 384 for Medium); concepts have no
positions (SD3 adds its position table to the image tokens only).

Shape letters: B batch, Z latent channels, N image tokens (h x w), T text tokens, C concepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor, nn

from mmdit import ConceptInput, ConceptSaliency
from mmdit.layers import LastLayer
from mmdit.math import timestep_embedding

from .layers import JointBlock

__all__ = ["CONFIGS", "SD3", "SD3Config", "SD3ConceptInput", "SD3Output"]


@dataclass(frozen=True)
class SD3Config:
    """The MM-DiT's shape; field names follow diffusers' `SD3Transformer2DModel` config where one exists."""

    in_channels: int  # latent channels (16)
    out_channels: int
    hidden_size: int  # num_heads x 64
    num_heads: int
    depth: int  # joint blocks; the last one's text stream is pre_only
    pos_embed_max_size: int  # side of the stored position table, in tokens
    joint_attention_dim: int  # text token width (4096: T5, and the CLIPs zero-padded)
    pooled_projection_dim: int  # pooled text width (2048: CLIP-L + CLIP-G)
    patch_size: int = 2
    mlp_ratio: float = 4.0
    dual_attention_layers: tuple[int, ...] = ()  # MMDiT-X blocks with a second image attention (Medium: 0..12)
    manual_attention: bool = False

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        for name in ("in_channels", "out_channels", "hidden_size", "num_heads", "depth", "pos_embed_max_size",
                     "joint_attention_dim", "pooled_projection_dim", "patch_size"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SD3Config.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if any(not 0 <= i < self.depth - 1 for i in self.dual_attention_layers):
            raise ValueError(
                f"dual_attention_layers {self.dual_attention_layers} must be block indices below the last block "
                f"({self.depth - 1})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


_SD35 = dict(in_channels=16, out_channels=16, joint_attention_dim=4096, pooled_projection_dim=2048)

CONFIGS: dict[str, SD3Config] = {
    "sd3.5-large": SD3Config(**_SD35, hidden_size=2432, num_heads=38, depth=38, pos_embed_max_size=192),
    "sd3.5-medium": SD3Config(
        **_SD35,
        hidden_size=1536,
        num_heads=24,
        depth=24,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
    ),
    # for tests and notebooks: 2 heads of 32 dims, 3 blocks, 32-d text and pooled vectors, a 16 x 16 position table
    "tiny": SD3Config(
        in_channels=16,
        out_channels=16,
        hidden_size=64,
        num_heads=2,
        depth=3,
        pos_embed_max_size=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
    ),
    "tiny-medium": SD3Config(
        in_channels=16,
        out_channels=16,
        hidden_size=64,
        num_heads=2,
        depth=3,
        pos_embed_max_size=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        dual_attention_layers=(0, 1),
    ),
}
CONFIGS["sd3.5-large-turbo"] = CONFIGS["sd3.5-large"]


@dataclass(frozen=True, eq=False)
class SD3ConceptInput(ConceptInput):
    """`ConceptInput` with SD3's options: `image_vectors` "prompt" (o_x from the joint attention over [image; prompt])
    or "concepts" (from a second attention over [image; concepts]); `vectors`: the blocks also hand back o_c, o_x."""

    image_vectors: str = "prompt"
    vectors: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.image_vectors not in ("prompt", "concepts"):
            raise ValueError(f"image_vectors must be 'prompt' or 'concepts', got {self.image_vectors!r}")


@dataclass
class SD3Output:
    velocity: Tensor | None  # (B, Z, H/8, W/8); None after stop_after_concepts
    saliency: dict[int, ConceptSaliency] = field(default_factory=dict)  # joint-block index -> its saliency


class Embedder(nn.Module):
    """Linear -> SiLU -> Linear (SAI's `TimestepEmbedder` / `VectorEmbedder`, whose linears are `mlp.0`, `mlp.2`)."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    """2 x 2 latent patches -> tokens with a stride-2 convolution (`x_embedder.proj`)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "B hidden h w -> B (h w) hidden")  # (B, N, hidden)


def cropped_pos_embed(table: Tensor, h: int, w: int) -> Tensor:
    """The centre h x w window of the stored (1, M*M, hidden) position table -> (1, h*w, hidden), row-major."""
    M = round(table.shape[1] ** 0.5)
    if h > M or w > M:
        raise ValueError(f"a {h} x {w} token grid exceeds the position table's {M} x {M} (at most {8 * 2 * M} px)")
    top, left = (M - h) // 2, (M - w) // 2
    grid = rearrange(table, "one (M1 M2) hidden -> one M1 M2 hidden", M1=M)[:, top : top + h, left : left + w]
    return rearrange(grid, "one h w hidden -> one (h w) hidden")


class SD3(nn.Module):
    """SD3.5's MM-DiT: patch embed + position table, `depth` joint blocks, adaLN final layer."""

    block_lists = ("joint_blocks",)  # what the memory modes stream or store in fp8 (`mmdit.memory`)

    def __init__(self, config: SD3Config):
        super().__init__()
        self.config = config
        hidden, M = config.hidden_size, config.pos_embed_max_size
        self.x_embedder = PatchEmbed(config.in_channels, hidden, config.patch_size)
        self.register_buffer("pos_embed", torch.zeros(1, M * M, hidden))  # a fixed 2D sin-cos table, stored
        self.t_embedder = Embedder(256, hidden)
        self.y_embedder = Embedder(config.pooled_projection_dim, hidden)
        self.context_embedder = nn.Linear(config.joint_attention_dim, hidden)
        self.joint_blocks = nn.ModuleList(
            JointBlock(
                hidden,
                config.num_heads,
                config.mlp_ratio,
                pre_only=i == config.depth - 1,
                self_attn=i in config.dual_attention_layers,
                manual_attention=config.manual_attention,
            )
            for i in range(config.depth)
        )
        self.final_layer = LastLayer(hidden, config.patch_size, config.out_channels)

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        y: Tensor,
        concepts: ConceptInput | None = None,
        stop_after_concepts: bool = False,
    ) -> Tensor | SD3Output:
        """x (B, Z, H/8, W/8) latents, timesteps (B,) sigma in [0, 1], context (B, T, joint_attention_dim) text tokens,
        y (B, pooled_projection_dim) pooled text.

        Returns the velocity (B, Z, H/8, W/8), or an `SD3Output` when `concepts` is given or `stop_after_concepts`.
        """
        if x.ndim != 4 or context.ndim != 3:
            raise ValueError(
                f"x must be (B, Z, h, w) and context (B, T, D), got {tuple(x.shape)}, {tuple(context.shape)}"
            )
        p = self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        if (h * p, w * p) != tuple(x.shape[-2:]):
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")

        # conditioning vector, shared by every block: time + pooled text
        t_emb = self.t_embedder(timestep_embedding(timesteps, 256).to(x.dtype))  # (B, hidden)
        c = t_emb + self.y_embedder(y)
        img = self.x_embedder(x) + cropped_pos_embed(self.pos_embed, h, w).to(x.dtype)  # (B, N, hidden)
        txt = self.context_embedder(context)  # (B, T, hidden)

        last = -1  # the last block that carries concepts
        if concepts is not None:
            cpt, concept_c, last = self._concept_stream_inputs(concepts, t_emb, c)

        saliency: dict[int, ConceptSaliency] = {}
        for i, block in enumerate(self.joint_blocks):
            if i > last:
                if stop_after_concepts:
                    break
                img, txt = block(img, txt, c)
                continue
            spaces = concepts.spaces if concepts.layers is None or i in concepts.layers else ()
            options = (concepts.image_vectors, concepts.vectors) if isinstance(concepts, SD3ConceptInput) else ()
            img, txt, cpt, s = block(img, txt, c, cpt, concept_c, concepts.target, spaces, concepts.normalize, *options)
            if s is not None:
                saliency[i] = s
        if stop_after_concepts:
            return SD3Output(None, saliency)

        out = self.final_layer(img, c)  # (B, N, p*p*Z)
        velocity = rearrange(out, "B (h w) (p q Z) -> B Z (h p) (w q)", h=h, p=p, q=p)
        return velocity if concepts is None else SD3Output(velocity, saliency)

    def _concept_stream_inputs(self, concepts: ConceptInput, t_emb: Tensor, c: Tensor) -> tuple[Tensor, Tensor, int]:
        """Concept tokens (B, C, hidden), their conditioning vector, and the last block to carry them."""
        B = concepts.txt.shape[0]
        if B != c.shape[0]:
            raise ValueError(f"concepts have batch {B}, the image has {c.shape[0]}")
        depth = len(self.joint_blocks)
        layers = range(depth) if concepts.layers is None else concepts.layers
        if any(not 0 <= i < depth for i in layers):
            raise ValueError(f"concept layers must be joint-block indices in [0, {depth}), got {concepts.layers}")
        concept_c = c if concepts.y is None else t_emb + self.y_embedder(concepts.y)
        last = max(layers, default=-1) if concepts.spaces else -1
        return self.context_embedder(concepts.txt), concept_c, last
