"""The pure maths of the Flux MM-DiT, as small free functions a reader can test alone.

Follows black-forest-labs/flux `src/flux/math.py` and the embedding helpers of `modules/layers.py`; differs in:
- `apply_rope` rotates one tensor (q or k) at a time, so the block can rotate the concept tokens with their own
  positions while reusing the already rotated image keys;
- `attention` takes rotated q, k (RoPE is applied by the caller) and has a readable manual path next to SDPA;
- `concept_attention` is new: ConceptAttention's second attention, for C concept query rows only, computed explicitly
  (scores are C x (C + N) per head; no N x N matrix), so its softmax weights are available as a saliency space.

Notable features: RoPE angles and rotations in float32 whatever the model dtype (bf16 positions lose integers above
256); the timestep embedding in float32, cast to the input dtype.

Shape letters: B batch, H heads, L sequence, D head dim, N image tokens, C concepts.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

TARGETS = ("concepts+image", "image", "concepts", "none")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by `time_factor`): [cos | sin] with dim/2 frequencies each."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)  # cos first, then sin
    if dim % 2:
        emb = torch.cat((emb, torch.zeros_like(emb[:, :1])), dim=-1)
    return emb.to(t.dtype) if t.is_floating_point() else emb


def rope(pos: Tensor, dim: int, theta: float) -> Tensor:
    """Rotation matrices for one position axis: pos (B, L) -> (B, L, dim/2, 2, 2), float32.

    Pair j turns by the angle pos * theta^(-2j/dim); each 2 x 2 block is [[cos, -sin], [sin, cos]].
    """
    if dim % 2:
        raise ValueError(f"rope needs an even number of dimensions per axis, got {dim}")
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim)  # (dim/2,)
    angle = pos.float()[..., None] * omega  # (B, L, dim/2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return rearrange(torch.stack((cos, -sin, sin, cos), dim=-1), "B L P (i j) -> B L P i j", i=2)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2p], x[2p+1]) of x (B, H, L, D) by pe (B, 1, L, D/2, 2, 2), in float32."""
    pairs = rearrange(x.float(), "B H L (P two) -> B H L P two", two=2)
    # out[2p] = cos * x[2p] - sin * x[2p+1];  out[2p+1] = sin * x[2p] + cos * x[2p+1]
    out = pe[..., 0] * pairs[..., 0:1] + pe[..., 1] * pairs[..., 1:2]  # (B, H, L, P, 2)
    return rearrange(out, "B H L P two -> B H L (P two)").to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, manual: bool = False, mask: Tensor | None = None) -> Tensor:
    """Softmax attention of rotated q, k (B, H, L, D) over v; returns (B, L, H*D). Scale 1/sqrt(D).

    `manual=True` writes the L x L weights out (readable, slow, memory L^2); the default calls SDPA. `mask` (B, 1, L, L)
    bool, True where a query may attend to a key, is for training experiments (Flux itself never masks); every query
    must keep at least one key.
    """
    if manual:
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, L, L)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        x = scores.float().softmax(dim=-1).to(v.dtype) @ v  # (B, H, L, D)
    else:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return rearrange(x, "B H L D -> B L (H D)")


def concept_attention(
    q_c: Tensor, k_c: Tensor, v_c: Tensor, k_x: Tensor, v_x: Tensor, target: str = "concepts+image"
) -> tuple[Tensor, Tensor]:
    """ConceptAttention's concept rows: C queries against concept keys and image keys, computed explicitly.

    q_c, k_c, v_c: (B, H, C, D) rotated concept q, k and v; k_x, v_x: (B, H, N, D) rotated image keys and values.
    `target` picks what the concepts attend to: "concepts+image" (the method), "image", "concepts", or "none"
    (o_c = v_c), the paper's Table 4 ablation. Returns o_c (B, H, C, D) and the softmax weights of the concept rows
    over [concepts; image] keys (B, H, C, C + N) in float32, whatever the target.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    C = q_c.shape[2]
    scale = q_c.shape[-1] ** -0.5
    scores = torch.cat((q_c @ k_c.transpose(-2, -1), q_c @ k_x.transpose(-2, -1)), dim=-1) * scale  # (B, H, C, C+N)
    weights = scores.float().softmax(dim=-1)
    if target == "concepts+image":
        w = weights.to(v_c.dtype)
        o_c = w[..., :C] @ v_c + w[..., C:] @ v_x
    elif target == "image":
        o_c = scores[..., C:].float().softmax(dim=-1).to(v_x.dtype) @ v_x
    elif target == "concepts":
        o_c = scores[..., :C].float().softmax(dim=-1).to(v_c.dtype) @ v_c
    else:
        o_c = v_c
    return o_c, weights


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """x / rms(x) over the last dimension in float32, cast back to x's dtype, then times the learnt `weight`."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight


def modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """adaLN: (1 + scale) * LayerNorm(x) + shift, with a parameter-free LayerNorm over the last dimension."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=eps) + shift


def linear_normalization(x: Tensor, dim: int) -> Tensor:
    """(x - min) / sum(x - min) along `dim` (a zero sum divides by 1): the official evaluation's normalisation."""
    shifted = x - x.amin(dim=dim, keepdim=True)
    total = shifted.sum(dim=dim, keepdim=True)
    return shifted / torch.where(total == 0, torch.ones_like(total), total)
