"""The joint block of Stable Diffusion 3.5's MM-DiT, with ConceptAttention's concept stream inside.

Follows Stability-AI/sd3.5 `mmditx.py` (`DismantledBlock`, `block_mixing`, `JointBlock`; parameter names equal the
single-file checkpoint's `joint_blocks.*`, so `sd3.5_large_turbo.safetensors` loads with strict=True) and diffusers'
`JointTransformerBlock` (the joint attention runs over [image; text], image first); differs in:
- the concept stream (Helbling et al. 2025) is part of `JointBlock.forward`: concept tokens reuse every weight of the
  text stream (`context_block`: adaLN with the conditioning vector, qkv, q/k RMSNorm, output projection, MLP), attend
  to [concepts; image] (never to the prompt) and are updated like text. The image and text paths never see them, so
  they are computed exactly as without concepts. In the last block (`pre_only`: the text stream ends there, with no
  projection and no MLP) the concepts still attend and report, and are not updated;
- one stream's steps are the free functions Flux's block uses (`mmdit.layers.pre_attention`, `post_attention`,
  `concept_saliency`; `mmdit.math.attention`, `concept_attention`), so the method is written once for both families;
- SD3.5 Medium's second, image-only attention (`attn2`, MMDiT-X) is one extra gated residual before the MLP. It takes
  no part in the concept stream: the image vectors o_x of the output space come from the joint attention (or, with
  `image_vectors="concepts"`, from the image rows of [image; concepts]; both use the `attn` weights only), as in the
  blocks without `attn2`. (The official SD3 code crashes in Medium's first block: its processor, shared with `attn2`,
  reads the absent text of the image-only attention.)
- `image_vectors="concepts"` (the official SD3 code's output space): o_x are the image rows, before the output
  projection, of a second attention in which the image queries attend to [image; concepts] keys and values instead
  of [image; prompt]; computed only when asked, never used for the image (whose rows come from the real attention).
  `vectors=True` also hands back o_c and o_x themselves (`SD3Saliency`), for a reduction that averages vectors.

Shape letters: B batch, H heads, D head dim, N image tokens, T text tokens, C concepts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from mmdit.layers import ConceptSaliency, ModulationOut, concept_saliency, feed_forward, post_attention, pre_attention
from mmdit.math import attention, concept_attention, rms_norm


@dataclass
class SD3Saliency(ConceptSaliency):
    """`ConceptSaliency` with the output-space vectors themselves, when a block is asked for them (`vectors=True`)."""

    concept_vectors: Tensor | None = None  # (B, C, H*D)  o_c, before the output projection
    image_vectors: Tensor | None = None  # (B, N, H*D)  o_x, before the output projection


class RMSNorm(nn.Module):
    """RMS normalisation over the head dimension with a learnt `weight` (SAI's name; Flux's calls it `scale`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class SelfAttention(nn.Module):
    """One stream's attention weights: fused qkv (with bias), q/k RMSNorm per head, output projection (none when
    `pre_only`: the last block's text stream)."""

    def __init__(self, dim: int, num_heads: int, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.ln_q = RMSNorm(dim // num_heads)
        self.ln_k = RMSNorm(dim // num_heads)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, hidden) -> q, k, v (B, H, L, D), q and k RMS-normed."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        return self.ln_q(q).to(v.dtype), self.ln_k(k).to(v.dtype), v


class Mlp(nn.Module):
    """fc1 -> GELU (tanh) -> fc2: the same feed-forward as Flux's, under SAI's names."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        fc1, act, fc2 = feed_forward(hidden_size, mlp_ratio)
        self.fc1, self.act, self.fc2 = fc1, act, fc2

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class StreamBlock(nn.Module):
    """One stream's weights in a joint block (SAI's `DismantledBlock`): adaLN-Zero modulation, attention, MLP.

    `pre_only` (the last block's text stream): modulation (shift, scale) only, no projection, no MLP. `self_attn`
    (MMDiT-X image streams): a second attention `attn2` and 9 modulation vectors instead of 6.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, pre_only: bool, self_attn: bool = False):
        super().__init__()
        if pre_only and self_attn:
            raise ValueError("a pre_only stream (the last text stream) has no second attention")
        self.pre_only, self.self_attn = pre_only, self_attn
        self.multiplier = 2 if pre_only else 9 if self_attn else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, self.multiplier * hidden_size))
        self.attn = SelfAttention(hidden_size, num_heads, pre_only)
        if self_attn:
            self.attn2 = SelfAttention(hidden_size, num_heads)
        if not pre_only:
            self.mlp = Mlp(hidden_size, mlp_ratio)

    def modulation(self, c: Tensor) -> list[ModulationOut]:
        """c (B, hidden) -> [attention, MLP, second attention] modulations, as many as the stream has, each
        (B, 1, hidden).
        The pre_only stream's one modulation has no gate."""
        chunks = self.adaLN_modulation(c)[:, None, :].chunk(self.multiplier, dim=-1)
        if self.pre_only:
            return [ModulationOut(chunks[0], chunks[1], None)]
        return [ModulationOut(*chunks[i : i + 3]) for i in range(0, self.multiplier, 3)]

    def post(self, x: Tensor, a: Tensor, mods: list[ModulationOut], extra: Tensor | None = None) -> Tensor | None:
        """The stream after attention (None for a pre_only stream: it ends here)."""
        return None if self.pre_only else post_attention(x, a, mods[0], mods[1], self.attn, self.mlp, extra)


class JointBlock(nn.Module):
    """Image (`x_block`) and text (`context_block`) weights, one attention over [image; text]; optionally concepts."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        pre_only: bool = False,
        self_attn: bool = False,
        manual_attention: bool = False,
    ):
        super().__init__()
        self.manual_attention = manual_attention
        self.context_block = StreamBlock(hidden_size, num_heads, mlp_ratio, pre_only)
        self.x_block = StreamBlock(hidden_size, num_heads, mlp_ratio, False, self_attn)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        c: Tensor,
        concepts: Tensor | None = None,
        concept_c: Tensor | None = None,
        target: str = "concepts+image",
        spaces: tuple[str, ...] = (),
        normalize: bool = False,
        image_vectors: str = "prompt",
        vectors: bool = False,
    ) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor | None, ConceptSaliency | None]:
        """x (B, N, hidden) image tokens, context (B, T, hidden) text tokens, c (B, hidden) conditioning vector.

        Returns the image and text tokens (text None after the last block). With `concepts` (B, C, hidden) and their
        conditioning vector `concept_c` (B, hidden), also the updated concepts (None after the last block) and, when
        `spaces` is not empty, their `ConceptSaliency` (an `SD3Saliency` with the vectors when `vectors`).
        `image_vectors`: "prompt" (o_x = the image rows of the joint attention) or "concepts" (the image rows of a
        second attention over [image; concepts], the official SD3 code's).
        """
        if image_vectors not in ("prompt", "concepts"):
            raise ValueError(f"image_vectors must be 'prompt' or 'concepts', got {image_vectors!r}")
        N = x.shape[1]
        x_mods = self.x_block.modulation(c)
        t_mods = self.context_block.modulation(c)

        # joint attention over [image; text], exactly as without concepts
        x_q, x_k, x_v = pre_attention(x, x_mods[0], self.x_block.attn)  # (B, H, N, D)
        t_q, t_k, t_v = pre_attention(context, t_mods[0], self.context_block.attn)  # (B, H, T, D)
        a = attention(
            torch.cat((x_q, t_q), dim=2), torch.cat((x_k, t_k), dim=2), torch.cat((x_v, t_v), dim=2),
            manual=self.manual_attention,
        )  # fmt: skip  # (B, N+T, H*D)
        x_a, t_a = a[:, :N], a[:, N:]
        extra = None
        if self.x_block.self_attn:  # MMDiT-X: image-only attention, its own modulation, one more gated residual
            a2 = attention(*pre_attention(x, x_mods[2], self.x_block.attn2), manual=self.manual_attention)
            extra = x_mods[2].gate * self.x_block.attn2.proj(a2)
        x_out = self.x_block.post(x, x_a, x_mods, extra)
        context_out = self.context_block.post(context, t_a, t_mods)
        if concepts is None:
            return x_out, context_out

        # concept stream: the text weights, concept queries against [concepts; image]
        if concept_c is None:
            raise ValueError("concepts need their conditioning vector `concept_c`")
        c_mods = self.context_block.modulation(concept_c)
        c_q, c_k, c_v = pre_attention(concepts, c_mods[0], self.context_block.attn)  # (B, H, C, D)
        o_c, weights = concept_attention(c_q, c_k, c_v, x_k, x_v, target)  # (B, H, C, D), (B, H, C, C+N)
        o_c = rearrange(o_c, "B H C D -> B C (H D)")
        saliency = None
        if spaces:
            o_x = x_a
            if image_vectors == "concepts" and ("output" in spaces or vectors):  # image queries vs [image; concepts]
                B = x_q.shape[0]
                o_x = attention(x_q, torch.cat((x_k, c_k.expand(B, -1, -1, -1)), dim=2),
                                torch.cat((x_v, c_v.expand(B, -1, -1, -1)), dim=2),
                                manual=self.manual_attention)  # fmt: skip  # (B, N, H*D)
            saliency = concept_saliency(spaces, o_c, o_x, weights, c_v, x_v, c_k, x_q, normalize)
            if vectors:
                saliency = SD3Saliency(**vars(saliency), concept_vectors=o_c, image_vectors=o_x)
        concepts_out = self.context_block.post(concepts, o_c, c_mods)
        return x_out, context_out, concepts_out, saliency
