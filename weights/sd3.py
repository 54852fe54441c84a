"""Stable Diffusion 3.5 checkpoints: the family of a source, the MM-DiT's config and rule tables, and its loaders.

Follows the two layouts of `stabilityai/stable-diffusion-3.5-large` (-large-turbo, -medium): Stability AI's single
file (`sd3.5_large_turbo.safetensors`: the MM-DiT under `model.diffusion_model.`, whose names are `sd3.SD3`'s, and the
autoencoder under `first_stage_model.`, whose names are `autoencoder.AutoEncoder`'s) and the diffusers folders
(`transformer/`, `vae/`, `text_encoder{,_2,_3}/`, `tokenizer{,_2,_3}/`). Differs from diffusers' single-file
converter (`convert_sd3_transformer_checkpoint_to_diffusers`) in: the rules pull diffusers' tensors into SAI's names,
so the fused qkv is stacked from to_q/to_k/to_v rows and the two (scale, shift) adaLN halves of diffusers'
`AdaLayerNormContinuous` (the final layer and the last block's text stream) are swapped back to SAI's (shift, scale).

Notable features: the family of a checkpoint is read from it (`model_index.json`, the transformer's config class, or
the key names of a single file), never from the repo id.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import autoencoder
import sd3

from .configs import count_blocks, reading, shape_reader
from .convert import Rule
from .errors import CheckpointError
from .files import TensorInfo, read_config, read_weights
from .find import cached_snapshot, hub_cache_dir, hub_offline, locate

SINGLE_FILE_PREFIX = "model.diffusion_model."
AE_PREFIX = "first_stage_model."
FAMILIES = {"FluxPipeline": "flux", "FluxTransformer2DModel": "flux", "StableDiffusion3Pipeline": "sd3",
            "SD3Transformer2DModel": "sd3", "CogVideoXPipeline": "cogvideox",
            "CogVideoXTransformer3DModel": "cogvideox"}  # fmt: skip


def family_of_keys(keys) -> str | None:
    """ "sd3" for SAI's key names (joint_blocks), "flux" for BFL's (double_blocks), None when neither."""
    for key in keys:
        if key.startswith((SINGLE_FILE_PREFIX + "joint_blocks.", "joint_blocks.")):
            return "sd3"
        if key.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")):
            return "flux"
    return None


def family_of_folder(folder: Path) -> str | None:
    for config in (folder / "model_index.json", folder / "transformer" / "config.json", folder / "config.json"):
        if config.is_file():
            try:
                name = json.loads(config.read_text()).get("_class_name")
            except (ValueError, AttributeError) as error:
                raise CheckpointError(f"{config} is not valid JSON ({error}); replace it with an intact copy") from None
            if name in FAMILIES:
                return FAMILIES[name]
    for file in sorted(folder.glob("*.safetensors")):
        from .find import Found, Layout

        found = Found(folder, Layout("file", file=file.name), (file.name,))
        if (family := family_of_keys(read_weights(found))) is not None:
            return family
    return None


def family(source: str | Path) -> str:
    """Which model family a source holds: "flux" (FLUX.1, the built-in shapes model), "sd3" (SD3.5) or "cogvideox"."""
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"the model source {source!r} is a {type(source).__name__}; give a hub id or a path")
    path = Path(source).expanduser()
    if path.is_file():
        from .find import Found, Layout

        keys = read_weights(Found(path.parent, Layout("file", file=path.name), (path.name,)))
        return family_of_keys(keys) or "flux"
    if path.is_dir():
        return family_of_folder(path) or "flux"
    repo = str(source)
    snapshot = cached_snapshot(repo, hub_cache_dir()) if re.fullmatch(r"[\w.-]+/[\w.-]+", repo) else None
    if snapshot is not None and (found := family_of_folder(snapshot)) is not None:
        return found
    if snapshot is None and not hub_offline() and re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(repo, "model_index.json", cache_dir=hub_cache_dir()))
            return FAMILIES.get(json.loads(index.read_text()).get("_class_name"), "flux")
        except Exception:  # no model_index.json (a BFL-only repo), no network: the Flux loaders say what is missing
            return "flux"
    return "flux"


def sd3_from_diffusers(depth: int, dual: tuple[int, ...]) -> tuple[Rule, ...]:
    """Diffusers `SD3Transformer2DModel` -> SAI names (the inverse of diffusers' single-file converter)."""
    jb, tb = r"joint_blocks\.(\d+)\.", "transformer_blocks.{0}."
    last = depth - 1
    return (
        (r"pos_embed", "pos_embed.pos_embed"),
        (r"x_embedder\.proj\.(\w+)", "pos_embed.proj.{0}"),
        (r"t_embedder\.mlp\.0\.(\w+)", "time_text_embed.timestep_embedder.linear_1.{0}"),
        (r"t_embedder\.mlp\.2\.(\w+)", "time_text_embed.timestep_embedder.linear_2.{0}"),
        (r"y_embedder\.mlp\.0\.(\w+)", "time_text_embed.text_embedder.linear_1.{0}"),
        (r"y_embedder\.mlp\.2\.(\w+)", "time_text_embed.text_embedder.linear_2.{0}"),
        # the last block's text stream is diffusers' AdaLayerNormContinuous: (scale, shift), SAI's (shift, scale)
        (rf"joint_blocks\.{last}\.context_block\.adaLN_modulation\.1\.(\w+)",
         (f"transformer_blocks.{last}.norm1_context.linear.{{0}}[1/2]",
          f"transformer_blocks.{last}.norm1_context.linear.{{0}}[0/2]")),
        (jb + r"x_block\.adaLN_modulation\.1\.(\w+)", tb + "norm1.linear.{1}"),
        (jb + r"context_block\.adaLN_modulation\.1\.(\w+)", tb + "norm1_context.linear.{1}"),
        (jb + r"x_block\.attn\.qkv\.(\w+)", tuple(tb + f"attn.to_{x}.{{1}}" for x in "qkv")),
        (jb + r"context_block\.attn\.qkv\.(\w+)", tuple(tb + f"attn.add_{x}_proj.{{1}}" for x in "qkv")),
        (jb + r"x_block\.attn2\.qkv\.(\w+)", tuple(tb + f"attn2.to_{x}.{{1}}" for x in "qkv")),
        (jb + r"x_block\.attn\.ln_(q|k)\.weight", tb + "attn.norm_{1}.weight"),
        (jb + r"context_block\.attn\.ln_(q|k)\.weight", tb + "attn.norm_added_{1}.weight"),
        (jb + r"x_block\.attn2\.ln_(q|k)\.weight", tb + "attn2.norm_{1}.weight"),
        (jb + r"x_block\.attn\.proj\.(\w+)", tb + "attn.to_out.0.{1}"),
        (jb + r"x_block\.attn2\.proj\.(\w+)", tb + "attn2.to_out.0.{1}"),
        (jb + r"context_block\.attn\.proj\.(\w+)", tb + "attn.to_add_out.{1}"),
        (jb + r"x_block\.mlp\.fc1\.(\w+)", tb + "ff.net.0.proj.{1}"),
        (jb + r"x_block\.mlp\.fc2\.(\w+)", tb + "ff.net.2.{1}"),
        (jb + r"context_block\.mlp\.fc1\.(\w+)", tb + "ff_context.net.0.proj.{1}"),
        (jb + r"context_block\.mlp\.fc2\.(\w+)", tb + "ff_context.net.2.{1}"),
        (r"final_layer\.linear\.(\w+)", "proj_out.{0}"),
        (r"final_layer\.adaLN_modulation\.1\.(\w+)", ("norm_out.linear.{0}[1/2]", "norm_out.linear.{0}[0/2]")),
    )  # fmt: skip


def sd3_config_from_diffusers(cfg: dict, where: str) -> sd3.SD3Config:
    """transformer/config.json (SD3Transformer2DModel)."""
    with reading(where, "SD3Transformer2DModel"):
        if cfg.get("qk_norm") != "rms_norm":
            raise CheckpointError(
                f"{where}: qk_norm {cfg.get('qk_norm')!r}; only SD3.5 (qk_norm 'rms_norm') is supported, not SD3.0"
            )
        return sd3.SD3Config(
            in_channels=cfg["in_channels"],
            out_channels=cfg.get("out_channels") or cfg["in_channels"],
            hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"],
            num_heads=cfg["num_attention_heads"],
            depth=cfg["num_layers"],
            pos_embed_max_size=cfg["pos_embed_max_size"],
            joint_attention_dim=cfg["joint_attention_dim"],
            pooled_projection_dim=cfg["pooled_projection_dim"],
            patch_size=cfg.get("patch_size", 2),
            dual_attention_layers=tuple(cfg.get("dual_attention_layers") or ()),
        )


def sd3_config_from_shapes(tensors: dict[str, TensorInfo], where: str, prefix: str) -> sd3.SD3Config:
    """The MM-DiT's config from the tensor shapes of SAI's single file (keys under `prefix`)."""
    shape = shape_reader(tensors, where, "Stable Diffusion 3.5")
    hidden, in_channels, patch = shape(prefix + "x_embedder.proj.weight")[:3]
    depth = count_blocks(tensors, prefix + "joint_blocks")
    head_dim = shape(prefix + "joint_blocks.0.x_block.attn.ln_q.weight")[0]
    dual = tuple(i for i in range(depth) if f"{prefix}joint_blocks.{i}.x_block.attn2.qkv.weight" in tensors)
    return sd3.SD3Config(
        in_channels=in_channels,
        out_channels=shape(prefix + "final_layer.linear.weight")[0] // patch**2,
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        pos_embed_max_size=round(shape(prefix + "pos_embed")[1] ** 0.5),
        joint_attention_dim=shape(prefix + "context_embedder.weight")[1],
        pooled_projection_dim=shape(prefix + "y_embedder.mlp.0.weight")[1],
        patch_size=patch,
        mlp_ratio=shape(prefix + "joint_blocks.0.x_block.mlp.fc1.weight")[0] / hidden,
        dual_attention_layers=dual,
    )


def load_sd3(source: str | Path, device=None, dtype=None) -> sd3.SD3:
    """The SD3.5 MM-DiT from a hub repo id, a snapshot folder (diffusers `transformer/` or SAI's single file) or a
    single file."""
    from . import build

    found = locate(source, "sd3")
    tensors = read_weights(found)
    if found.layout.kind == "folder":
        config = sd3_config_from_diffusers(read_config(found) or {}, found.where)
        rules, ignore = sd3_from_diffusers(config.depth, config.dual_attention_layers), ()
    else:
        prefix = SINGLE_FILE_PREFIX if any(k.startswith(SINGLE_FILE_PREFIX) for k in tensors) else ""
        config = sd3_config_from_shapes(tensors, found.where, prefix)
        rules = ((r"(.+)", prefix + "{0}"),) if prefix else ()
        ignore = (rf"(?!{re.escape(prefix)}).*",) if prefix else ()
    return build(sd3.SD3, config, "sd3", found, tensors, rules, device, dtype, ignore)


def load_sd3_autoencoder(source: str | Path, device=None, dtype=None) -> autoencoder.AutoEncoder:
    """SD3.5's autoencoder: diffusers `vae/` (its config gives scale 1.5305 and shift 0.0609) or the single file's
    `first_stage_model.` tensors (the "sd3" preset's scale and shift; widths from the shapes)."""
    from . import build, load_autoencoder
    from .configs import ae_config_from_shapes

    found = locate(source, "sd3_autoencoder")
    if found.layout.kind == "folder":
        return load_autoencoder(found.root, device, dtype)
    tensors = read_weights(found)
    stripped = {k.removeprefix(AE_PREFIX): v for k, v in tensors.items() if k.startswith(AE_PREFIX)}
    if not stripped:
        raise CheckpointError(f"{found.where} holds no autoencoder (no {AE_PREFIX}* tensors)")
    preset = autoencoder.CONFIGS["sd3"]
    config = replace(ae_config_from_shapes(stripped, found.where), scale_factor=preset.scale_factor,
                     shift_factor=preset.shift_factor)  # fmt: skip
    rules = ((r"(.+)", AE_PREFIX + "{0}"),)
    ignore = (rf"(?!{re.escape(AE_PREFIX)}).*",)
    return build(autoencoder.AutoEncoder, config, "autoencoder", found, tensors, rules, device, dtype, ignore)
