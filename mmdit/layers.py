"""The blocks of the Flux MM-DiT, with ConceptAttention's concept stream inside the double-stream block.

Follows black-forest-labs/flux `src/flux/modules/layers.py` (module and parameter names equal the checkpoint's, so
`flux1-schnell.safetensors` loads with strict=True); differs in:
- `DoubleStreamBlock.forward` optionally carries a concept stream (ConceptAttention, Helbling et al. 2025): concept
  tokens reuse every `txt_*` weight, attend to [concepts; image] (never to the prompt) and are updated like text.
  The image and text paths do not see the concepts, so they are computed exactly as without them;
- the text, image and concept streams share two small free functions, `pre_attention` and `post_attention`
  (SD3.5's split), so no block code is duplicated for the concepts;
- the block hands back, when asked, the saliency spaces of the method as a `ConceptSaliency` (no hooks, no globals);
- LayerNorms are the parameter-free `modulate` function instead of modules (they hold no weights);
- a manual attention path next to SDPA (`manual_attention`).

Notable features: QK RMSNorm in float32 then cast; RoPE in float32; saliency maps in float32 whatever the model dtype;
the concept attention is C x (C + N) per head, and no [N, hidden] tensor outlives the layer.

Shape letters: B batch, H heads, L sequence, D head dim, T text tokens, N image tokens, C concepts.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from .math import apply_rope, attention, concept_attention, linear_normalization, modulate, rms_norm, rope

SPACES = ("output", "attention", "value", "cross_attention")


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, for the timestep, guidance and pooled-text vectors."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS normalisation over the head dimension, in float32, cast back before the learnt `scale`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale, self.eps)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


@dataclass
class ModulationOut:
    shift: Tensor  # (B, 1, hidden)
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """adaLN parameters from the conditioning vector: 2 x (shift, scale, gate) when `double`, else 1 x."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # each (B, 1, hidden)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


class SelfAttention(nn.Module):
    """The weights of one stream's attention: fused qkv, QK RMSNorm, output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, hidden) -> q, k, v (B, H, L, D), q and k RMS-normed, not rotated."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


def feed_forward(hidden_size: int, mlp_ratio: float) -> nn.Sequential:
    """Linear -> GELU (tanh) -> Linear; the checkpoint names its two linears `0` and `2`."""
    mlp_hidden = int(hidden_size * mlp_ratio)
    return nn.Sequential(
        nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden_size)
    )


def pre_attention(x: Tensor, mod: ModulationOut, attn: SelfAttention) -> tuple[Tensor, Tensor, Tensor]:
    """One stream before attention: adaLN, then q, k, v heads (B, H, L, D)."""
    return attn.heads(modulate(x, mod.shift, mod.scale))


def post_attention(
    x: Tensor,
    a: Tensor,
    mod1: ModulationOut,
    mod2: ModulationOut,
    attn: SelfAttention,
    mlp: nn.Module,
    extra: Tensor | None = None,
) -> Tensor:
    """One stream after attention: gated residual of the projected attention output a (B, L, H*D), then of the MLP.
    `extra` (B, L, hidden), a further gated residual added before the MLP (SD3.5 Medium's second image attention)."""
    x = x + mod1.gate * attn.proj(a)
    if extra is not None:
        x = x + extra
    return x + mod2.gate * mlp(modulate(x, mod2.shift, mod2.scale))


@dataclass
class ConceptSaliency:
    """One double block's concept-vs-image scores, in float32; a field is None unless its space was requested."""

    output: Tensor | None = None  # (B, C, N)  o_c . o_x, before the output projection, heads concatenated
    attention: Tensor | None = None  # (B, H, C, N)  softmax(q_c [k_c; k_x]^T / sqrt(D)), image columns
    value: Tensor | None = None  # (B, H, C, N)  v_c . v_x per head (their sum over heads: heads concatenated)
    cross_attention: Tensor | None = None  # (B, H, C, N)  k_c . q_x per head, post-QK-norm, pre-RoPE, unscaled

    def row(self, index: int) -> "ConceptSaliency":
        """Batch row `index` of every space, kept as a batch of one (under classifier-free guidance, the batch is
        [unconditional; conditional]: 0 is the unconditional half, 1 the conditional)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # subclasses' fields too
        return type(self)(**{k: None if v is None else v[index : index + 1] for k, v in values.items()})


def concept_saliency(
    spaces: tuple[str, ...],
    o_c: Tensor,
    o_x: Tensor,
    weights: Tensor,
    v_c: Tensor,
    v_x: Tensor,
    k_c: Tensor,
    q_x: Tensor,
    normalize: bool = False,
) -> ConceptSaliency:
    """The requested saliency spaces from one block's tensors (shapes as in `DoubleStreamBlock.forward`).

    `normalize` applies the official evaluation's concept normalisation (per feature, across concepts) to o_c before
    the output-space dot product and to v_c before the value-space one, as the official output and value baselines do.
    """
    unknown = set(spaces) - set(SPACES)
    if unknown:
        raise ValueError(f"unknown saliency spaces {sorted(unknown)}; choose from {SPACES}")
    C = o_c.shape[1]
    out = ConceptSaliency()
    if "output" in spaces:
        o_c = linear_normalization(o_c.float(), dim=1) if normalize else o_c.float()
        out.output = einsum(o_c, o_x.float(), "B C HD, B N HD -> B C N")
    if "attention" in spaces:
        out.attention = weights[..., C:].float()
    if "value" in spaces:
        v_c = linear_normalization(v_c.float(), dim=2) if normalize else v_c.float()
        out.value = einsum(v_c, v_x.float(), "B H C D, B H N D -> B H C N")
    if "cross_attention" in spaces:
        out.cross_attention = einsum(k_c.float(), q_x.float(), "B H C D, B H N D -> B H C N")
    return out


class DoubleStreamBlock(nn.Module):
    """Separate image and text weights, one joint attention over [txt; img]; optionally a concept stream."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False, manual_attention: bool = False
    ):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.manual_attention = manual_attention
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.img_mlp = feed_forward(hidden_size, mlp_ratio)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.txt_mlp = feed_forward(hidden_size, mlp_ratio)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        vec: Tensor,
        pe: Tensor,
        concepts: Tensor | None = None,
        concept_vec: Tensor | None = None,
        concept_pe: Tensor | None = None,
        target: str = "concepts+image",
        spaces: tuple[str, ...] = (),
        normalize: bool = False,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, ConceptSaliency | None]:
        """img (B, N, hidden), txt (B, T, hidden), vec (B, hidden), pe (B, 1, T+N, D/2, 2, 2) for [txt; img].

        With `concepts` (B, C, hidden), their modulation vector `concept_vec` (B, hidden) and rotations `concept_pe`
        (B, 1, C, D/2, 2, 2), also returns the updated concepts and, when `spaces` is not empty, their saliency.
        """
        T = txt.shape[1]
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        # joint attention over [txt; img], exactly as without concepts
        img_q, img_k, img_v = pre_attention(img, img_mod1, self.img_attn)  # (B, H, N, D)
        txt_q, txt_k, txt_v = pre_attention(txt, txt_mod1, self.txt_attn)  # (B, H, T, D)
        q = apply_rope(torch.cat((txt_q, img_q), dim=2), pe)  # (B, H, T+N, D)
        k = apply_rope(torch.cat((txt_k, img_k), dim=2), pe)
        v = torch.cat((txt_v, img_v), dim=2)
        a = attention(q, k, v, manual=self.manual_attention, mask=attention_mask)  # (B, T+N, H*D)
        txt_a, img_a = a[:, :T], a[:, T:]

        img_out = post_attention(img, img_a, img_mod1, img_mod2, self.img_attn, self.img_mlp)
        txt_out = post_attention(txt, txt_a, txt_mod1, txt_mod2, self.txt_attn, self.txt_mlp)
        if concepts is None:
            return img_out, txt_out

        # concept stream: the text weights, concept queries against [concepts; image]
        if concept_vec is None or concept_pe is None:
            raise ValueError("concepts need their modulation vector `concept_vec` and rotations `concept_pe`")
        c_mod1, c_mod2 = self.txt_mod(concept_vec)
        c_q, c_k, c_v = pre_attention(concepts, c_mod1, self.txt_attn)  # (B, H, C, D)
        o_c, weights = concept_attention(
            apply_rope(c_q, concept_pe), apply_rope(c_k, concept_pe), c_v, k[:, :, T:], img_v, target
        )  # (B, H, C, D), (B, H, C, C+N)
        o_c = rearrange(o_c, "B H C D -> B C (H D)")
        saliency = concept_saliency(spaces, o_c, img_a, weights, c_v, img_v, c_k, img_q, normalize) if spaces else None
        concepts_out = post_attention(concepts, o_c, c_mod1, c_mod2, self.txt_attn, self.txt_mlp)
        return img_out, txt_out, concepts_out, saliency


class SingleStreamBlock(nn.Module):
    """One stream over [txt; img]: attention and MLP in parallel from one fused input projection (ViT-22B style)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, manual_attention: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.manual_attention = manual_attention
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden_dim)  # rows [q | k | v | mlp_in]
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)  # columns [attention | mlp]
        self.norm = QKNorm(hidden_size // num_heads)
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """x (B, T+N, hidden), vec (B, hidden), pe (B, 1, T+N, D/2, 2, 2), attention_mask (B, 1, T+N, T+N) or None."""
        mod, _ = self.modulation(vec)
        qkv, mlp_in = torch.split(
            self.linear1(modulate(x, mod.shift, mod.scale)), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1
        )
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        a = attention(apply_rope(q, pe), apply_rope(k, pe), v, self.manual_attention, attention_mask)  # (B, L, H*D)
        out = self.linear2(torch.cat((a, F.gelu(mlp_in, approximate="tanh")), dim=-1))
        return x + mod.gate * out


class LastLayer(nn.Module):
    """adaLN (shift, scale) from vec, then a linear map to the patch channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # each (B, hidden); BFL order: shift first
        return self.linear(modulate(x, shift[:, None, :], scale[:, None, :]))


class EmbedND(nn.Module):
    """RoPE rotations for positions with several axes: ids (B, L, n_axes) -> pe (B, 1, L, D/2, 2, 2), float32."""

    def __init__(self, dim: int, theta: float, axes_dim: tuple[int, ...]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"ids have {ids.shape[-1]} position axes, the model expects {len(self.axes_dim)}")
        pe = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return pe[:, None]  # (B, 1, L, D/2, 2, 2)
