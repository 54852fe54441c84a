"""The CLIP text encoder, by config: FLUX.1's CLIP-L (`text_encoder`, for its pooled vector [B, 768]) and SD3's two
(`text_encoder`: CLIP-L with a projection, `text_encoder_2`: OpenCLIP bigG), for their penultimate hidden states and
projected pooled vectors.

Follows transformers' `CLIPTextModel` and `CLIPTextModelWithProjection` (modeling_clip.py: `CLIPTextTransformer`,
`CLIPEncoderLayer`, `CLIPAttention`, `CLIPMLP`); parameter names and shapes equal the checkpoint's, which keep the
`text_model.` prefix (`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.{i}.self_attn.q_proj
.weight`, ..., and `text_projection.weight` when there is a projection). Differs in:
- one flat forward over plain parameter containers; returns (hidden state, pooled) and nothing else: the last hidden
  state, or with `penultimate=True` transformers' `hidden_states[-2]` (the output of the second-to-last layer, no final
  LayerNorm: what SDXL and SD3 condition on); pooled is projected when the config has a projection (transformers'
  `text_embeds`), else it is transformers' `pooler_output`;
- positions are `arange(L)`, so there is no `position_ids` buffer at all. Old saves that still carry
  `text_model.embeddings.position_ids` must drop it before `load_state_dict(strict=True)`: see `LEGACY_KEYS`;
- ids outside the vocabulary raise a ValueError naming the id.

The maths (FLUX.1 checkpoint notes, section 5.3): token + learned position embeddings; pre-LayerNorm blocks with causal
multi-head attention (scores scaled by D^-0.5) and an MLP (quick-GELU for OpenAI's CLIP-L, exact GELU for OpenCLIP
bigG: `hidden_act`); a final LayerNorm; the pooled output is the final hidden state at the position of the largest id
in each row, times `text_projection` (no bias) when there is one.

Where EOS is: transformers pools at the argmax of the ids when the config's `eos_token_id` is 2 (the legacy value that
FLUX.1's CLIP-L config and SDXL's bigG config carry), else at the first position of `eos_token_id`. The largest id in
CLIP's vocabulary is `<|endoftext|>` (49407) and argmax returns its first occurrence, so with tokenizer output both
rules pick the first EOS, whatever the padding (EOS for CLIP-L, "!" = id 0 for bigG); this module uses the argmax.

Notable features: one module for every size (`CONFIGS`: "clip-vit-large-patch14", "clip-l-projection", "clip-g",
"tiny", "tiny-g"); no `if` on the family, only `hidden_act` and `projection_dim`.

Shape letters: B batch, L tokens, H heads, D head dim.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "CONFIGS", "LEGACY_KEYS", "CLIPTextConfig", "CLIPTextEncoder", "quick_gelu"]

# Buffers that older checkpoints store but that are no parameters here; a loader drops them if present.
LEGACY_KEYS = ("text_model.embeddings.position_ids",)


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


# transformers' ACT2FN names: OpenAI's CLIP-L was trained with quick-GELU, OpenCLIP bigG with the exact (erf) GELU
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


@dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' `CLIPTextConfig` field names, restricted to what the text encoder uses.

    `projection_dim` None: no `text_projection` (transformers' `CLIPTextModel`, FLUX.1's CLIP-L); a width: pooled is
    projected to it (`CLIPTextModelWithProjection`, both of SD3's CLIPs). transformers' config.json always carries a
    `projection_dim`; whether the model has a projection is said by the checkpoint's tensors (see the loader)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    layer_norm_eps: float
    hidden_act: str = "quick_gelu"  # a key of ACTIVATIONS
    projection_dim: int | None = None

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_hidden_layers < 0:
            raise ValueError(f"num_hidden_layers must be >= 0, got {self.num_hidden_layers}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.projection_dim is not None and self.projection_dim <= 0:
            raise ValueError(f"projection_dim must be positive or None (no projection), got {self.projection_dim}")


CONFIGS: dict[str, CLIPTextConfig] = {
    # openai/clip-vit-large-patch14 text tower, as in FLUX.1-schnell's text_encoder/config.json
    "clip-vit-large-patch14": CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
    ),
    # SD3's text_encoder: the same CLIP-L as a CLIPTextModelWithProjection (its config.json: projection_dim 768)
    "clip-l-projection": CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        projection_dim=768,
    ),
    # SD3's (and SDXL's) text_encoder_2: OpenCLIP ViT-bigG-14's text tower as a CLIPTextModelWithProjection
    "clip-g": CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        projection_dim=1280,
    ),
    # for tests and small experiments
    "tiny": CLIPTextConfig(
        vocab_size=1024,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
    ),
    # bigG-like: exact GELU and a projection (to a different width, so that a transposed projection shows)
    "tiny-g": CLIPTextConfig(
        vocab_size=1024,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        projection_dim=40,
    ),
}


def check_token_ids(input_ids: Tensor, vocab_size: int) -> None:
    if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer tensor [B, L], got {input_ids.dtype} {tuple(input_ids.shape)}")
    outside = input_ids[(input_ids < 0) | (input_ids >= vocab_size)]
    if outside.numel():
        raise ValueError(
            f"token id {outside[0].item()} is outside the vocabulary of {vocab_size} ids [0, {vocab_size})"
        )


class Attention(nn.Module):
    """Causal multi-head self-attention with biased projections."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        q = rearrange(self.q_proj(x), "B L (H D) -> B H L D", H=self.num_heads)
        k = rearrange(self.k_proj(x), "B L (H D) -> B H L D", H=self.num_heads)
        v = rearrange(self.v_proj(x), "B L (H D) -> B H L D", H=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scaled by D^-0.5; token i sees 0..i
        return self.out_proj(rearrange(out, "B H L D -> B L (H D)"))


class MLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: causal attention, then the MLP."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # (B, L, hidden)
        x = x + self.mlp(self.layer_norm2(x))
        return x


class Embeddings(nn.Module):
    """Parameter holder named like the checkpoint: text_model.embeddings."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)


class Encoder(nn.Module):
    """Parameter holder named like the checkpoint: text_model.encoder."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.num_hidden_layers)])


class TextModel(nn.Module):
    """Parameter holder named like the checkpoint: text_model (transformers' `CLIPTextTransformer`)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextEncoder(nn.Module):
    """CLIP text encoder: ids [B, L] (L <= 77) -> (hidden state [B, L, hidden], pooled [B, projection or hidden])."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = TextModel(config)
        self.text_projection = (
            None if config.projection_dim is None else nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        )

    def forward(self, input_ids: Tensor, penultimate: bool = False) -> tuple[Tensor, Tensor]:
        """(last hidden state, or with `penultimate` the second-to-last layer's output; pooled at the first EOS)."""
        check_token_ids(input_ids, self.config.vocab_size)
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(f"{L} tokens exceed the {self.config.max_position_embeddings} positions CLIP has")
        if penultimate and self.config.num_hidden_layers < 1:
            raise ValueError("penultimate needs at least one layer (it is the input of the last one)")
        model = self.text_model
        x = (
            model.embeddings.token_embedding(input_ids) + model.embeddings.position_embedding.weight[:L]
        )  # (B, L, hidden)
        before_last = x
        for layer in model.encoder.layers:
            before_last, x = x, layer(x)  # before_last: transformers' hidden_states[-2]
        x = model.final_layer_norm(x)
        pooled = x[torch.arange(B, device=x.device), input_ids.argmax(dim=-1)]  # (B, hidden), at the first EOS
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)  # (B, projection_dim)
        return (before_last if penultimate else x), pooled
