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

The official SD3 code's recipe (helblazer811/ConceptAttention `concept_attention/sd3/`) is a set of `Settings`
options, all on in the preset "official-sd3"; `--preset official` (or `settings=PRESETS["official"]` as is) reads as
that preset on SD3.5 (`saliency.family_settings`, in `generate` and `explain`): `concept_encoder="clip-joined"` (the
concepts joined by spaces, the two CLIPs' penultimate states, rows 0..C with the BOS row carried through the blocks
and dropped from the maps), `image_vectors="concepts"` (o_x from a second attention over [image; concepts], see
`sd3.layers`), `reduce="vectors"` (vectors averaged over steps, L2-normalised concepts) and
`guided_half="unconditional"` (under guidance the maps of the unconditional half). The official `encode_image`
noises at the 4-step schedule's third sigma (`OFFICIAL_T`, 0.6022 with shift 3) with the posterior *sample* of an
unseeded generator; `explain` keeps the posterior mean (give `t=OFFICIAL_T`). The official code crashes on Medium;
these options run there (`attn2` takes no part in them).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor

import imaging
from checks import InputWarning, check_device
from concept_attention import NATIVE_SIZE, ConceptPipeline, memory_mode
from mmdit import ConceptInput
from mmdit.memory import prepare_flux, prepare_t5
from saliency import MapCollector, Settings
from sampling import flow_match_schedule, get_noise

from .model import SD3, SD3ConceptInput
from .text import CLIP_LENGTH, SD3TextEncoders

SHIFT = 3.0  # SD3.5's scheduler_config.json
OFFICIAL_T = flow_match_schedule(4, SHIFT)[2]  # the official encode_image's noise level: timesteps[-2] of 4 steps
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
        self.offload = self.memory != "full"  # the text encoders wait on the CPU between uses
        if text.t5 is None:
            raise ValueError("ConceptAttention encodes concepts with T5: give the SD3 text encoders their T5")
        self.transformer = prepare_flux(transformer, self.memory, self.device)  # any model with `block_lists`
        self.autoencoder, self.text = autoencoder.to(self.device), text
        text.t5 = prepare_t5(text.t5, self.memory, self.device)
        for name in ("clip_l", "clip_g", "t5"):
            setattr(text, name, getattr(text, name).to("cpu" if self.offload else self.device))
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
        memory = memory_mode(memory, offload)
        root = Path(source).parent if Path(source).is_file() else source
        # every file checked before any weight is read (on the meta device), the command line's too
        weights.check_files(root, ("clip", "clip_2", "sd3_t5"), ("clip_tokenizer", "clip_2_tokenizer"))
        weights.check_files(source, ("sd3", "sd3_autoencoder"))
        shift = scheduler_shift(root) if Path(str(root)).is_dir() else SHIFT
        if memory in ("stream", "fp8"):  # the dtype meant for `device`, read into host memory
            transformer = weights.load_sd3(source, "cpu", weights.resolve_device_dtype("sd3", device, dtype)[1])
        else:
            transformer = weights.load_sd3(source, device, dtype)
        text_device = "cpu" if memory != "full" else device
        text = SD3TextEncoders(
            weights.load_clip_encoder(root, text_device, dtype, component="clip"),
            weights.load_clip_tokenizer(root),
            weights.load_clip_encoder(root, text_device, dtype, component="clip_2"),
            weights.load_clip_tokenizer(root, component="clip_2_tokenizer"),
            weights.load_t5_encoder(root, text_device, dtype, component="sd3_t5"),
            weights.load_t5_tokenizer(root, component="sd3_t5_tokenizer"),
            width=transformer.config.joint_attention_dim,
        )
        autoencoder = weights.load_sd3_autoencoder(source, device, dtype)
        return cls(transformer, autoencoder, text, device, dtype, str(source), shift, memory)

    @property
    def depth(self) -> int:
        return len(self.transformer.joint_blocks)

    # ---- concepts and settings -------------------------------------------------------------------------------------
    def encode_concepts_clip_joined(self, concepts: list[str]) -> tuple[Tensor, Tensor]:
        """The official SD3 encoding: `" ".join(concepts)` through both CLIPs as a prompt is (`clip_tokens`), rows
        0..C kept -> tokens [1, C+1, W] and owner [C+1] = [-1 (BOS), 0, 1, ..., C-1]. Row i is the i-th CLIP token
        of the joined text, which is concept i-1 only if every concept before it is one token (warned otherwise)."""
        C = len(concepts)
        if C + 2 > CLIP_LENGTH:
            raise ValueError(f"{C} concepts: the CLIP-joined encoding keeps BOS and {C} tokens of one 77-token text; "
                             f"give at most {CLIP_LENGTH - 2} concepts")  # fmt: skip
        tokenizer = self.text.clip_l_tokenizer
        several = [c for c in concepts if len(tokenizer.encode(c)) != 3]  # BOS, one piece, EOS
        if several:
            warnings.warn(
                f"concept(s) {', '.join(map(repr, several))} are not one CLIP token: the CLIP-joined encoding (the "
                "official SD3 code's) keeps the first C tokens of the joined text, so the maps from the first of "
                "them on are of pieces, not of the concepts named",
                InputWarning,
                stacklevel=5,
            )
        encoders = (self.text.clip_l, self.text.clip_g)
        for module in encoders if self.offload else ():
            module.to(self.device)
        tokens = self.text.clip_tokens(" ".join(concepts))[:, : C + 1].to(self.device, self.dtype)
        for module in encoders if self.offload else ():
            module.to("cpu")
        return tokens, torch.tensor([-1, *range(C)])

    def _prepare(self, prompt, concepts, settings, keep_grid):
        self._guided_half = settings.guided_half
        if settings.concept_encoder == "t5":
            return super()._prepare(prompt, concepts, settings, keep_grid)
        layers = self._layers(settings, keep_grid)
        self._warn(prompt, concepts, settings)
        tokens, owner = self.encode_concepts_clip_joined(concepts)
        collector = MapCollector(settings, layers, owner, len(concepts), keep_grid)
        return collector, self._concept_input(tokens, settings, layers, keep_grid)

    def _concept_input(self, tokens: Tensor, settings: Settings, layers, keep_grid: bool) -> SD3ConceptInput:
        base = super()._concept_input(tokens, settings, layers, keep_grid)
        return SD3ConceptInput(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                               image_vectors=settings.image_vectors, vectors=settings.reduce == "vectors")  # fmt: skip

    # ---- the family's hooks ----------------------------------------------------------------------------------------
    def _check_memory(self, height: int, width: int) -> None:
        largest = 16 * self.transformer.config.pos_embed_max_size
        if max(height, width) > largest:
            raise ValueError(f"size {height}x{width}: this model takes at most {largest} px a side (its position "
                             "table); give a smaller size")  # fmt: skip
        cfg = self.autoencoder.config
        imaging.check_memory(height, width, self.device, self.dtype, cfg.ch * cfg.ch_mult[0],
                             self.transformer.config.hidden_size, 77 + self.max_length)  # fmt: skip

    @torch.no_grad()
    def _conditioning(self, prompt: str, guidance: float, height: int, width: int) -> dict:
        """Text tokens and pooled vectors; with guidance above 1 (as diffusers), [negative; prompt] batches."""
        encoders = [m for m in (self.text.clip_l, self.text.clip_g, self.text.t5) if m is not None]
        for module in encoders if self.offload else ():
            module.to(self.device)
        if guidance > 1:
            tokens, negative, pooled, negative_pooled = self.text.encode_prompt_and_negative(prompt)
            context, y = torch.cat((negative, tokens)), torch.cat((negative_pooled, pooled))
        else:
            context, y = self.text.encode_prompt(prompt)
        for module in encoders if self.offload else ():
            module.to("cpu")
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
        def forward(x: Tensor, t: Tensor, concepts: ConceptInput | None):
            out = self.transformer(x, t.to(self.dtype), cond["context"], cond["y"], concepts=concepts)
            return (out, None) if concepts is None else (out.velocity, out.saliency)

        return self._guided_forward(forward, x, t, cond["guidance"], concepts)

    def _explain_saliency(self, x_t: Tensor, t: float, cond: dict, concepts: ConceptInput) -> dict:
        t_vec = torch.full((1,), t, device=self.device, dtype=self.dtype)
        out = self.transformer(x_t, t_vec, cond["context"], cond["y"], concepts=concepts, stop_after_concepts=True)
        return out.saliency

    def _models(self) -> list[torch.nn.Module]:
        text = [value for value in vars(self.text).values() if isinstance(value, torch.nn.Module)]
        return super()._models() + text


def sd3_facts(source: str | Path):
    """What the command line checks its arguments against, from the headers and small files of an SD3.5 snapshot."""
    import weights
    from commands import ModelFacts
    from weights.configs import count_blocks

    tensors = weights.read_weights(weights.locate(source, "sd3"))
    root = Path(source).parent if Path(source).is_file() else source
    single = "model.diffusion_model.x_embedder.proj.weight"
    depth = count_blocks(tensors, "transformer_blocks") or count_blocks(tensors, "model.diffusion_model.joint_blocks")
    embed = tensors.get("pos_embed.proj.weight") or tensors.get(single)
    dual = any(".attn2." in key for key in tensors)
    name = str(source).lower()
    steps = DEFAULTS["medium" if dual else "turbo" if "turbo" in name else "large"][0]
    table = tensors.get("pos_embed.pos_embed") or tensors.get("model.diffusion_model.pos_embed")
    max_size = 16 * round(table.shape[1] ** 0.5) if table else None
    return ModelFacts(str(source), depth, embed.shape[0] if embed else 2432, 128, 256, NATIVE_SIZE,
                      weights.load_t5_tokenizer(root, component="sd3_t5_tokenizer"), steps, "joint blocks",
                      max_size, family="sd3")  # fmt: skip
