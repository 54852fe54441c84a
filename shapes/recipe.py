"""The recipe of a shapes model: one frozen dataclass whose fields are `shapes.train`'s flags, and the configs of the
models it builds (Flux, T5, the autoencoder) and of the scenes it draws."""

import argparse
import dataclasses
import math
from dataclasses import dataclass

from autoencoder import AutoEncoderConfig
from mmdit import FluxConfig
from shapes.scenes import WORLDS, SceneConfig
from t5 import T5Config

# fields that must be > 0, >= 0, or a probability in [0, 1] (checked with their types in Recipe.__post_init__)
POSITIVE = ("size", "max_length", "scenes", "ae_batch", "ae_size", "ae_full_batch", "ae_lr", "hidden", "heads",
            "depth", "t5_dim", "steps", "batch", "lr", "caption_variants", "sample_steps", "eval_every",
            "eval_scenes")  # fmt: skip
COUNTS = ("ae_steps", "ae_full_steps", "single", "t5_layers", "warmup")
KINDS = {int: "a whole number", float: "a finite number", bool: "true or false", str: "a string"}
SHARES = ("background_phrase", "single_word", "colourless", "positions", "isolate", "isolate_anneal")


@dataclass(frozen=True)
class Recipe:
    size: int = 128  # image size; the transformer sees (size / 16)^2 tokens
    world: str = "full"  # the scenes' vocabulary, a key of shapes.scenes.WORLDS ("simple": 3 shapes, 3 colours, black)
    max_length: int = 32  # T5 tokens per caption (a concept is padded to this length too); longest caption: 28
    scenes: int = 6000  # cached training scenes, seeds 0 .. scenes - 1
    background_phrase: float = 0.5  # probability that a caption names the background
    single_word: float = 0.5  # probability that a one-shape scene is captioned by its shape word alone
    colourless: float = 0.0  # probability that a caption leaves out the colours
    positions: float = 1.0  # probability that a caption says where each shape is
    # autoencoder
    ae_steps: int = 800
    ae_batch: int = 16
    ae_size: int = 32  # first phase: whole scenes drawn this small (a multiple of 8)
    ae_full_steps: int = 300  # second phase: full-size scenes
    ae_full_batch: int = 4
    ae_lr: float = 2e-3
    # transformer and text encoder
    hidden: int = 128
    heads: int = 4
    depth: int = 4  # double-stream blocks
    single: int = 1  # single-stream blocks
    t5_dim: int = 64
    t5_layers: int = 2
    steps: int = 2000
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 200
    t_sampler: str = "logit_normal"  # logit_normal | uniform
    t_mean: float = 1.0  # location of the logit-normal: > 0 trains more at high noise, where the caption decides
    isolate: float = 0.0  # share of training samples whose image tokens attend only to themselves and the text
    isolate_anneal: float = 0.0  # if > 0: the share falls linearly from `isolate` to 0 over this fraction of the steps
    caption_variants: int = 8  # captions drawn per training scene (with the options above), one picked per step
    bf16: bool = False  # bf16 autocast for the training forward (weights and optimizer stay float32)
    compile: bool = False  # torch.compile the transformer for training
    eval_isolated: bool = False  # evaluate with image tokens isolated (the regime of a model trained with isolate 1)
    sample_steps: int = 20  # the model's own sampling defaults (Euler steps, shifted schedule or not), used by
    sample_shift: bool = False  # `generate --model` when the user does not set them
    eval_every: int = 500
    eval_scenes: int = 100
    eval_split: str = "test"  # the held-out scenes of the evaluations: "test" or "validation" (shapes.scenes)
    light_checkpoints: bool = False  # checkpoints and step weights in bf16, no optimizer state (small enough to
    # commit); resuming one restarts AdamW with a short warm-up (shapes.train.REWARM steps)

    def __post_init__(self):
        for field in dataclasses.fields(self):  # types first: a JSON "128" or a bool where a count goes is refused
            value, kind = getattr(self, field.name), type(field.default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, field.name, value)
            if type(value) is not kind or (kind is float and not math.isfinite(value)):
                raise ValueError(f"{field.name} = {value!r}: expected {KINDS[kind]}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if type(value) is int and value > 2**31 - 1:  # counts beyond a C int overflow torch and numpy calls
                raise ValueError(f"{field.name} = {value}: too large (at most {2**31 - 1})")
        if self.sample_steps > 1000:
            raise ValueError(f"sample_steps = {self.sample_steps}: the pipeline samples with at most 1000 steps")
        for name in POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in COUNTS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in SHARES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability, in [0, 1]; got {getattr(self, name)}")
        if self.t5_dim % 16:
            raise ValueError(f"t5_dim must be a multiple of 16 (T5 heads of 16 dims), got {self.t5_dim}")
        if self.size % 16:
            raise ValueError(f"size must be a multiple of 16 (8 for the autoencoder x 2 for packing), got {self.size}")
        if self.ae_size % 8:
            raise ValueError(f"ae_size must be a multiple of the autoencoder's factor 8, got {self.ae_size}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 8:
            raise ValueError(f"hidden / heads must be a multiple of 8 (RoPE axes), got {self.hidden} / {self.heads}")
        if self.world not in WORLDS:
            raise ValueError(f"world must be one of {sorted(WORLDS)}, got {self.world!r}")
        if not 0.0 <= self.isolate <= 1.0:
            raise ValueError(f"isolate is a share of the samples, got {self.isolate}")
        if not 0.0 <= self.isolate_anneal <= 1.0:
            raise ValueError(f"isolate_anneal is a fraction of the steps, got {self.isolate_anneal}")
        if self.caption_variants < 1:
            raise ValueError(f"caption_variants must be at least 1, got {self.caption_variants}")
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be at least 1, got {self.sample_steps}")
        if self.eval_split not in ("test", "validation"):
            raise ValueError(f"eval_split must be test or validation, got {self.eval_split!r}")
        if self.t_sampler not in ("logit_normal", "uniform"):
            raise ValueError(f"t_sampler must be logit_normal or uniform, got {self.t_sampler!r}")


def scene_config(recipe: Recipe, size: int | None = None, **captions: float) -> SceneConfig:
    """The scenes of `recipe`'s world at `size` (default: the recipe's), with caption options `captions`."""
    return SceneConfig(size=size or recipe.size, **WORLDS[recipe.world], **captions)


def flux_config(recipe: Recipe) -> FluxConfig:
    head_dim = recipe.hidden // recipe.heads
    axis = 3 * head_dim // 8  # rows and columns get 3/8 of the head each, the unused first axis 1/4 (Flux: 16/56/56)
    return FluxConfig(
        in_channels=64,
        out_channels=64,
        vec_in_dim=1,  # the pooled vector is always zero here
        context_in_dim=recipe.t5_dim,
        hidden_size=recipe.hidden,
        mlp_ratio=4.0,
        num_heads=recipe.heads,
        depth=recipe.depth,
        depth_single_blocks=recipe.single,
        axes_dim=(head_dim - 2 * axis, axis, axis),
        theta=10_000,
        qkv_bias=True,
        guidance_embed=False,
    )


def t5_config(recipe: Recipe, vocab_size: int) -> T5Config:
    return T5Config(
        vocab_size=vocab_size,
        d_model=recipe.t5_dim,
        d_kv=16,
        d_ff=2 * recipe.t5_dim,
        num_layers=recipe.t5_layers,
        num_heads=recipe.t5_dim // 16,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        layer_norm_epsilon=1e-6,
    )


def ae_config(recipe: Recipe, scale_factor: float = 1.0, shift_factor: float = 0.0) -> AutoEncoderConfig:
    return AutoEncoderConfig(
        resolution=recipe.size,
        in_channels=3,
        ch=32,
        out_ch=3,
        ch_mult=(1, 1, 1, 1),
        num_res_blocks=1,
        z_channels=16,
        scale_factor=scale_factor,
        shift_factor=shift_factor,
    )


def lr_at(step: int, recipe_steps: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, recipe_steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Recipe field (`--t5-layers 0`, `--bf16 true`), defaulting to the field's default."""
    for field in dataclasses.fields(Recipe):
        kind = type(field.default)
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=parse_bool if kind is bool else kind, default=field.default
        )


def recipe_from(args: argparse.Namespace) -> Recipe:
    """The Recipe of parsed `add_recipe_flags` flags."""
    return Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
