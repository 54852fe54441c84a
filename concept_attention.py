"""ConceptAttention on Flux: concept saliency maps for the images the model makes and for images it is given.

The method (Helbling et al., ICML 2025, arXiv 2502.04320) lives inside `mmdit.DoubleStreamBlock`: each concept is a
T5-encoded word that travels through the double blocks as a second text stream, with the text weights, attending to
[concepts; image] and never read by the image or the prompt. This module turns what the blocks give back into maps:
it encodes the concepts, runs the sampler (`generate`) or one noised forward (`explain`), reduces each layer's saliency
to [C, N] and averages the chosen layers and steps. Follows the official code (helblazer811/ConceptAttention) in its
maths; differs in:
- any size that is a multiple of 16 and any aspect ratio; maps on the true token grid [C, H/16, W/16];
- multi-piece concepts: the official first-piece rule, the mean of the pieces (our default) or every piece its own
  token with its maps averaged;
- `explain` takes the autoencoder's posterior mean and really averages `num_samples` noise draws (seeds seed..seed+n-1);
- four saliency spaces (output, attention scores, value, cross-attention) and every knob as an explicit setting, with
  `PRESETS` reproducing the official defaults;
- only running sums of [C, N] maps are kept (or, with `keep_grid`, a small layer x step grid of them);
- `explain` resizes an image given without a size itself (multiples of 16, long side at most the native size) instead of
  squashing it to 1024 x 1024, and feeds guidance-distilled models guidance 3.5 (the official code: 0; `guidance=`).

Every argument is checked before a model runs (`checks.py`); the command line (`commands.py`) also checks the image,
the sizes, the output folder and the layers against the checkpoint's headers before any weights load, and writes each
result into a temporary folder that is moved into place at the end (`outputs.OutputFolder`).

Command line: `python concept_attention.py generate --prompt ... --concepts cat sky --out DIR` and
`python concept_attention.py explain --image photo.jpg --concepts cat sky --out DIR`.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

import imaging
from checks import (
    InputWarning,
    check_count,
    check_device,
    check_flag,
    check_run_finite,
    check_seed,
    check_t,
    model_recipe,
    terminate_as_interrupt,
    text_warnings,
    unseen_words,
)
from mmdit import ConceptInput, Flux
from mmdit.memory import MEMORY_MODES, prepare_flux, prepare_t5
from saliency import (
    PRESETS,
    SPACES,
    ConceptResult,
    MapCollector,
    Settings,
    check_concepts,
    family_settings,
)
from sampling import check_size, denoise, get_noise, get_schedule, image_ids, pack, text_ids, unpack
from shapes.scenes import world_words

__all__ = [  # the public API (the command line: commands.py)
    "BUILTIN_MODEL",
    "DEFAULT_MODEL",
    "PRESETS",
    "SPACES",
    "ConceptAttentionPipeline",
    "ConceptPipeline",
    "ConceptResult",
    "InputWarning",
    "Settings",
    "main",
]

DEFAULT_MODEL = "black-forest-labs/FLUX.1-schnell"
CLIP_FILES = ("text_encoder", "tokenizer", "clip.safetensors")  # any of them in a folder: the model has CLIP
BUILTIN_MODEL = Path(__file__).resolve().parent / "shapes" / "weights"


def memory_mode(memory: str, offload: bool) -> str:
    """The memory mode, with `offload=True` (the older option) standing for "offload" when `memory` is "full"."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory mode {memory!r}: choose one of {', '.join(MEMORY_MODES)}")
    check_flag(offload, "offload")
    return "offload" if offload and memory == "full" else memory


MAX_STEPS = 1000  # sampling steps: schnell uses 4, dev about 50; more builds lists and loops to no purpose
MAX_SAMPLES = 1000  # explain's noise draws: the paper averages a few; a typo such as 10**10 would run for ever
NATIVE_SIZE = 1024  # FLUX.1's native resolution: the long side explain() resizes to when not told a size
# Guidance fed to guidance-distilled models (FLUX.1-dev) by explain(): the value such a model samples with, so that
# the forward sees the conditioning it was distilled on. The official code feeds 0 (explain(guidance=0.0) restores it).
EXPLAIN_GUIDANCE = 3.5


def has_clip(source: str | Path) -> bool:
    """Whether a Flux-family model has a CLIP text encoder: a hub repo does; a folder does when it holds any of its
    files (a damaged CLIP is then an error, not a zero pooled vector); the built-in model's folder holds none."""
    folder = Path(source).expanduser()
    return not folder.is_dir() or any((folder / name).exists() for name in CLIP_FILES)


def native_size(source: str | Path) -> int:
    """The long side a model was trained at: a folder's recipe.json "size" (the built-in model: 128), else 1024.
    A damaged recipe.json is a ValueError that names it (`checks.model_recipe`)."""
    return model_recipe(source).get("size", NATIVE_SIZE)


def sampling_defaults(source: str | Path) -> tuple[int, bool | None]:
    """The sampling steps and schedule shift a model's recipe.json asks for (`sample_steps`, `sample_shift`; the
    built-in model: 50 Euler steps, unshifted); else (4, None): schnell's 4 steps, shifted only for a guidance-distilled
    (dev) transformer."""
    recipe = model_recipe(source)
    return recipe.get("sample_steps", 4), recipe.get("sample_shift")


def recipe_layers(source: str | Path) -> tuple[int, ...] | None:
    """A model's own concept-layer default: its recipe.json "layers" (the built-in model's were chosen on validation
    scenes by `python -m shapes.eval --choose-layers`), or None (every double block). Used whenever no layers are
    given (`--layers`, `Settings.layers`, a preset's)."""
    layers = model_recipe(source).get("layers")
    return None if layers is None else tuple(layers)


class ConceptPipeline:
    """The method, written once for every model family: concept encoding, the sampling loop, the noised forward of
    `explain`, the reduction of the per-layer saliency to maps. A family (Flux here, SD3.5 in `sd3.pipeline`)
    answers the hooks: its prompt conditioning, starting latents, schedule, one velocity with concepts, the saliency
    of one noised forward, its latents' layout (`_pack` / `_unpack`), its depth and size limits. Every prediction,
    encoded and decoded image and map is checked to be finite (`_check_finite`).

    Every family has `self.t5` / `self.t5_tokenizer` / `self.max_length` (concepts are T5-encoded by default), the
    run `self.device` / `self.dtype`, `self.source`, `self.native_size` (the long side explain resizes to) and
    `self.num_steps` (the default number of sampling steps).
    """

    family = "?"
    block_kind = "blocks"  # how the family calls the blocks `layers` index, for messages
    offload = False
    default_layers: tuple[int, ...] | None = None  # the model's own layers when none are given (its recipe.json)

    # ---- text ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _text(self, module, ids: Tensor):
        module.to(self.device)
        out = module(ids.to(self.device))
        if self.offload:
            module.to("cpu")
        return out

    def encode_concepts(self, concepts: list[str], token_rule: str) -> tuple[Tensor, Tensor]:
        """Each concept encoded by T5 on its own, as a prompt is; -> tokens [1, C', D] and owner [C'] (the concept each
        token belongs to). "first": position 0 (the official rule); "mean": the mean over the concept's pieces (EOS
        excluded); "pieces": every piece its own token."""
        hidden = self._text(self.t5, self.t5_tokenizer(concepts, max_length=self.max_length)).to(self.dtype)
        rows, owner = [], []
        for c, concept in enumerate(concepts):
            n = min(max(len(self.t5_tokenizer.encode(concept)) - 1, 1), self.max_length - 1)  # pieces without EOS
            if token_rule == "first":
                rows.append(hidden[c, :1])
            elif token_rule == "mean":
                rows.append(hidden[c, :n].mean(0, keepdim=True))
            else:
                rows.append(hidden[c, :n])
            owner += [c] * rows[-1].shape[0]
        return torch.cat(rows)[None], torch.tensor(owner, device="cpu")

    # ---- maps ----------------------------------------------------------------------------------------------------
    def _layers(self, settings: Settings, keep_grid: bool) -> tuple[int, ...]:
        depth = self.depth
        if settings.layers is not None and max(settings.layers) >= depth:
            raise ValueError(
                f"layers {list(settings.layers)}: this model has {depth} {self.block_kind} (0..{depth - 1})"
            )
        return tuple(range(depth)) if keep_grid or settings.layers is None else settings.layers

    def _default_layers(self, settings: Settings) -> tuple[Settings, str]:
        """`settings` with the model's own layers (`default_layers`, from its recipe.json) when they name none;
        -> (settings, where the layers come from: "given", "recipe.json" or "every block")."""
        if settings.layers is not None:
            return settings, "given"
        if self.default_layers is None:
            return settings, "every block"
        if max(self.default_layers) >= self.depth:
            raise ValueError(f"{self.source}/recipe.json: layers {list(self.default_layers)}, but this model has "
                             f"{self.depth} {self.block_kind} (0..{self.depth - 1}); give layers")  # fmt: skip
        return dataclasses.replace(settings, layers=self.default_layers), "recipe.json"

    def _layer_record(self, settings: Settings, layers_from: str) -> dict:
        """settings.json's account of the layers averaged and where they came from."""
        used = list(range(self.depth)) if settings.layers is None else list(settings.layers)
        return {"layers_used": used, "layers_from": layers_from}

    def _concept_input(self, tokens: Tensor, settings: Settings, layers, keep_grid: bool) -> ConceptInput:
        spaces = SPACES if keep_grid else (settings.space,)
        return ConceptInput(
            txt=tokens, target=settings.target, spaces=spaces, layers=layers, normalize=settings.normalize
        )

    def _result(self, image, concepts, collector: MapCollector, height, width, settings, record) -> ConceptResult:
        h, w = height // 16, width // 16
        grid = collector.grid() if collector.keep_grid else None
        result = ConceptResult(
            image, concepts, torch.zeros(len(concepts), h, w), settings, record, collector.layers, grid
        )
        if grid is not None:
            result.maps = result.select()
        else:
            result.maps = rearrange(collector.total / collector.count, "c (h w) -> c h w", h=h, w=w)
        return result

    def _warn(self, prompt: str, concepts: list[str], settings: Settings) -> None:
        notes = text_warnings(self.t5_tokenizer, self.max_length, prompt, concepts, settings.softmax)
        for note in notes + unseen_words(concepts, world_words(self.source) if self.source else None):
            warnings.warn(note, InputWarning, stacklevel=4)  # the caller of generate/explain

    def _guided_forward(self, forward, x: Tensor, t: Tensor, guidance: float | None, concepts):
        """Classifier-free guidance around the family's `forward(x, t, concepts) -> (prediction, saliency or None)`.
        With a scale (not None) the batch is [unconditional; conditional] with the concepts riding along both, the
        prediction is uncond + scale * (cond - uncond), and the maps are the half `Settings.guided_half` names (the
        conditional one unless told otherwise)."""
        if guidance is None:
            return forward(x, t, concepts)
        if concepts is not None:
            concepts = dataclasses.replace(concepts, txt=concepts.txt.expand(2, -1, -1))
        prediction, saliency = forward(torch.cat((x, x)), torch.cat((t, t)), concepts)
        uncond, cond = prediction.chunk(2)
        prediction = uncond + guidance * (cond - uncond)
        if saliency is None:
            return prediction, None
        row = 0 if getattr(self, "_guided_half", "conditional") == "unconditional" else 1
        return prediction, {i: s.row(row) for i, s in saliency.items()}

    def _models(self) -> list[torch.nn.Module]:
        """The pipeline's models, scanned for damaged weights when a run turns NaN (`_check_finite`)."""
        return [value for value in vars(self).values() if isinstance(value, torch.nn.Module)]

    def _check_finite(self, value: Tensor, what: str) -> None:
        """A NaN or infinite prediction, image or map stops the run with its cause (`checks.check_run_finite`):
        the damaged weight by file and tensor, or an overflow of the run's dtype. One reduction when all is well."""
        check_run_finite(value, what, self._models(), self.dtype)

    def _unpack(self, latents: Tensor, height: int, width: int) -> Tensor:
        """The sampler's latents as the autoencoder's [1, Z, H/8, W/8] (Flux: its tokens unpacked)."""
        return latents

    def _pack(self, z: Tensor) -> Tensor:
        """The autoencoder's latents as the sampler's (the inverse of `_unpack`)."""
        return z

    def _decode(self, latents: Tensor, height: int, width: int) -> Image.Image:
        """The picture of the final latents, checked before it becomes one (a damaged decoder is named, not drawn)."""
        z = self._unpack(latents.float(), height, width).to(next(self.autoencoder.parameters()).dtype)
        pixels = self.autoencoder.decode(z)[0]
        self._check_finite(pixels, "decoded image")
        return imaging.to_pil(pixels)

    def _encode(self, pil: Image.Image) -> Tensor:
        """The autoencoder's latents of a picture (its posterior mean) in the sampler's layout and dtype."""
        ae_dtype = next(self.autoencoder.parameters()).dtype
        x = (imaging.to_tensor(pil) * 2 - 1)[None].to(self.device, ae_dtype)
        return self._pack(self.autoencoder.encode(x).to(self.dtype))

    def _run_record(self) -> dict:
        """What settings.json says of the run besides its settings: the model, and where and how it ran."""
        return {"model": self.source, "family": self.family, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "memory": getattr(self, "memory", "full")}  # fmt: skip

    def _sample(self, velocity, latents: Tensor, timesteps: list, seed: int, progress: bool) -> Tensor:
        """The sampling loop over `timesteps`: Euler steps of the flow (Flux, SD3.5); other families replace it."""
        return denoise(velocity, latents, timesteps, progress=progress)

    def _prepare(self, prompt, concepts, settings, keep_grid):
        """Checks, warnings, concept tokens and the collector shared by generate and explain."""
        layers = self._layers(settings, keep_grid)
        self._warn(prompt, concepts, settings)
        tokens, owner = self.encode_concepts(concepts, settings.token_rule)
        collector = MapCollector(settings, layers, owner, len(concepts), keep_grid)
        return collector, self._concept_input(tokens, settings, layers, keep_grid)

    @torch.no_grad()
    def generate(self, prompt: str, concepts: list[str], height: int | None = None, width: int | None = None,
                 num_steps: int | None = None, seed: int = 0, settings: Settings = Settings(),
                 keep_grid: bool = False, guidance: float | None = None,
                 progress: bool = True) -> ConceptResult:  # fmt: skip
        """Sample an image exactly as the model does (the concepts never change it) and collect the concept maps.
        `height`, `width` None: the model's native size (1024 for FLUX.1 and SD3.5, 128 for the built-in model).
        `num_steps` None: the model's own default (`self.num_steps`). `guidance` None: the model's own
        (`self.guidance`): FLUX.1-dev's distilled guidance, SD3.5's classifier-free guidance scale."""
        height = self.native_size if height is None else height
        width = self.native_size if width is None else width
        num_steps = self.num_steps if num_steps is None else num_steps
        guidance = self.guidance if guidance is None else guidance
        concepts = check_concepts(concepts)
        settings = family_settings(settings, self.family)  # "official" on SD3.5 is its own; options checked
        settings, layers_from = self._default_layers(settings)  # the model's own layers when none are given
        check_size(height, width)
        check_flag(progress, "progress")
        check_count(num_steps, "num_steps", 1, MAX_STEPS)
        check_seed(seed)
        check_guidance(guidance)
        if settings.steps is not None and max(settings.steps) >= num_steps:
            raise ValueError(f"steps {list(settings.steps)}: there are only {num_steps} sampling steps")
        self._check_memory(height, width)
        collector, concept_input = self._prepare(prompt, concepts, settings, keep_grid)
        cond = self._conditioning(prompt, guidance, height, width)
        latents = self._initial_latents(height, width, seed)
        timesteps = self._timesteps(num_steps, latents)
        step = 0

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            nonlocal step
            wanted = collector.wants(step)
            out, saliency = self._velocity(x, t, cond, concept_input if wanted else None)
            self._check_finite(out, f"prediction of sampling step {step + 1}")
            step += 1
            if wanted:
                collector.add(saliency)
            return out

        latents = self._sample(velocity, latents, timesteps, seed, progress)
        image = self._decode(latents, height, width)
        record = {"mode": "generate", **self._run_record(), "prompt": prompt,
                  "height": height, "width": width, "num_steps": num_steps, "seed": seed,
                  "guidance": float(guidance), "timesteps": [round(t, 6) for t in timesteps]}  # fmt: skip
        record.update(self._layer_record(settings, layers_from))
        result = self._result(image, concepts, collector, height, width, settings, record)
        self._check_finite(result.maps, "concept maps")
        return result

    @torch.no_grad()
    def explain(self, image, concepts: list[str], prompt: str = "", t: float = 0.5, num_samples: int = 1,
                seed: int = 0, settings: Settings = Settings(), keep_grid: bool = False,
                size: tuple[int, int] | None = None, progress: bool = True,
                guidance: float | None = None) -> ConceptResult:  # fmt: skip
        """Maps for a given image: autoencoder mean, noise at t (seeds seed..seed+num_samples-1), one forward per
        sample that stops after the last block that reports, averaged.

        `image`: a file path, a PIL image (any mode; alpha over white) or a float tensor [3, H, W] with values in [0, 1]
        (others are refused, not clamped). Without `size` it is resized by `imaging.auto_size` (long side at most the
        model's native size, multiples of 16); `record["input_size"]` keeps its own size. `guidance` feeds models with a
        guidance embedding (FLUX.1-dev, default 3.5; the official code feeds 0); other models ignore it."""
        concepts = check_concepts(concepts)
        settings = family_settings(settings, self.family)  # "official" on SD3.5 is its own; options checked
        settings, layers_from = self._default_layers(settings)  # the model's own layers when none are given
        t = check_t(t)
        check_flag(progress, "progress")
        if size is not None and (not isinstance(size, (tuple, list)) or len(size) != 2):
            raise ValueError(f"size = {size!r}: give (height, width), two multiples of 16")
        check_count(num_samples, "num_samples", 1, MAX_SAMPLES)
        check_seed(seed, num_samples)
        guidance = EXPLAIN_GUIDANCE if guidance is None else guidance
        check_guidance(guidance)
        if isinstance(image, (str, Path)):
            pil = imaging.load_image(image)
        elif isinstance(image, Tensor):
            pil = imaging.tensor_to_image(image)
        elif isinstance(image, Image.Image):
            pil = imaging.to_rgb(image)
        else:
            raise ValueError(f"image must be a PIL image, a path or a [3, H, W] tensor, got {type(image).__name__}")
        input_size = (pil.height, pil.width)
        size_rule = "given"
        if size is None:
            size = imaging.auto_size(*input_size, self.native_size)
            size_rule = f"auto: long side at most {self.native_size}, multiples of 16"
        check_size(*size)
        if size != input_size:
            pil = pil.resize((size[1], size[0]), Image.BICUBIC)
        height, width = pil.height, pil.width
        if settings.steps is not None and max(settings.steps) >= num_samples:
            raise ValueError(f"steps {list(settings.steps)} select noise samples; there are only {num_samples}")
        self._check_memory(height, width)
        collector, concept_input = self._prepare(prompt, concepts, settings, keep_grid)
        cond = self._explain_conditioning(prompt, guidance, height, width)
        z = self._encode(pil)
        self._check_finite(z, "encoded image")
        samples = range(num_samples)
        if progress:
            from tqdm.auto import tqdm

            samples = tqdm(samples, desc="explain", unit="sample")
        for i in samples:
            noise = self._initial_latents(height, width, seed + i)
            x_t = t * noise + (1 - t) * z
            if collector.wants(i):
                collector.add(self._explain_saliency(x_t, t, cond, concept_input))
        record = {"mode": "explain", **self._run_record(), "prompt": prompt,
                  "height": height, "width": width, "input_size": list(input_size), "size_rule": size_rule, "t": t,
                  "num_samples": num_samples, "seed": seed,
                  "guidance": float(guidance) if self._uses_explain_guidance else None}  # fmt: skip
        record.update(self._layer_record(settings, layers_from))
        result = self._result(pil, concepts, collector, height, width, settings, record)
        self._check_finite(result.maps, "concept maps")
        return result


def check_guidance(guidance) -> None:
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= 100:
        raise ValueError(f"guidance must be a number in [0, 100], got {guidance!r}")


class ConceptAttentionPipeline(ConceptPipeline):
    """Flux + its autoencoder and text encoders, with ConceptAttention maps collected during the same forwards.
    `from_pretrained` reads the family from the checkpoint and returns the SD3.5 pipeline for SD3.5 checkpoints.

    `clip` may be None (the pooled vector is then zero, as in the built-in shapes model). The modules are used in the
    dtype they were loaded in; `dtype` is that of the inputs (default: the transformer's). `memory` (one of
    `MEMORY_MODES`): "full" keeps everything on `device`; "offload" keeps the text encoders on the CPU, visiting
    `device` only to encode (the transformer stays, so the peak is still both); "stream" streams the blocks of the
    transformer and of T5 from pinned host memory (`mmdit.memory.stream_blocks`, `stream_t5`); "fp8" stores the
    transformer's block weights in float8 (`mmdit.memory.to_fp8`) and streams T5's. `offload=True` is the older
    spelling of memory="offload".
    """

    family = "flux"
    block_kind = "double blocks"

    def __init__(self, flux: Flux, autoencoder, t5, t5_tokenizer, clip=None, clip_tokenizer=None, device=None,
                 dtype=None, offload: bool = False, max_length: int = 256, source: str = "custom",
                 memory: str = "full", native_size: int = NATIVE_SIZE):  # fmt: skip
        self.device = check_device(device)
        self.dtype = dtype or next(flux.parameters()).dtype  # inputs follow the transformer unless told otherwise
        self.memory = memory_mode(memory, offload)
        self.flux, self.autoencoder = prepare_flux(flux, self.memory, self.device), autoencoder.to(self.device)
        self.offload = self.memory != "full"
        text_device = "cpu" if self.offload else self.device
        self.t5, self.t5_tokenizer = prepare_t5(t5, self.memory, self.device).to(text_device), t5_tokenizer
        self.clip = clip.to(text_device) if clip is not None else None
        self.clip_tokenizer = clip_tokenizer
        self.max_length, self.source = max_length, source
        self.native_size = native_size  # the long side explain() resizes to when not told a size
        self.num_steps, self.schedule_shift = sampling_defaults(source) if source else (4, None)
        self.default_layers = recipe_layers(source) if source else None  # the built-in model's: its recipe's
        self.guidance = 3.5  # FLUX.1-dev's distilled guidance (schnell has no guidance embedding)

    @classmethod
    def from_pretrained(cls, source: str | Path = DEFAULT_MODEL, device=None, dtype=None, offload: bool = False,
                        memory: str = "full"):  # fmt: skip
        """Load every component from a hub repo id, a local snapshot folder, or "shapes" (the built-in model).
        With memory "stream" or "fp8" the transformer is read into host memory and prepared there block by block.
        An SD3.5 checkpoint (read from its files) gives an `sd3.pipeline.SD3Pipeline`."""
        import weights

        if str(source) == "shapes":
            source = BUILTIN_MODEL
        family = weights.family(source)
        if family == "sd3":
            from sd3.pipeline import SD3Pipeline

            return SD3Pipeline.from_pretrained(source, device, dtype, offload, memory)
        if family == "cogvideox":
            from cogvideox.pipeline import CogVideoXPipeline

            return CogVideoXPipeline.from_pretrained(source, device, dtype, offload, memory)
        device = check_device(device)
        memory = memory_mode(memory, offload)
        with_clip = has_clip(source)  # every file checked before any weight is read (on the meta device)
        weights.check_files(source, ("flux", "autoencoder", "t5", "clip")[: 4 if with_clip else 3],
                            ("clip_tokenizer",) if with_clip else ())  # fmt: skip
        text_device = "cpu" if memory != "full" else device
        if memory in ("stream", "fp8"):  # the dtype meant for `device`, read into host memory
            flux_dtype = weights.resolve_device_dtype("flux", device, dtype)[1]
            flux = weights.load_flux(source, device="cpu", dtype=flux_dtype)
        else:
            flux = weights.load_flux(source, device=device, dtype=dtype)
        autoencoder = weights.load_autoencoder(source, device=device, dtype=dtype)
        t5 = weights.load_t5_encoder(source, device=text_device, dtype=dtype)
        clip = clip_tokenizer = None  # a folder with no CLIP at all (the built-in model's): a zero pooled vector
        if with_clip:
            clip = weights.load_clip_encoder(source, text_device, dtype)
            clip_tokenizer = weights.load_clip_tokenizer(source)
        t5_tokenizer = weights.load_t5_tokenizer(source)
        max_length = weights.t5_max_length(source)
        return cls(flux, autoencoder, t5, t5_tokenizer, clip, clip_tokenizer, device, dtype, max_length=max_length,
                   source=str(source), memory=memory, native_size=native_size(source))  # fmt: skip

    @property
    def depth(self) -> int:
        return len(self.flux.double_blocks)

    def encode_prompt(self, prompt: str, pooled: bool = True) -> tuple[Tensor, Tensor]:
        """T5 tokens [1, L, D] and the pooled vector [1, vec_in_dim] (CLIP's, or zeros without CLIP or pooled=False)."""
        txt = self._text(self.t5, self.t5_tokenizer([prompt], max_length=self.max_length)).to(self.dtype)
        y = torch.zeros(1, self.flux.config.vec_in_dim, device=self.device, dtype=self.dtype)
        if pooled and self.clip is not None:
            y = self._text(self.clip, self.clip_tokenizer([prompt]))[1].to(self.dtype)
        return txt, y

    # ---- the family's hooks ----------------------------------------------------------------------------------------
    def _check_memory(self, height: int, width: int) -> None:
        cfg = self.autoencoder.config
        imaging.check_memory(height, width, self.device, self.dtype, cfg.ch * cfg.ch_mult[0],
                             self.flux.config.hidden_size, self.max_length)  # fmt: skip

    def _conditioning(self, prompt: str, guidance: float, height: int, width: int, pooled: bool = True) -> dict:
        """T5 tokens, pooled vector, position ids of text and image, and the guidance input (FLUX.1-dev)."""
        txt, y = self.encode_prompt(prompt, pooled)
        g = torch.full((1,), float(guidance), device=self.device, dtype=self.dtype)
        return {"txt": txt, "y": y, "tids": text_ids(1, txt.shape[1]).to(self.device),
                "ids": image_ids(1, height, width).to(self.device),
                "g": g if self.flux.config.guidance_embed else None}  # fmt: skip

    def _explain_conditioning(self, prompt: str, guidance: float, height: int, width: int) -> dict:
        return self._conditioning(prompt, guidance, height, width, pooled=False)  # zero pooled, as the official code

    @property
    def _uses_explain_guidance(self) -> bool:
        return self.flux.config.guidance_embed

    def _initial_latents(self, height: int, width: int, seed: int) -> Tensor:
        return pack(get_noise(1, height, width, seed, self.device, self.dtype))  # (1, N, 64)

    def _timesteps(self, num_steps: int, latents: Tensor) -> list[float]:
        shift = self.flux.config.guidance_embed if self.schedule_shift is None else self.schedule_shift
        return get_schedule(num_steps, latents.shape[1], shift=shift)

    def _velocity(self, x: Tensor, t: Tensor, cond: dict, concepts: ConceptInput | None):
        txt, y = cond["txt"], cond["y"]
        out = self.flux(x, cond["ids"], txt, cond["tids"], t.to(self.dtype), y, cond["g"], concepts=concepts)
        return (out, None) if concepts is None else (out.velocity, out.saliency)

    def _explain_saliency(self, x_t: Tensor, t: float, cond: dict, concepts: ConceptInput) -> dict:
        t_vec = torch.full((1,), t, device=self.device, dtype=self.dtype)
        out = self.flux(x_t, cond["ids"], cond["txt"], cond["tids"], t_vec, cond["y"], cond["g"], concepts=concepts,
                        stop_after_double=True)  # fmt: skip
        return out.saliency

    def _unpack(self, latents: Tensor, height: int, width: int) -> Tensor:
        return unpack(latents, height, width)  # (1, N, 64) -> (1, 16, H/8, W/8)

    def _pack(self, z: Tensor) -> Tensor:
        return pack(z)  # (1, 16, H/8, W/8) -> (1, N, 64)


# ---- command line (commands.py) -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`python concept_attention.py generate|explain ...`: the command line, written in `commands.py`."""
    from commands import main as run

    return run(argv)


if __name__ == "__main__":
    with terminate_as_interrupt():
        code = main()
    sys.exit(code)
