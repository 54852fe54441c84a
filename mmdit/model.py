"""The Flux.1 MM-DiT (schnell and dev) with ConceptAttention's concept stream as an optional, explicit input.

Follows black-forest-labs/flux `src/flux/model.py` (`FluxParams`, `Flux`; parameter names and shapes equal the
checkpoint's); differs in:
- `FluxConfig` is frozen and validated, with named presets in `CONFIGS`, and one extra execution switch,
  `manual_attention` (no parameters: SDPA or the readable manual attention);
- `Flux.forward` takes optional `concepts` (a `ConceptInput`): concept tokens go through `txt_in`, their modulation
  vector is time_in(t) [+ guidance_in(g)] + vector_in(y_c) with y_c = 0 by default, their positions are 0 by default,
  and they travel through the double blocks only (as in the official ConceptAttention code); the result then is a
  `FluxOutput` with the per-layer `ConceptSaliency`;
- `stop_after_double=True` ends the forward after the double blocks (real-image saliency needs no more);
- no guidance embedding module at all when `guidance_embed` is False (BFL uses nn.Identity; same state dict).

Notable features: the velocity is computed by exactly the same operations with and without concepts (tested bitwise);
any token grid and text length; build big models on the meta device and load with `assign=True`.

Shape letters: B batch, T text tokens, N image tokens, C concepts.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .layers import (
    SPACES,
    ConceptSaliency,
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
)
from .math import TARGETS, timestep_embedding

__all__ = ["CONFIGS", "ConceptInput", "ConceptSaliency", "Flux", "FluxConfig", "FluxOutput"]


@dataclass(frozen=True)
class FluxConfig:
    """BFL's `FluxParams` field names; `manual_attention` only picks the attention code path."""

    in_channels: int
    out_channels: int
    vec_in_dim: int  # CLIP pooled width
    context_in_dim: int  # T5 width
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int  # double-stream blocks
    depth_single_blocks: int
    axes_dim: tuple[int, ...]  # RoPE dims per position axis; they sum to the head dim
    theta: int
    qkv_bias: bool
    guidance_embed: bool
    manual_attention: bool = False

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))
        for name in ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.depth < 0 or self.depth_single_blocks < 0:
            raise ValueError(f"block counts must be >= 0, got depth={self.depth}, {self.depth_single_blocks=}")
        if self.mlp_ratio <= 0 or self.theta <= 0:
            raise ValueError(f"mlp_ratio and theta must be positive, got {self.mlp_ratio} and {self.theta}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not self.axes_dim or any(d <= 0 or d % 2 for d in self.axes_dim):
            raise ValueError(f"axes_dim must be positive even numbers (RoPE rotates pairs), got {self.axes_dim}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"sum(axes_dim) = {sum(self.axes_dim)} must equal the head dim hidden_size // num_heads = "
                f"{self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


_SCHNELL = dict(
    in_channels=64,
    out_channels=64,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=(16, 56, 56),
    theta=10_000,
    qkv_bias=True,
)

CONFIGS: dict[str, FluxConfig] = {
    "flux-schnell": FluxConfig(**_SCHNELL, guidance_embed=False),
    "flux-dev": FluxConfig(**_SCHNELL, guidance_embed=True),
    # for tests and notebooks: 2 heads of 32 dims, 2 + 2 blocks, 32-d text and pooled vectors
    "tiny": FluxConfig(
        in_channels=64,
        out_channels=64,
        vec_in_dim=32,
        context_in_dim=32,
        hidden_size=64,
        mlp_ratio=4.0,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 14, 14),
        theta=10_000,
        qkv_bias=True,
        guidance_embed=False,
    ),
}


@dataclass(frozen=True, eq=False)
class ConceptInput:
    """Concept tokens for ConceptAttention and what to report about them.

    txt: (B, C, context_in_dim) concept T5 embeddings. y: (B, vec_in_dim) pooled vector for the concept stream's
    modulation, None = zeros (the paper). ids: (B, C, n_axes) RoPE positions, None = zeros. target: what the concepts
    attend to, one of "concepts+image", "image", "concepts", "none". spaces: saliency spaces to report, from
    ("output", "attention", "value", "cross_attention"). layers: double-block indices that report, None = all.
    normalize: the official evaluation's concept normalisation of o_c before the output-space dot product.
    """

    txt: Tensor
    y: Tensor | None = None
    ids: Tensor | None = None
    target: str = "concepts+image"
    spaces: tuple[str, ...] = ("output",)
    layers: tuple[int, ...] | None = None
    normalize: bool = False

    def __post_init__(self):
        if self.txt.ndim != 3:
            raise ValueError(f"concept txt must be (B, C, context_in_dim), got shape {tuple(self.txt.shape)}")
        B, C = self.txt.shape[:2]
        if self.y is not None and (self.y.ndim != 2 or self.y.shape[0] != B):
            raise ValueError(f"concept y must be (B={B}, vec_in_dim), got shape {tuple(self.y.shape)}")
        if self.ids is not None and (self.ids.ndim != 3 or tuple(self.ids.shape[:2]) != (B, C)):
            raise ValueError(f"concept ids must be (B={B}, C={C}, n_axes), got shape {tuple(self.ids.shape)}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        object.__setattr__(self, "spaces", tuple(self.spaces))
        if not set(self.spaces) <= set(SPACES):
            raise ValueError(f"unknown saliency spaces {sorted(set(self.spaces) - set(SPACES))}; choose from {SPACES}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))


@dataclass
class FluxOutput:
    velocity: Tensor | None  # (B, N, out_channels); None after stop_after_double
    saliency: dict[int, ConceptSaliency] = field(default_factory=dict)  # double-block index -> its saliency


class Flux(nn.Module):
    """Flux.1 MM-DiT: `depth` double-stream blocks, then `depth_single_blocks` single-stream blocks."""

    block_lists = ("double_blocks", "single_blocks")  # what the memory modes stream or store in fp8

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.pe_embedder = EmbedND(config.head_dim, config.theta, config.axes_dim)
        self.img_in = nn.Linear(config.in_channels, hidden, bias=True)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(config.vec_in_dim, hidden)
        if config.guidance_embed:
            self.guidance_in = MLPEmbedder(256, hidden)
        self.txt_in = nn.Linear(config.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, config.num_heads, config.mlp_ratio, config.qkv_bias, config.manual_attention)
            for _ in range(config.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, config.num_heads, config.mlp_ratio, config.manual_attention)
            for _ in range(config.depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden, 1, config.out_channels)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        concepts: ConceptInput | None = None,
        stop_after_double: bool = False,
        attention_mask: Tensor | None = None,
    ) -> Tensor | FluxOutput:
        """img (B, N, in_channels) packed latents, img_ids (B, N, 3), txt (B, T, context_in_dim), txt_ids (B, T, 3),
        timesteps (B,) in [0, 1], y (B, vec_in_dim), guidance (B,) for flux-dev.

        Returns the velocity (B, N, out_channels), or a `FluxOutput` when `concepts` is given or
        `stop_after_double` is True. `attention_mask` (B, T+N, T+N) bool, True where a token of [txt; img] may attend
        to another, masks the joint attention of every block (a training device; Flux never masks; the concept rows
        are not affected).
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, L, channels), got {tuple(img.shape)} and {tuple(txt.shape)}")
        T = txt.shape[1]
        if attention_mask is not None:
            L = T + img.shape[1]
            if attention_mask.shape != (img.shape[0], L, L) or attention_mask.dtype != torch.bool:
                raise ValueError(
                    f"attention_mask must be bool (B, T+N, T+N) = ({img.shape[0]}, {L}, {L}), got "
                    f"{attention_mask.dtype} {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask[:, None]  # (B, 1, L, L), one mask for every head

        # conditioning vector, shared by every block: time [+ guidance] + pooled text
        t_vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))  # (B, hidden)
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this model has a guidance embedding: pass `guidance` (B,)")
            t_vec = t_vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = t_vec + self.vector_in(y)

        img = self.img_in(img)  # (B, N, hidden)
        txt = self.txt_in(txt)  # (B, T, hidden)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))  # (B, 1, T+N, D/2, 2, 2), text first

        last = -1  # the last double block that carries concepts
        if concepts is not None:
            c, concept_vec, concept_pe, last = self._concept_stream_inputs(concepts, t_vec, y)

        saliency: dict[int, ConceptSaliency] = {}
        for i, block in enumerate(self.double_blocks):
            if i > last:
                img, txt = block(img, txt, vec, pe, attention_mask=attention_mask)
                continue
            spaces = concepts.spaces if concepts.layers is None or i in concepts.layers else ()
            img, txt, c, s = block(
                img, txt, vec, pe, c, concept_vec, concept_pe, concepts.target, spaces, concepts.normalize,
                attention_mask=attention_mask,
            )  # fmt: skip
            if s is not None:
                saliency[i] = s
        if stop_after_double:
            return FluxOutput(None, saliency)

        x = torch.cat((txt, img), dim=1)  # (B, T+N, hidden)
        for block in self.single_blocks:
            x = block(x, vec, pe, attention_mask)
        velocity = self.final_layer(x[:, T:], vec)  # (B, N, out_channels)
        return velocity if concepts is None else FluxOutput(velocity, saliency)

    def _concept_stream_inputs(
        self, concepts: ConceptInput, t_vec: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """Concept tokens (B, C, hidden), their modulation vector, their rotations, and the last block to carry them."""
        B, C = concepts.txt.shape[:2]
        if B != y.shape[0]:
            raise ValueError(f"concepts have batch {B}, the image has {y.shape[0]}")
        depth = len(self.double_blocks)
        layers = range(depth) if concepts.layers is None else concepts.layers
        if any(not 0 <= i < depth for i in layers):
            raise ValueError(f"concept layers must be double-block indices in [0, {depth}), got {concepts.layers}")
        y_c = torch.zeros_like(y) if concepts.y is None else concepts.y
        ids = concepts.ids
        if ids is None:
            ids = torch.zeros(B, C, len(self.config.axes_dim), device=concepts.txt.device)
        # the concept stream is needed up to the last reporting block only
        last = max(layers, default=-1) if concepts.spaces else -1
        return self.txt_in(concepts.txt), t_vec + self.vector_in(y_c), self.pe_embedder(ids), last
