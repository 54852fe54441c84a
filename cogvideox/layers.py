"""The expert-norm block of CogVideoX's transformer, with ConceptAttention's concept stream inside, and its positions.

Follows diffusers' `CogVideoXBlock`, `CogVideoXLayerNormZero`, `CogVideoXAttnProcessor2_0`, `FeedForward`,
`get_3d_sincos_pos_embed` and the pipeline's `_prepare_rotary_positional_embeddings` (module and parameter names equal
the `transformer/` checkpoint's of THUDM/CogVideoX-2b and -5b, so they load with strict=True); differs in:
- text and video share one attention (`attn1`) and one feed-forward (`ff`) over [text; video]; only the adaLN is per
  modality ("expert"): `norm1`/`norm2` give (shift, scale, gate) for video and for text from one linear. The block
  writes that as `ModulationOut`s (Flux's) and one small `modulate` step, and splits the joint attention's output
  projection per modality (one linear, applied row-wise: the same maths as diffusers' projection of the whole
  sequence);
- the concept stream (Helbling et al. 2025) is part of `CogVideoXBlock.forward`: concept tokens take the TEXT half of
  both expert norms, share `attn1` and `ff`, attend to [concepts; video] (never to the prompt; video keys rotated in
  the 5B, concept keys not: concepts have no position) and are updated like text. The video and text paths never see
  the concepts, so they are computed exactly as without them;
- RoPE (5B) is Flux's (`mmdit.math.rope`, `apply_rope`: adjacent pairs (2p, 2p+1) rotated by [[cos, -sin], [sin,
  cos]]), which is diffusers' `apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)` with its repeat-interleaved
  cos/sin; the axes (t, h, w) take 1/4, 3/8, 3/8 of the head dimension, as `get_3d_rotary_pos_embed`. Only the
  positions are CogVideoX's own (`rope_positions`: the crop-region linspace grid);
- the 2B's sin-cos table is computed for the grid at hand and added to the video tokens only (diffusers adds a table
  over [text; video] whose text rows are zeros, so its text must be exactly `max_text_seq_length` tokens long; here
  any length works and gives the same numbers at 226);
- a manual attention path next to SDPA (`manual_attention`); dropout layers are left out (CogVideoX uses p = 0).

Shape letters: B batch, H heads, D head dim, T text tokens, N video tokens (F frames x h x w), C concepts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from mmdit.layers import ConceptSaliency, ModulationOut, concept_saliency
from mmdit.math import apply_rope, attention, concept_attention


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """[sin | cos] of pos (M,) at dim/2 frequencies 10000^(-2j/dim), in float64: (M, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))
    angle = pos.double()[:, None] * omega  # (M, dim/2)
    return torch.cat((torch.sin(angle), torch.cos(angle)), dim=1)


def sincos_table(dim: int, frames: int, h: int, w: int, spatial_scale: float, temporal_scale: float) -> Tensor:
    """CogVideoX-2B's fixed 3D positions for the video tokens: (F*h*w, dim) in float64, rows frame-major then row-major.

    Columns: [frame (dim/4) | x (3dim/8) | y (3dim/8)], each [sin | cos]; positions are index / scale. (diffusers'
    `get_3d_sincos_pos_embed` names the x half "h": its meshgrid puts the column index first.)
    """
    if dim % 16:
        raise ValueError(f"the 3D sin-cos table needs a width divisible by 16, got {dim}")
    y = torch.arange(h, dtype=torch.float32) / spatial_scale
    x = torch.arange(w, dtype=torch.float32) / spatial_scale
    t = torch.arange(frames, dtype=torch.float32) / temporal_scale
    spatial = dim * 3 // 4
    xy = torch.cat(
        (sincos_1d(spatial // 2, repeat(x, "w -> (h w)", h=h)), sincos_1d(spatial // 2, repeat(y, "h -> (h w)", w=w))),
        dim=1,
    )  # (h*w, 3dim/4)
    table = torch.cat(
        (repeat(sincos_1d(dim // 4, t), "F d -> F hw d", hw=h * w), repeat(xy, "hw d -> F hw d", F=frames)), dim=-1
    )  # (F, h*w, dim)
    return rearrange(table, "F hw d -> (F hw) d")


def rope_positions(frames: int, h: int, w: int, base_h: int, base_w: int) -> Tensor:
    """The 5B's (t, y, x) RoPE positions of the video tokens: (F*h*w, 3) float32, as diffusers' CogVideoX pipeline.

    The h x w grid is fitted into the training grid base_h x base_w (keeping its aspect ratio, centred:
    `get_resize_crop_region_for_grid`), and its positions spread over that region with `linspace(start, stop *
    (n - 1) / n, n)` (integers 0..n-1 when the grid is the training grid); frames are 0..F-1.
    """
    if h / w > base_h / base_w:
        size_h, size_w = base_h, int(round(base_h / h * w))
    else:
        size_h, size_w = int(round(base_w / w * h)), base_w
    top, left = int(round((base_h - size_h) / 2.0)), int(round((base_w - size_w) / 2.0))
    ys = torch.linspace(top, (top + size_h) * (h - 1) / h, h, dtype=torch.float32)
    xs = torch.linspace(left, (left + size_w) * (w - 1) / w, w, dtype=torch.float32)
    ts = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32)
    grid = torch.meshgrid(ts, ys, xs, indexing="ij")  # each (F, h, w)
    return rearrange(torch.stack(grid, dim=-1), "F h w three -> (F h w) three")


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Head dimensions given to the (t, y, x) axes: 1/4, 3/8, 3/8 (16, 24, 24 for 64)."""
    return head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3


class LayerNormZero(nn.Module):
    """CogVideoX's expert adaLN: one linear from the time embedding to (shift, scale, gate) for video and for text,
    one affine LayerNorm shared by both."""

    def __init__(self, time_embed_dim: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, temb: Tensor) -> tuple[ModulationOut, ModulationOut]:
        """temb (B, time_embed_dim) -> video and text modulations, each field (B, 1, dim)."""
        chunks = self.linear(F.silu(temb))[:, None, :].chunk(6, dim=-1)
        return ModulationOut(*chunks[:3]), ModulationOut(*chunks[3:])

    def modulate(self, x: Tensor, mod: ModulationOut) -> Tensor:
        return self.norm(x) * (1 + mod.scale) + mod.shift


class Attention(nn.Module):
    """One attention for text and video: q, k, v with bias, a LayerNorm per head on q and k, output projection."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.to_k = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.to_v = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(num_heads * head_dim, dim)])  # diffusers' to_out.1 is a dropout

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, dim) -> q, k, v (B, H, L, D), q and k LayerNormed per head, not rotated."""
        q, k, v = (rearrange(f(x), "B L (H D) -> B H L D", H=self.num_heads) for f in (self.to_q, self.to_k, self.to_v))
        return self.norm_q(q), self.norm_k(k), v


class GELU(nn.Module):
    """Linear then tanh-approximated GELU (diffusers' `GELU`, whose linear is `proj`)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """dim -> 4 dim -> dim; diffusers names the two linears `net.0.proj` and `net.2` (`net.1` is a dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GELU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CogVideoXBlock(nn.Module):
    """[text; video] through one attention and one feed-forward with expert adaLN; optionally a concept stream."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        time_embed_dim: int,
        norm_eps: float = 1e-5,
        attention_bias: bool = True,
        manual_attention: bool = False,
    ):
        super().__init__()
        self.manual_attention = manual_attention
        self.norm1 = LayerNormZero(time_embed_dim, dim, norm_eps)
        self.attn1 = Attention(dim, num_heads, head_dim, attention_bias)
        self.norm2 = LayerNormZero(time_embed_dim, dim, norm_eps)
        self.ff = FeedForward(dim)

    def forward(
        self,
        video: Tensor,
        text: Tensor,
        temb: Tensor,
        pe: Tensor | None = None,
        concepts: Tensor | None = None,
        target: str = "concepts+image",
        spaces: tuple[str, ...] = (),
        normalize: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, ConceptSaliency | None]:
        """video (B, N, dim), text (B, T, dim), temb (B, time_embed_dim), pe (B or 1, 1, N, D/2, 2, 2) video rotations
        (5B) or None (2B).

        With `concepts` (B, C, dim), also returns the updated concepts and, when `spaces` is not empty, their saliency
        over the N video tokens.
        """
        T = text.shape[1]
        x_mod1, t_mod1 = self.norm1(temb)
        x_mod2, t_mod2 = self.norm2(temb)

        # joint attention over [text; video], exactly as without concepts
        joint = torch.cat((self.norm1.modulate(text, t_mod1), self.norm1.modulate(video, x_mod1)), dim=1)
        q, k, v = self.attn1.heads(joint)  # (B, H, T+N, D) from (B, T+N, dim)
        x_q, x_k, x_v = q[:, :, T:], k[:, :, T:], v[:, :, T:]  # (B, H, N, D), before RoPE
        if pe is not None:  # RoPE on the video tokens only
            q = torch.cat((q[:, :, :T], apply_rope(x_q, pe)), dim=2)
            k = torch.cat((k[:, :, :T], apply_rope(x_k, pe)), dim=2)
        a = attention(q, k, v, manual=self.manual_attention)  # (B, T+N, H*D)
        t_a, x_a = a[:, :T], a[:, T:]
        proj = self.attn1.to_out[0]
        video = video + x_mod1.gate * proj(x_a)
        text = text + t_mod1.gate * proj(t_a)

        # one feed-forward over [text; video], each modulated by its own expert
        ff = self.ff(torch.cat((self.norm2.modulate(text, t_mod2), self.norm2.modulate(video, x_mod2)), dim=1))
        video_out = video + x_mod2.gate * ff[:, T:]
        text_out = text + t_mod2.gate * ff[:, :T]
        if concepts is None:
            return video_out, text_out

        # concept stream: the text expert's modulation, the shared weights, queries against [concepts; video]
        c_q, c_k, c_v = self.attn1.heads(self.norm1.modulate(concepts, t_mod1))  # (B, H, C, D)
        o_c, weights = concept_attention(c_q, c_k, c_v, k[:, :, T:], x_v, target)  # (B, H, C, D), (B, H, C, C+N)
        o_c = rearrange(o_c, "B H C D -> B C (H D)")
        saliency = concept_saliency(spaces, o_c, x_a, weights, c_v, x_v, c_k, x_q, normalize) if spaces else None
        concepts = concepts + t_mod1.gate * proj(o_c)
        concepts_out = concepts + t_mod2.gate * self.ff(self.norm2.modulate(concepts, t_mod2))
        return video_out, text_out, concepts_out, saliency
