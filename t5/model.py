"""The T5 v1.1 encoder: FLUX.1's `text_encoder_2` (google/t5-v1_1-xxl), the source of the text tokens [B, 256, 4096].

Follows transformers' `T5EncoderModel` (modeling_t5.py: `T5Stack`, `T5Block`, `T5Attention`, `T5LayerNorm`,
`T5DenseGatedActDense`); parameter names and shapes equal the checkpoint's (`shared.weight`,
`encoder.block.{i}.layer.{0,1}...`, `encoder.final_layer_norm.weight`). Differs in:
- encoder only and v1.1 only: gated-GELU feed-forward, no dropout, no decoder, no cache;
- no `encoder.embed_tokens`: the checkpoint stores the embedding once, as `shared.weight` (transformers ties
  `encoder.embed_tokens` to it). Here `T5Encoder` looks the ids up in `shared` and hands the embeddings to the stack, so
  one tensor has one name and `load_state_dict(strict=True)` takes the file as it is;
- float16 is refused with a clear error instead of clamping: T5 v1.1's feed-forward outputs overflow float16 (NaNs,
  diffusers #8604); run it in bfloat16 or float32;
- ids outside the vocabulary raise a ValueError naming the id (the embedding lookup would fail with no id, or with a
  device-side assert on GPU).

The maths (FLUX.1 checkpoint notes, section 4.3): no sqrt(d_model) scaling of the embeddings; RMS norm computed in
float32 with no mean and no bias; attention scores are NOT divided by sqrt(d_kv) (T5 folds that into its init); the
relative position bias is computed once from block 0's table and added in every layer; no attention mask by default
(Flux runs T5 over the padding tokens too). Attention runs through `scaled_dot_product_attention` with the position bias
(plus any padding bias) as its float mask and `scale=1.0`; `manual_attention=True` writes the L x L scores out instead
(readable; that attention costs about twice SDPA's on the CPU), as `mmdit` does. Shape letters: B batch, L tokens,
H heads, D head dim.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["CONFIGS", "T5Config", "T5Encoder", "relative_position_bucket", "rms_norm"]


@dataclass(frozen=True)
class T5Config:
    """transformers' `T5Config` field names, restricted to what the v1.1 encoder uses."""

    vocab_size: int
    d_model: int
    d_kv: int  # head dim; inner attention width = num_heads * d_kv
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    manual_attention: bool = False  # no parameters: SDPA, or the readable manual attention

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_layers < 0:  # 0: word embeddings and the final norm only, no token sees another
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")
        buckets = self.relative_attention_num_buckets
        if buckets < 4 or buckets % 4:
            # Half the buckets per direction, and half of those for exact small distances.
            raise ValueError(f"relative_attention_num_buckets must be a positive multiple of 4, got {buckets}")
        if self.relative_attention_max_distance <= buckets // 4:
            raise ValueError(
                f"relative_attention_max_distance ({self.relative_attention_max_distance}) must exceed the largest "
                f"exactly bucketed distance, relative_attention_num_buckets // 4 = {buckets // 4}"
            )
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}")


CONFIGS: dict[str, T5Config] = {
    # google/t5-v1_1-xxl, as in FLUX.1-schnell's text_encoder_2/config.json
    "t5-v1_1-xxl": T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
    ),
    # for tests and small experiments
    "tiny": T5Config(
        vocab_size=512,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
    ),
}


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """T5's layer norm: divide by the root mean square (in float32; no mean, no bias), then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(weight.dtype)


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bucket of each key - query distance, bidirectional (encoder) version.

    Half the buckets are for keys after the query. In each half, distances below num_buckets // 4 get a bucket each,
    larger ones share logarithmically wider buckets up to max_distance, and everything beyond lands in the last one.
    """
    half = num_buckets // 2
    exact = half // 2
    bucket = (relative_position > 0).long() * half
    distance = relative_position.abs()
    # log-spaced buckets; float32 maths and truncation toward zero as in the reference (log(0) is masked below)
    log_ratio = torch.log(distance.float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, far)


def padding_bias(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, L] mask (1 = token, 0 = padding) -> additive bias [B, 1, 1, L] that hides the padded keys."""
    keep = rearrange(attention_mask, "B L -> B 1 1 L").to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def check_token_ids(input_ids: Tensor, vocab_size: int) -> None:
    if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer tensor [B, L], got {input_ids.dtype} {tuple(input_ids.shape)}")
    outside = input_ids[(input_ids < 0) | (input_ids >= vocab_size)]
    if outside.numel():
        raise ValueError(
            f"token id {outside[0].item()} is outside the vocabulary of {vocab_size} ids [0, {vocab_size})"
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Multi-head self-attention without biases and without score scaling; block 0 also owns the position bias table."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.manual_attention = config.manual_attention
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.num_heads)

    def position_bias(self, length: int) -> Tensor:
        """Learned bias of each (query, key) pair from its bucketed distance: (1, H, L, L)."""
        position = torch.arange(length, device=self.relative_attention_bias.weight.device)
        distance = position[None, :] - position[:, None]  # (L, L), key - query
        buckets = relative_position_bucket(distance, self.num_buckets, self.max_distance)
        return rearrange(self.relative_attention_bias(buckets), "Lq Lk H -> 1 H Lq Lk")

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        q = rearrange(self.q(x), "B L (H D) -> B H L D", H=self.num_heads)
        k = rearrange(self.k(x), "B L (H D) -> B H L D", H=self.num_heads)
        v = rearrange(self.v(x), "B L (H D) -> B H L D", H=self.num_heads)
        if self.manual_attention:
            scores = q @ k.transpose(-1, -2) + bias  # (B, H, L, L); no 1/sqrt(D)
            out = scores.float().softmax(dim=-1).to(v.dtype) @ v  # (B, H, L, D)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # the bias is a float mask
        return self.o(rearrange(out, "B H L D -> B L (H D)"))


class GatedFeedForward(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x): T5 v1.1's gated-GELU feed-forward (transformers' `DenseReluDense`)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class AttentionSublayer(nn.Module):
    """Parameter holder named like the checkpoint: encoder.block.{i}.layer.0."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = Attention(config, has_relative_attention_bias)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)


class FeedForwardSublayer(nn.Module):
    """Parameter holder named like the checkpoint: encoder.block.{i}.layer.1."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = GatedFeedForward(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)


class Block(nn.Module):
    """Pre-norm residual block: attention, then the gated feed-forward."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList(
            [AttentionSublayer(config, has_relative_attention_bias), FeedForwardSublayer(config)]
        )

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        attn, ff = self.layer
        h = h + attn.SelfAttention(attn.layer_norm(h), bias)  # (B, L, d_model)
        h = h + ff.DenseReluDense(ff.layer_norm(h))
        return h


class Stack(nn.Module):
    """The encoder stack (transformers' `T5Stack`), fed with token embeddings."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.block = nn.ModuleList(
            [Block(config, has_relative_attention_bias=i == 0) for i in range(config.num_layers)]
        )
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, h: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if not self.block:  # no layers: each token is its own embedding, normalised
            return self.final_layer_norm(h)
        bias = self.block[0].layer[0].SelfAttention.position_bias(h.shape[1]).to(h.dtype)  # (1, H, L, L)
        if attention_mask is not None:
            bias = bias + padding_bias(attention_mask, h.dtype)  # (B, H, L, L)
        for block in self.block:
            h = block(h, bias)
        return self.final_layer_norm(h)


class T5Encoder(nn.Module):
    """T5 v1.1 encoder: ids [B, L] -> last hidden state [B, L, d_model] (transformers' `last_hidden_state`)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """`attention_mask` [B, L] (1 = token, 0 = padding) hides padded keys; Flux passes none."""
        if self.shared.weight.dtype == torch.float16:
            raise ValueError(
                "T5Encoder refuses float16: T5 v1.1's feed-forward activations overflow float16 and turn into NaNs; "
                "use torch.bfloat16 or torch.float32 for the text encoder"
            )
        check_token_ids(input_ids, self.config.vocab_size)
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        h = self.shared(input_ids)  # (B, L, d_model); no sqrt(d_model) scaling
        return self.encoder(h, attention_mask)
