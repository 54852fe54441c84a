"""Model configs read from the checkpoint: its `config.json`, a sidecar, or the tensor shapes of a BFL file.

Follows the config fields of diffusers' `FluxTransformer2DModel` and `AutoencoderKL` and of transformers' `T5Config`
and `CLIPTextConfig`, mapped onto our frozen config dataclasses. Differs from `from_pretrained` in: a BFL single file,
which has no config, gets every size from its tensor shapes (widths, depths, head dim, MLP ratio, channel multipliers,
the presence of biases and of the guidance embedding); the presets fill only what neither the config nor the shapes
say (RoPE axes and theta; the autoencoder's resolution and, for BFL files, its latent scale and shift).

Notable features: a config that lacks a needed key, or asks for something the models do not implement (a patch size
other than 1, another GroupNorm group count), is a `CheckpointError` that names the key and the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import autoencoder
import mmdit
from checks import model_recipe

from .errors import CheckpointError
from .files import TensorInfo
from .find import sidecar_name


@contextmanager
def reading(where: str, what: str) -> Iterator[None]:
    """A key missing from a config.json, or a value of the wrong type or range (a string or a list where a number goes,
    a list as the config, a size the config dataclass refuses), met while reading it: one `CheckpointError` that names
    the file. The readers' own `CheckpointError`s pass as they are."""
    try:
        yield
    except CheckpointError:
        raise
    except KeyError as error:
        raise CheckpointError(f"{where}: config.json has no {error} (is it a {what} config?)") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as error:
        raise CheckpointError(f"{where}: config.json holds a value of the wrong type or range ({error})") from None


def shape_reader(tensors: dict[str, TensorInfo], where: str, what: str) -> Callable[[str], tuple[int, ...]]:
    def shape(key: str) -> tuple[int, ...]:
        if key not in tensors:
            first = ", ".join(list(tensors)[:4])
            raise CheckpointError(f"{where} is not a {what} checkpoint: it has no {key} (its first tensors: {first})")
        return tensors[key].shape

    return shape


def count_blocks(tensors: dict[str, TensorInfo], prefix: str) -> int:
    """1 + the largest i of the tensors named `{prefix}.{i}.*` (0 when there are none)."""
    indices = [int(m[1]) for key in tensors if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", key))]
    return max(indices, default=-1) + 1


def rope_preset(head_dim: int, where: str) -> mmdit.FluxConfig:
    """The first preset whose RoPE axes fit the head dim: the shapes say nothing about axes_dim and theta."""
    for preset in mmdit.CONFIGS.values():
        if sum(preset.axes_dim) == head_dim:
            return preset
    raise CheckpointError(f"{where}: head dim {head_dim} fits no preset's RoPE axes_dim; add a preset to mmdit.CONFIGS")


def flux_config_from_shapes(tensors: dict[str, TensorInfo], where: str) -> mmdit.FluxConfig:
    """Every size of a BFL file from its tensor shapes; RoPE axes and theta from the preset with that head dim."""
    if "x_embedder.weight" in tensors:
        raise CheckpointError(f"{where} holds diffusers tensor names: load its folder (with transformer/config.json)")
    shape = shape_reader(tensors, where, "BFL Flux transformer")
    hidden, in_channels = shape("img_in.weight")
    depth, single = count_blocks(tensors, "double_blocks"), count_blocks(tensors, "single_blocks")
    block = "double_blocks.0.img_attn.norm." if depth else "single_blocks.0.norm."
    head_dim = shape(block + "query_norm.scale")[0]
    mlp_hidden = (
        shape("double_blocks.0.img_mlp.0.weight")[0]
        if depth
        else shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
    )
    preset = rope_preset(head_dim, where)
    return mmdit.FluxConfig(
        in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight")[0],
        vec_in_dim=shape("vector_in.in_layer.weight")[1],
        context_in_dim=shape("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=single,
        axes_dim=preset.axes_dim,
        theta=preset.theta,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in tensors if depth else preset.qkv_bias,
        guidance_embed="guidance_in.in_layer.weight" in tensors,
    )


def flux_config_from_diffusers(cfg: dict, tensors: dict[str, TensorInfo], where: str) -> mmdit.FluxConfig:
    """transformer/config.json; the MLP width and the qkv bias (fixed in diffusers' code) from the shapes."""
    with reading(where, "FluxTransformer2DModel"):
        if cfg.get("patch_size", 1) != 1:
            raise CheckpointError(f"{where}: patch_size {cfg['patch_size']} is not supported (Flux uses 1)")
        hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        preset = rope_preset(cfg["attention_head_dim"], where) if "axes_dims_rope" not in cfg else None
        mlp = "transformer_blocks.0.ff.net.0.proj.weight"
        return mmdit.FluxConfig(
            in_channels=cfg["in_channels"],
            out_channels=cfg.get("out_channels") or cfg["in_channels"],
            vec_in_dim=cfg["pooled_projection_dim"],
            context_in_dim=cfg["joint_attention_dim"],
            hidden_size=hidden,
            mlp_ratio=tensors[mlp].shape[0] / hidden if mlp in tensors else 4.0,
            num_heads=cfg["num_attention_heads"],
            depth=cfg["num_layers"],
            depth_single_blocks=cfg["num_single_layers"],
            axes_dim=tuple(cfg["axes_dims_rope"]) if preset is None else preset.axes_dim,
            theta=preset.theta if preset is not None else mmdit.CONFIGS["flux-schnell"].theta,
            qkv_bias="transformer_blocks.0.attn.to_q.bias" in tensors or not cfg["num_layers"],
            guidance_embed=bool(cfg.get("guidance_embeds", False)),
        )


def ae_config_from_shapes(tensors: dict[str, TensorInfo], where: str) -> autoencoder.AutoEncoderConfig:
    """Widths, depth and channels of a BFL autoencoder from its shapes; resolution and latent scale/shift from the
    "flux" preset (no tensor holds them)."""
    shape = shape_reader(tensors, where, "BFL autoencoder")
    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = count_blocks(tensors, "encoder.down")
    return replace(
        autoencoder.CONFIGS["flux"],
        in_channels=in_channels,
        ch=ch,
        out_ch=shape("decoder.conv_out.weight")[0],
        ch_mult=tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels)),
        num_res_blocks=count_blocks(tensors, "encoder.down.0.block"),
        z_channels=shape("decoder.conv_in.weight")[1],
    )


def ae_config_from_diffusers(cfg: dict, where: str) -> autoencoder.AutoEncoderConfig:
    """vae/config.json (AutoencoderKL); the resolution from the "flux" preset (informational)."""
    # quant convs or a missing mid attention show up as unexpected or missing tensors; GroupNorm has no shape
    with reading(where, "AutoencoderKL"):
        if cfg.get("norm_num_groups", autoencoder.NUM_GROUPS) != autoencoder.NUM_GROUPS:
            raise CheckpointError(
                f"{where}: norm_num_groups {cfg['norm_num_groups']}, the model has {autoencoder.NUM_GROUPS}"
            )
        widths = cfg["block_out_channels"]
        return replace(
            autoencoder.CONFIGS["flux"],
            in_channels=cfg["in_channels"],
            ch=widths[0],
            out_ch=cfg["out_channels"],
            ch_mult=tuple(w // widths[0] for w in widths),
            num_res_blocks=cfg["layers_per_block"],
            z_channels=cfg["latent_channels"],
            scale_factor=cfg["scaling_factor"],
            shift_factor=cfg.get("shift_factor") or 0.0,
        )


def config_from_json(cls: type, cfg: dict, where: str, defaults: dict | None = None):
    """A config dataclass from a JSON whose keys include its field names (transformers' config.json for T5 and CLIP;
    a sidecar written from the dataclass itself); fields with a default may be absent. A value of the wrong type
    ("hidden_size": "128", a list where a number goes) is a `CheckpointError` that names the field."""
    where = config_file(where)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where} is a JSON {type(cfg).__name__}, not an object of settings")
    values = {**(defaults or {}), **cfg}
    fields = [f for f in dataclasses.fields(cls) if f.init]
    missing = [f.name for f in fields if f.name not in values and f.default is dataclasses.MISSING]
    if missing:
        raise CheckpointError(f"{where} has no {', '.join(missing)} (needed for {cls.__name__})")
    hints = typing.get_type_hints(cls)
    for f in fields:
        if f.name in values and not fits(values[f.name], hints.get(f.name)):
            raise CheckpointError(f"{where}: {f.name} = {values[f.name]!r} is not {describe_type(hints[f.name])}")
    try:
        return cls(**{f.name: values[f.name] for f in fields if f.name in values})
    except TypeError as error:  # a type the check above does not know, met in the config's own checks
        raise CheckpointError(f"{where} holds a value of the wrong type ({error})") from None


def settings_object(cfg, where: str) -> dict | None:
    """A config read from JSON (or None, when there is none), refused unless it is a JSON object of settings."""
    if cfg is not None and not isinstance(cfg, dict):
        raise CheckpointError(f"{config_file(where)} is a JSON {type(cfg).__name__}, not an object of settings")
    return cfg


def tokenizer_length(folder: Path, length: int, source) -> int:
    """`length`, or less when `folder/tokenizer_config.json` says a smaller `model_max_length`; a damaged file or
    value is a `CheckpointError` that names it. Without the file, this project's own models (a recipe.json with
    "max_length") use their recipe's length: the T5 encodings depend on it (no attention mask)."""
    path = folder / "tokenizer_config.json"
    if not path.exists():
        recipe = model_recipe(source).get("max_length")
        return min(length, recipe) if recipe else length
    fix = f"restore it, or remove it to use {length} tokens"
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is damaged ({type(error).__name__}: {error}); {fix}") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path} is a JSON {type(settings).__name__}, not an object of settings; {fix}")
    value = settings.get("model_max_length", length)
    try:
        value = int(value)
    except (ValueError, TypeError, OverflowError):
        value = None
    if value is None or value < 1:
        raise CheckpointError(f"{path}: model_max_length = {settings['model_max_length']!r} is not a whole number "
                              f"of tokens; {fix}")  # fmt: skip
    return min(length, value)


def config_file(where: str) -> str:
    """The config beside a weights file: `{stem}_config.json` (a sidecar) or `config.json`, else the file itself."""
    path = Path(where)
    for candidate in (path.with_name(sidecar_name(path.name)), path.with_name("config.json")):
        if candidate.is_file():
            return str(candidate)
    return where


def fits(value, hint) -> bool:
    """Whether a JSON value fits a config field's type: int (not bool), float (int too; finite), bool, str, None,
    tuple[int, ...] (a list or tuple of them) and unions of these; other hints are not checked."""
    if hint is None or hint is typing.Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        return len(kinds) == len(value) and all(fits(v, k) for v, k in zip(value, kinds, strict=True))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True


def describe_type(hint) -> str:
    names = {int: "a whole number", float: "a finite number", bool: "true or false", str: "a string"}
    if typing.get_origin(hint) is tuple:
        return "a list of numbers"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) if a is not type(None) else "null" for a in typing.get_args(hint))
    return names.get(hint, str(hint))


def single_file_config(cls: type, cfg: dict | None, tensors: dict[str, TensorInfo], where: str, from_shapes: Callable):
    """The config of a single file: its sidecar (written from the dataclass `cls`) when it has one, else
    `from_shapes(tensors, where)` (a BFL file)."""
    if cfg is not None:
        return config_from_json(cls, cfg, where)
    return from_shapes(tensors, where)
