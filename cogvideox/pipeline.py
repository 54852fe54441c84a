"""ConceptAttention on CogVideoX (2B, 5B): the video family's answers to `concept_attention.ConceptPipeline`.

Follows diffusers' `CogVideoXPipeline` for sampling (tested to give its frames on tiny random weights): T5 prompt
tokens (226, padded), seeded latents (B, 1 + (frames - 1) / 4, 16, H/8, W/8), v-prediction DDIM (2B) or SDE-DPM-Solver++
(5B) over trailing timesteps with the noise drawn from the seed's generator in diffusers' order, classifier-free
guidance above a scale of 1 with the negative prompt "", the 3D autoencoder's chunked decode. Differs in:
- concepts (T5-encoded one at a time, as on Flux) go through the text projection and the text half of every block's
  expert norms, attend to [concepts; video] and never change the video; under guidance they ride along both halves
  and the maps are the conditional half's; maps are [C, latent frames, h, w], with a per-frame view (`VideoResult`);
- no guidance (scale 0 or 1) runs one batch (the official pipeline needs guidance);
- `explain` takes a clip (frames), encodes it with the autoencoder's posterior mean, noises it to the timestep
  round(t * 999) of the training schedule (x_t = sqrt(a) x_0 + sqrt(1 - a) noise) and runs one forward per sample
  that stops after the last block that reports; the frames are resized to a size the model takes and cut to 1 + 4k.

The official CogVideoX code's recipe (helblazer811/ConceptAttention `concept_attention/cogvideox/`) is a set of
`Settings` options, all on in the preset "official-cogvideox"; `--preset official` (or `settings=PRESETS["official"]`
as is) reads as that preset on CogVideoX (`saliency.family_settings`, in `generate` and `explain`):
`concept_length=16` (each concept T5-encoded alone, padded to 16 tokens), `token_rule="first"` (position 0 kept),
`pad_concepts=True` (zero vectors up to the prompt's 226 slots: through `text_proj` they become its bias, travel
through the blocks as concepts, are keys and values of the concept attention and slots of the softmax over concepts,
then are dropped), the conditional half of the guided batch (`guided_half`, the default; "unconditional" is offered)
and maps averaged over layers and steps, one per latent frame (`VideoResult.frame_mean()` averages the frames too).
The official pipeline needs guidance (its concepts have batch 2); these options run without it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

import imaging
from checks import check_count, check_device, check_flag, check_seed, check_t
from concept_attention import MAX_SAMPLES, ConceptPipeline, check_guidance, memory_mode
from mmdit import ConceptInput
from mmdit.memory import prepare_flux, prepare_t5
from saliency import PADDING, MapCollector, Settings, check_concepts, family_settings
from sampling import check_size
from video import TIME_FACTOR, VideoResult, latent_frames

from .autoencoder import VideoAutoEncoder
from .model import CogVideoX
from .sampling import NoiseSchedule, ddim_step, dpm_step

NATIVE = (480, 720)  # height, width of the training videos
FRAMES = 49  # frames of the training videos (13 latent frames)
MAX_LENGTH = 226  # T5 tokens of the prompt
STEPS, GUIDANCE = 50, 6.0  # CogVideoXPipeline's defaults


def check_frames(frames) -> int:
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % TIME_FACTOR:
        below = 1 + TIME_FACTOR * ((frames - 1) // TIME_FACTOR) if isinstance(frames, int) and frames > 1 else 1
        raise ValueError(f"frames = {frames!r}: CogVideoX takes 1 + 4k frames (1, 5, 9, ..., 49); use {below} or "
                         f"{below + TIME_FACTOR}")  # fmt: skip
    return frames


class CogVideoXPipeline(ConceptPipeline):
    """CogVideoX's transformer, 3D autoencoder and T5, with ConceptAttention maps from the same forwards."""

    family = "cogvideox"
    block_kind = "blocks"

    def __init__(self, transformer: CogVideoX, autoencoder: VideoAutoEncoder, t5, t5_tokenizer,
                 schedule: NoiseSchedule, device=None, dtype=None, source: str = "custom", memory: str = "full",
                 max_length: int = MAX_LENGTH):  # fmt: skip
        self.device = check_device(device)
        self.dtype = dtype or next(transformer.parameters()).dtype
        self.memory = memory_mode(memory, False)
        self.offload = self.memory != "full"
        self.transformer = prepare_flux(transformer, self.memory, self.device)  # any model with `block_lists`
        self.autoencoder = autoencoder.to(self.device)
        self.t5 = prepare_t5(t5, self.memory, self.device).to("cpu" if self.offload else self.device)
        self.t5_tokenizer, self.max_length, self.schedule = t5_tokenizer, max_length, schedule
        self.source, self.num_steps, self.guidance = source, STEPS, GUIDANCE
        self.native_size = max(NATIVE)
        self.num_frames = FRAMES
        self._frames = FRAMES  # the frame count of the run under way

    @classmethod
    def from_pretrained(cls, source: str | Path, device=None, dtype=None, offload: bool = False,
                        memory: str = "full"):  # fmt: skip
        """Every component from a hub repo id (THUDM/CogVideoX-2b, -5b) or a snapshot folder (diffusers layout)."""
        import weights
        from weights.cogvideox import load_cogvideox_autoencoder, load_cogvideox_transformer

        device = check_device(device)
        memory = memory_mode(memory, offload)
        weights.check_files(source, ("cogvideox", "cogvideox_autoencoder", "cogvideox_t5"))  # no data read
        found = weights.locate(source, "cogvideox_scheduler")  # fetched with the rest from the hub
        schedule = NoiseSchedule.from_file(found.root / found.layout.folder / "scheduler_config.json")
        if memory in ("stream", "fp8"):  # the dtype meant for `device`, read into host memory
            host_dtype = weights.resolve_device_dtype("cogvideox", device, dtype)[1]
            transformer = load_cogvideox_transformer(source, "cpu", host_dtype)
        else:
            transformer = load_cogvideox_transformer(source, device, dtype)
        autoencoder = load_cogvideox_autoencoder(source, device, dtype)
        text_device = "cpu" if memory != "full" else device
        t5 = weights.load_t5_encoder(source, text_device, dtype, component="cogvideox_t5")
        tokenizer = weights.load_t5_tokenizer(source, component="cogvideox_t5_tokenizer")
        return cls(transformer, autoencoder, t5, tokenizer, schedule, device, dtype, str(source), memory)

    @property
    def depth(self) -> int:
        return len(self.transformer.transformer_blocks)

    @torch.no_grad()
    def generate(self, prompt: str, concepts: list[str], height: int | None = None, width: int | None = None,
                 num_steps: int | None = None, seed: int = 0, settings: Settings = Settings(),
                 keep_grid: bool = False, guidance: float | None = None, progress: bool = True,
                 num_frames: int | None = None) -> VideoResult:  # fmt: skip
        """A video of `num_frames` frames (default 49) at height x width (default 480 x 720), as CogVideoXPipeline
        samples it, and the concept maps [C, latent frames, h, w]. See `ConceptPipeline.generate`."""
        self._frames = check_frames(self.num_frames if num_frames is None else num_frames)
        height = NATIVE[0] if height is None else height
        width = NATIVE[1] if width is None else width
        return super().generate(prompt, concepts, height, width, num_steps, seed, settings, keep_grid, guidance,
                                progress)  # fmt: skip

    # ---- concepts and settings -------------------------------------------------------------------------------------
    def encode_concepts(self, concepts: list[str], token_rule: str, length: int | None = None) -> tuple[Tensor, Tensor]:
        """`ConceptPipeline.encode_concepts` with each concept padded to `length` T5 tokens (None: the prompt's)."""
        if length is None:
            return super().encode_concepts(concepts, token_rule)
        prompt_length, self.max_length = self.max_length, length
        try:
            return super().encode_concepts(concepts, token_rule)
        finally:
            self.max_length = prompt_length

    def _prepare(self, prompt, concepts, settings, keep_grid):
        """`ConceptPipeline._prepare` with the official recipe's options: the concepts' T5 length, zero padding slots
        up to the prompt's length (owned by `PADDING`: in the softmax over concepts, dropped from the maps), and the
        half of the guided batch the maps come from."""
        if keep_grid is not False:  # checked before anything runs (it was refused after the run)
            raise ValueError(f"keep_grid = {keep_grid!r}: the layer x step grid is not available for videos yet")
        self._guided_half = settings.guided_half
        layers = self._layers(settings, keep_grid)
        self._warn(prompt, concepts, settings)
        tokens, owner = self.encode_concepts(concepts, settings.token_rule, settings.concept_length)  # (1, C', D)
        if settings.pad_concepts and tokens.shape[1] < self.max_length:
            pads = self.max_length - tokens.shape[1]
            tokens = torch.cat((tokens, tokens.new_zeros(1, pads, tokens.shape[2])), dim=1)  # (1, max_length, D)
            owner = torch.cat((owner, torch.full((pads,), PADDING)))
        collector = MapCollector(settings, layers, owner, len(concepts), keep_grid)
        return collector, self._concept_input(tokens, settings, layers, keep_grid)

    # ---- the family's hooks ----------------------------------------------------------------------------------------
    def _check_memory(self, height: int, width: int) -> None:
        """The image estimate with the latent frames stacked: the tokens grow with the frames."""
        cfg, frames = self.autoencoder.config, latent_frames(self._frames)
        imaging.check_memory(height, width, self.device, self.dtype, cfg.block_out_channels[0],
                             self.transformer.config.inner_dim, self.max_length, frames)  # fmt: skip

    @torch.no_grad()
    def _conditioning(self, prompt: str, guidance: float, height: int, width: int) -> dict:
        texts = ["", prompt] if guidance > 1 else [prompt]
        context = self._text(self.t5, self.t5_tokenizer(texts, max_length=self.max_length)).to(self.dtype)
        return {"context": context, "guidance": guidance if guidance > 1 else None}

    def _explain_conditioning(self, prompt: str, guidance: float, height: int, width: int) -> dict:
        return self._conditioning(prompt, 0.0, height, width)

    _uses_explain_guidance = False

    def _initial_latents(self, height: int, width: int, seed: int, generator=None) -> Tensor:
        check_size(height, width)
        shape = (1, latent_frames(self._frames), self.transformer.config.in_channels, height // 8, width // 8)
        generator = generator or torch.Generator("cpu").manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)  # (1, F, Z, h, w)

    def _timesteps(self, num_steps: int, latents: Tensor) -> list[int]:
        return self.schedule.timesteps(num_steps)

    def _velocity(self, x: Tensor, t: Tensor, cond: dict, concepts: ConceptInput | None):
        def forward(x: Tensor, t: Tensor, concepts: ConceptInput | None):
            out = self.transformer(x, t, cond["context"], concepts=concepts)
            return (out.float(), None) if concepts is None else (out.prediction.float(), out.saliency)

        return self._guided_forward(forward, x, t, cond["guidance"], concepts)

    def _sample(self, velocity, latents: Tensor, timesteps: list[int], seed: int, progress: bool) -> Tensor:
        """DDIM or DPM steps as CogVideoXPipeline: the DPM noise comes from the generator that drew the latents."""
        from tqdm.auto import tqdm

        generator = torch.Generator("cpu").manual_seed(seed)
        torch.randn(latents.shape, generator=generator, dtype=self.dtype)  # the starting latents' draw, in its dtype
        alphas = self.schedule.alphas_cumprod()
        num_steps, previous_x0 = len(timesteps), None
        work = torch.promote_types(self.dtype, torch.float32)  # steps in float32 at least (float64 stays)
        for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress)):
            t_vec = torch.full((latents.shape[0],), t, device=latents.device, dtype=torch.int64)
            v = velocity(latents, t_vec)
            if self.schedule.sampler == "ddim":
                latents = ddim_step(self.schedule, alphas, v, t, latents.to(work), num_steps)
            else:
                back = timesteps[i - 1] if i > 0 else None
                latents, previous_x0 = dpm_step(self.schedule, alphas, v, previous_x0, t, back, latents.to(work),
                                                num_steps, generator)  # fmt: skip
            latents = latents.to(self.dtype)
        return latents

    def _decode(self, latents: Tensor, height: int, width: int) -> list[Image.Image]:
        z = latents.permute(0, 2, 1, 3, 4).to(next(self.autoencoder.parameters()).dtype)  # (1, Z, F, h, w)
        video = self.autoencoder.decode(z)[0]  # (3, frames, H, W)
        self._check_finite(video, "decoded video")
        return [imaging.to_pil(video[:, i]) for i in range(video.shape[1])]

    def _result(self, frames, concepts, collector: MapCollector, height, width, settings, record) -> VideoResult:
        count = latent_frames(self._frames)
        h, w = height // 16, width // 16
        maps = (collector.total / collector.count).reshape(len(concepts), count, h, w)
        record = {**record, "frames": len(frames), "latent_frames": count}
        return VideoResult(frames[0], concepts, maps, settings, record, collector.layers, None, frames=frames)

    # ---- explain: a clip ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def explain(self, video, concepts: list[str], prompt: str = "", t: float = 0.5, num_samples: int = 1,
                seed: int = 0, settings: Settings = Settings(), keep_grid: bool = False,
                size: tuple[int, int] | None = None, progress: bool = True,
                guidance: float | None = None) -> VideoResult:  # fmt: skip
        """Maps for a given clip: a path (animated GIF/WebP, a folder of frames) or a list of PIL frames. The frames
        are cut to 1 + 4k and resized to `size` (default: the first frame's, long side at most 720, multiples of 16)."""
        from video import load_video

        concepts = check_concepts(concepts)
        settings = family_settings(settings, self.family)  # "official" on CogVideoX is its own; options checked
        check_count(num_samples, "num_samples", 1, MAX_SAMPLES)
        t = check_t(t)
        check_seed(seed, num_samples)
        check_flag(progress, "progress")
        if size is not None and (not isinstance(size, (tuple, list)) or len(size) != 2):
            raise ValueError(f"size = {size!r}: give (height, width), two multiples of 16")
        if guidance is not None:
            check_guidance(guidance)
        if isinstance(video, (str, Path)):
            frames = load_video(video)
        elif isinstance(video, (list, tuple)) and video and all(isinstance(f, Image.Image) for f in video):
            frames = list(video)
        else:
            raise ValueError(f"video must be a path or a non-empty list of PIL images, got {type(video).__name__}")
        if len({f.size for f in frames}) > 1:  # as for a folder of frames: resizing each would distort some
            raise ValueError(f"the frames differ in size ({sorted({f.size for f in frames})[:3]}); give frames of one "
                             "size")  # fmt: skip
        frames = frames[: 1 + TIME_FACTOR * ((len(frames) - 1) // TIME_FACTOR)]
        self._frames = len(frames)
        size = size or imaging.auto_size(frames[0].height, frames[0].width, self.native_size)
        check_size(*size)
        frames = [imaging.to_rgb(f).resize((size[1], size[0]), Image.BICUBIC) for f in frames]
        height, width = size
        if settings.steps is not None and max(settings.steps) >= num_samples:
            raise ValueError(f"steps {list(settings.steps)} select noise samples; there are only {num_samples}")
        self._check_memory(height, width)
        collector, concept_input = self._prepare(prompt, concepts, settings, keep_grid)
        cond = self._explain_conditioning(prompt, 0.0, height, width)
        clip = torch.stack([imaging.to_tensor(f) * 2 - 1 for f in frames], dim=1)[None]  # (1, 3, F, H, W)
        ae_dtype = next(self.autoencoder.parameters()).dtype
        z0 = self.autoencoder.encode(clip.to(self.device, ae_dtype)).permute(0, 2, 1, 3, 4).float()  # (1, F', Z, h, w)
        self._check_finite(z0, "encoded video")
        timestep = round(t * (self.schedule.num_train_timesteps - 1))
        alpha = self.schedule.alphas_cumprod()[timestep].float()
        t_vec = torch.full((1,), timestep, device=self.device, dtype=torch.int64)
        for i in range(num_samples):
            noise = self._initial_latents(height, width, seed + i).float()
            x_t = (alpha.sqrt() * z0 + (1 - alpha).sqrt() * noise).to(self.dtype)
            if collector.wants(i):
                out = self.transformer(x_t, t_vec, cond["context"], concepts=concept_input, stop_after_concepts=True)
                collector.add(out.saliency)
        record = {"mode": "explain", "model": self.source, "family": self.family, "prompt": prompt,
                  "height": height, "width": width, "t": t, "timestep": timestep, "num_samples": num_samples,
                  "seed": seed}  # fmt: skip
        result = self._result(frames, concepts, collector, height, width, settings, record)
        self._check_finite(result.maps, "concept maps")
        return result


def cogvideox_facts(source: str | Path):
    """What the command line checks its arguments against, from the headers and small files of a CogVideoX
    snapshot (no weights read)."""
    import weights
    from commands import ModelFacts
    from weights.configs import count_blocks

    found = weights.locate(source, "cogvideox")
    tensors = weights.read_weights(found)
    embed = tensors.get("patch_embed.proj.weight")
    return ModelFacts(
        str(source), count_blocks(tensors, "transformer_blocks"), embed.shape[0] if embed else 3072, 128, MAX_LENGTH,
        max(NATIVE), weights.load_t5_tokenizer(source, component="cogvideox_t5_tokenizer"), STEPS, "blocks",
        family="cogvideox", native_shape=NATIVE,
    )  # fmt: skip
