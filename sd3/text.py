"""SD3's prompt conditioning: CLIP-L, OpenCLIP bigG and T5-XXL assembled into the joint-attention tokens and the
pooled vector the MM-DiT takes.

Follows diffusers' `StableDiffusion3Pipeline.encode_prompt` (with `_get_clip_prompt_embeds` and
`_get_t5_prompt_embeds`), which follows Stability AI's sd3.5 `sd3_impls.py`:
- each CLIP: 77 ids (BOS + at most 75 pieces + EOS, padded: CLIP-L with EOS, bigG with "!"), its penultimate hidden
  state (`hidden_states[-2]`) and its pooled output through `text_projection`;
- the two hidden states concatenated on channels (768 + 1280 = 2048) and zero-padded to T5's width (4096);
- T5's `max_length` (256) tokens appended along the sequence; without T5, zeros of [B, max_length, width];
- pooled = the two projected pooled vectors concatenated (768 + 1280 = 2048);
- classifier-free guidance: the negative prompt ("" unless given) encoded the same way.
Differs in: the encoders are this project's (`clip.CLIPTextEncoder` by config, `t5.T5Encoder`), held in one small
dataclass; one text goes to all three encoders (no `prompt_2` / `prompt_3`); no `num_images_per_prompt`, `clip_skip`,
LoRA scale or precomputed embeddings; the output takes CLIP-L's dtype and device (diffusers promotes mixed dtypes).

Notable features: `clip_tokens` gives the per-token CLIP states of any text in the prompt's layout, and `encode_t5`
T5's, so that concepts can be encoded as the official SD3 code (the two CLIPs) or as the Flux path (T5) does.

Shape letters: B batch, T text tokens (77 + max_length), W joint width (4096).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from clip import CLIPTextEncoder, CLIPTokenizer
from t5 import T5Encoder, T5Tokenizer

__all__ = ["CLIP_LENGTH", "SD3TextEncoders"]

CLIP_LENGTH = 77  # ids per CLIP text (the tokenizers' model_max_length, CLIP's positions)


def as_list(texts: str | list[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def run(module: torch.nn.Module, ids: Tensor, **options):
    """A text encoder on its own device."""
    return module(ids.to(next(module.parameters()).device), **options)


@dataclass
class SD3TextEncoders:
    """SD3's three text encoders and their tokenizers; T5 may be absent (diffusers' `text_encoder_3=None`)."""

    clip_l: CLIPTextEncoder  # text_encoder/: CLIP-L with projection
    clip_l_tokenizer: CLIPTokenizer  # tokenizer/
    clip_g: CLIPTextEncoder  # text_encoder_2/: OpenCLIP bigG with projection
    clip_g_tokenizer: CLIPTokenizer  # tokenizer_2/ (pads with "!")
    t5: T5Encoder | None = None  # text_encoder_3/
    t5_tokenizer: T5Tokenizer | None = None  # tokenizer_3/
    max_length: int = 256  # T5 tokens (diffusers' max_sequence_length)
    width: int = 4096  # the joint attention width: T5's d_model, and the width of the zeros standing in for T5

    def __post_init__(self):
        for name in ("clip_l", "clip_g"):
            if getattr(self, name).text_projection is None:
                raise ValueError(f"{name} has no text_projection; SD3's CLIPs are CLIPTextModelWithProjection")
        if (self.t5 is None) != (self.t5_tokenizer is None):
            raise ValueError("t5 and t5_tokenizer come together (both, or neither for SD3 without T5)")
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")
        clip_width = self.clip_l.config.hidden_size + self.clip_g.config.hidden_size
        if clip_width > self.width:
            raise ValueError(f"the two CLIPs' {clip_width} channels do not fit the joint width {self.width}")
        if self.t5 is not None and self.t5.config.d_model != self.width:
            raise ValueError(f"T5's d_model {self.t5.config.d_model} differs from the joint width {self.width}")

    def encode_clip(self, texts: str | list[str]) -> tuple[Tensor, Tensor]:
        """Tokens [B, 77, W]: both CLIPs' penultimate states side by side, zero-padded; pooled [B, Pl + Pg]."""
        texts = as_list(texts)
        hidden_l, pooled_l = run(self.clip_l, self.clip_l_tokenizer(texts, CLIP_LENGTH), penultimate=True)
        hidden_g, pooled_g = run(self.clip_g, self.clip_g_tokenizer(texts, CLIP_LENGTH), penultimate=True)
        hidden_g, pooled_g = hidden_g.to(hidden_l), pooled_g.to(pooled_l)
        hidden = torch.cat([hidden_l, hidden_g], dim=-1)  # (B, 77, Dl + Dg)
        tokens = F.pad(hidden, (0, self.width - hidden.shape[-1]))  # (B, 77, W)
        return tokens, torch.cat([pooled_l, pooled_g], dim=-1)  # (B, Pl + Pg)

    def clip_tokens(self, texts: str | list[str]) -> Tensor:
        """The per-token CLIP states [B, 77, W] of each text as a prompt has them (BOS at 0, then its pieces: the
        CLIP tokenizers' `encode` says how many), for picking concept tokens."""
        return self.encode_clip(texts)[0]

    def encode_t5(self, texts: str | list[str]) -> Tensor:
        """T5's last hidden state [B, max_length, W] (pieces + EOS, padded with <pad>, no mask), or zeros without T5."""
        texts = as_list(texts)
        if self.t5 is None:
            parameter = next(self.clip_l.parameters())
            return torch.zeros(len(texts), self.max_length, self.width, device=parameter.device, dtype=parameter.dtype)
        return run(self.t5, self.t5_tokenizer(texts, self.max_length))

    def encode_prompt(self, prompt: str | list[str]) -> tuple[Tensor, Tensor]:
        """Tokens [B, 77 + max_length, W] (CLIP part, then T5 part) and pooled [B, Pl + Pg] (2048 for SD3.5)."""
        clip_part, pooled = self.encode_clip(prompt)  # (B, 77, W), (B, Pl + Pg)
        t5_part = self.encode_t5(prompt).to(clip_part)  # (B, max_length, W)
        return torch.cat([clip_part, t5_part], dim=1), pooled  # (B, T, W)

    def encode_prompt_and_negative(
        self, prompt: str | list[str], negative_prompt: str | list[str] = ""
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For classifier-free guidance, in diffusers' order: (tokens, negative tokens, pooled, negative pooled). A
        single negative prompt serves every prompt of the batch; a list must have one per prompt."""
        prompts = as_list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one each")
        tokens, pooled = self.encode_prompt(prompts)
        negative_tokens, negative_pooled = self.encode_prompt(negatives)
        return tokens, negative_tokens, pooled, negative_pooled
