"""ConceptAttention on Stable Diffusion 3.5: the SD3 family's answers to `concept_attention.ConceptPipeline`.

Follows diffusers' `StableDiffusion3Pipeline` for sampling (tested to give its image on tiny random weights): prompt
conditioning by `sd3.text` (CLIP-L + bigG + T5-XXL), seeded latents (B, 16, H/8, W/8), the flow-matching Euler
sampler with a static shift (3.0, from `scheduler/scheduler_config.json` when the snapshot has one), classifier-free
guidance when the scale is above 1 (the negative prompt is ""), the autoencoder's scale 1.5305 and shift 0.0609.
Differs in:
- concepts (T5-encoded, one at a time, as on Flux) travel through every joint block with the prompt's conditioning
  vector; under guidance they ride along both halves of the batch and the maps are the conditional half's;
- the defaults are the model cards': Large Turbo 4 steps without guidance, Large 28 steps at 3.5, Medium 40 at 4.5
  (Turbo is told apart from Large by the name of its repo or file: the two have the same tensors);
- `explain` runs one noised forward per sample without guidance, conditioned on the prompt ("" by default), and stops
  after the last block that reports.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

import imaging
from checks import check_device
from concept_attention import NATIVE_SIZE, ConceptPipeline, memory_mode
from mmdit import ConceptInput, ConceptSaliency
from sampling import flow_match_schedule, get_noise

from .model import SD3
from .text import SD3TextEncoders

SHIFT = 3.0  # SD3.5's scheduler_config.json
DEFAULTS = {"turbo": (4, 0.0), "large": (28, 3.5), "medium": (40, 4.5)}  # (steps, guidance) of the model cards


def variant(source: str, transformer: SD3) -> str:
    """ "medium" (MMDiT-X blocks), "turbo" (the name says so), else "large"."""
    if transformer.config.dual_attention_layers:
        return "medium"
    return "turbo" if "turbo" in Path(str(source)).name.lower() or "turbo" in str(source).lower() else "large"


def scheduler_shift(source: str | Path) -> float:
    """The static shift of a snapshot's scheduler/scheduler_config.json, else SD3.5's 3.0."""
    config = Path(source) / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return SHIFT
    try:
        shift = json.loads(config.read_text()).get("shift", SHIFT)
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{config} is not valid JSON ({error}); replace it with an intact copy") from None
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ValueError(f"{config}: shift must be a positive number, got {shift!r}")
    return float(shift)


class SD3Pipeline(ConceptPipeline):
    """SD3.5's MM-DiT, autoencoder and text encoders, with ConceptAttention maps from the same forwards."""

    family = "sd3"
    block_kind = "joint blocks"

    def __init__(self, transformer: SD3, autoencoder, text: SD3TextEncoders, device=None, dtype=None,
                 source: str = "custom", shift: float = SHIFT, memory: str = "full"):  # fmt: skip
        self.device = check_device(device)
        self.dtype = dtype or next(transformer.parameters()).dtype
        self.memory = memory_mode(memory, False)
        if self.memory != "full":
            raise ValueError(f"memory mode {memory!r} is not available for SD3.5 yet; use memory='full'")
        self.transformer, self.autoencoder, self.text = transformer.to(self.device), autoencoder.to(self.device), text
        for name in ("clip_l", "clip_g", "t5"):
            if getattr(text, name) is not None:
                setattr(text, name, getattr(text, name).to(self.device))
        if text.t5 is None:
            raise ValueError("ConceptAttention encodes concepts with T5: give the SD3 text encoders their T5")
        self.t5, self.t5_tokenizer, self.max_length = text.t5, text.t5_tokenizer, text.max_length
        self.source, self.shift, self.native_size = source, shift, NATIVE_SIZE
        self.num_steps, self.guidance = DEFAULTS[variant(source, transformer)]

    @classmethod
    def from_pretrained(cls, source: str | Path, device=None, dtype=None, offload: bool = False,
                        memory: str = "full"):  # fmt: skip
        """Every component from a hub repo id, a snapshot folder, or SAI's single file beside the diffusers folders
        of the text encoders and tokenizers."""
        import weights

        device = check_device(device)
        root = Path(source).parent if Path(source).is_file() else source
        transformer = weights.load_sd3(source, device, dtype)
        text = SD3TextEncoders(
            weights.load_clip_encoder(root, device, dtype, component="clip"),
            weights.load_clip_tokenizer(root),
            weights.load_clip_encoder(root, device, dtype, component="clip_2"),
            weights.load_clip_tokenizer(root, component="clip_2_tokenizer"),
            weights.load_t5_encoder(root, device, dtype, component="sd3_t5"),
            weights.load_t5_tokenizer(root, component="sd3_t5_tokenizer"),
            width=transformer.config.joint_attention_dim,
        )
        autoencoder = weights.load_sd3_autoencoder(source, device, dtype)
        shift = scheduler_shift(root) if Path(str(root)).is_dir() else SHIFT
        return cls(transformer, autoencoder, text, device, dtype, str(source), shift, memory_mode(memory, offload))

    @property
    def depth(self) -> int:
        return len(self.transformer.joint_blocks)

    # ---- the family's hooks ----------------------------------------------------------------------------------------
    def _check_memory(self, height: int, width: int) -> None:
        cfg = self.autoencoder.config
        imaging.check_memory(height, width, self.device, self.dtype, cfg.ch * cfg.ch_mult[0],
                             self.transformer.config.hidden_size, 77 + self.max_length)  # fmt: skip

    @torch.no_grad()
    def _conditioning(self, prompt: str, guidance: float, height: int, width: int) -> dict:
        """Text tokens and pooled vectors; with guidance above 1 (as diffusers), [negative; prompt] batches."""
        if guidance > 1:
            tokens, negative, pooled, negative_pooled = self.text.encode_prompt_and_negative(prompt)
            context, y = torch.cat((negative, tokens)), torch.cat((negative_pooled, pooled))
        else:
            context, y = self.text.encode_prompt(prompt)
        return {
            "context": context.to(self.dtype),
            "y": y.to(self.dtype),
            "guidance": guidance if guidance > 1 else None,
        }

    def _explain_conditioning(self, prompt: str, guidance: float, height: int, width: int) -> dict:
        return self._conditioning(prompt, 0.0, height, width)

    _uses_explain_guidance = False

    def _initial_latents(self, height: int, width: int, seed: int) -> Tensor:
        return get_noise(1, height, width, seed, self.device, self.dtype)  # (1, 16, H/8, W/8)

    def _timesteps(self, num_steps: int, latents: Tensor) -> list[float]:
        return flow_match_schedule(num_steps, self.shift)

    def _velocity(self, x: Tensor, t: Tensor, cond: dict, concepts: ConceptInput | None):
        guided = cond["guidance"] is not None
        if guided:  # [unconditional; conditional], the concepts riding along both
            x, t = torch.cat((x, x)), torch.cat((t, t))
            if concepts is not None:
                concepts = dataclasses.replace(concepts, txt=concepts.txt.expand(2, -1, -1))
        out = self.transformer(x, t.to(self.dtype), cond["context"], cond["y"], concepts=concepts)
        velocity = out if concepts is None else out.velocity
        if guided:
            uncond, cond_v = velocity.chunk(2)
            velocity = uncond + cond["guidance"] * (cond_v - uncond)
        if concepts is None:
            return velocity, None
        return velocity, {i: conditional_half(s) for i, s in out.saliency.items()} if guided else out.saliency

    def _explain_saliency(self, x_t: Tensor, t: float, cond: dict, concepts: ConceptInput) -> dict:
        t_vec = torch.full((1,), t, device=self.device, dtype=self.dtype)
        out = self.transformer(x_t, t_vec, cond["context"], cond["y"], concepts=concepts, stop_after_concepts=True)
        return out.saliency

    def _decode(self, latents: Tensor, height: int, width: int) -> Image.Image:
        z = latents.to(next(self.autoencoder.parameters()).dtype)
        return imaging.to_pil(self.autoencoder.decode(z)[0])

    def _encode(self, pil: Image.Image) -> Tensor:
        ae_dtype = next(self.autoencoder.parameters()).dtype
        x = (imaging.to_tensor(pil) * 2 - 1)[None].to(self.device, ae_dtype)
        return self.autoencoder.encode(x).to(self.dtype)  # (1, 16, H/8, W/8)


def conditional_half(saliency: ConceptSaliency) -> ConceptSaliency:
    """The second (conditional) row of each space of a [unconditional; conditional] batch."""
    return ConceptSaliency(**{f.name: None if (v := getattr(saliency, f.name)) is None else v[1:]
                              for f in dataclasses.fields(saliency)})  # fmt: skip
