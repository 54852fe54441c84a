"""Find and load FLUX.1 checkpoints: a hub repo id, a local snapshot folder, or one `.safetensors` file.

Follows the two layouts of `black-forest-labs/FLUX.1-schnell` (checkpoints.md sections 1 and 8): the BFL single files
(`flux1-schnell.safetensors`, `ae.safetensors`), whose tensor names are our modules' names, and the diffusers folders
(`transformer/` sharded with its index JSON, `vae/`, `text_encoder/`, sharded `text_encoder_2/`, `tokenizer/`,
`tokenizer_2/`); also this project's own single files with a sidecar config (`flux.safetensors` + `flux_config.json`,
`ae.safetensors`, `t5.safetensors`: the built-in shapes model). Differs from the diffusers and transformers loaders in:
- one code path for every component and layout; diffusers names are converted in one place, a small table per model;
- the model is built on the meta device and filled one tensor at a time: left memory-mapped where it is wanted on the
  CPU as it is stored (and starts on a 64-byte boundary), else read on its own with a plain file read, then moved to
  the target device and dtype: host memory stays about one model, with no second copy;
- strict: every missing, unexpected or mis-shaped tensor is found before any data is read and reported in one error;
  values are not scanned (that reads every weight: x1.2 of the load): each model records its file, which the pipelines'
  `checks.check_run_finite` names, with the tensor, when a run turns NaN;
- the config comes from the checkpoint (`config.json` or a sidecar, else the tensor shapes of a BFL file); presets fill
  only what neither says (RoPE axes and theta; the autoencoder's latent scale and shift).

The package: `find.py` finds a component's files (folder, hub cache, hub download), `files.py` reads safetensors
headers and indexes and fills a model one tensor at a time, `convert.py` holds the diffusers rule tables and the load
plan, `configs.py` reads configs; this file holds the public loaders. Damaged or missing files raise errors that say
what was expected and give the `hf download` command that fetches it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import autoencoder
import clip
import mmdit
import t5
from clip.model import LEGACY_KEYS

from .configs import (
    ae_config_from_diffusers,
    ae_config_from_shapes,
    config_from_json,
    flux_config_from_diffusers,
    flux_config_from_shapes,
    settings_object,
    single_file_config,
    tokenizer_length,
)
from .convert import CLIP_WITHOUT_PREFIX, FLUX_FROM_DIFFUSERS, Rule, ae_from_diffusers, plan_load
from .errors import CheckpointError, CheckpointNotFoundError
from .files import TensorInfo, fill, read_config, read_weights
from .find import COMPONENTS, DEFAULT_REPO, Found, locate
from .sd3 import family, load_sd3, load_sd3_autoencoder

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "check_files",
    "family",
    "load_autoencoder",
    "load_clip_encoder",
    "load_clip_tokenizer",
    "load_flux",
    "load_sd3",
    "load_sd3_autoencoder",
    "load_t5_encoder",
    "load_t5_tokenizer",
    "t5_max_length",
]


def resolve_device_dtype(component: str, device, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """Defaults: bfloat16 on CUDA, float32 elsewhere; float16 only for components that run safely in it."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is a {type(dtype).__name__}; give a torch dtype such as torch.bfloat16")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if dtype == torch.float16 and not COMPONENTS[component].float16_ok:
        raise ValueError(
            f"the {COMPONENTS[component].title} does not run safely in float16 (its activations overflow float16 "
            "and give NaN); use torch.bfloat16 or torch.float32"
        )
    return device, dtype


class SkipInit(TorchFunctionMode):
    """Inside this context `torch.nn.init`'s initialisers return their tensor untouched.

    A model built for a checkpoint has every weight overwritten, so its initialisers are wasted work; on the meta
    device they are worse: `nn.Embedding`'s `normal_` goes through a decomposition that imports `torch._dynamo`
    (about 2 s of a command's start-up, for nothing). Only the public initialisers dispatch here (`normal_`,
    `uniform_`, `constant_`, `kaiming_uniform_`); the others fill meta tensors, which costs nothing.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def build(
    cls: Callable,
    config,
    component: str,
    found: Found,
    tensors: dict[str, TensorInfo],
    rules: tuple[Rule, ...],
    device,
    dtype,
    ignore: tuple[str, ...] = (),
) -> nn.Module:
    """Build `cls(config)` on the meta device, check it against the files, fill it; frozen and in eval mode."""
    device, dtype = resolve_device_dtype(component, device, dtype)
    with torch.device("meta"), SkipInit():
        model = cls(config)
    plan = plan_load(model, tensors, rules, ignore, found.where)
    if device.type != "meta":  # on the meta device: every check made, no data read (the command line's dry run)
        fill(model, plan, device, dtype)
    model.checkpoint = (found.where, found.repair_hint(Path(found.where)))  # named if a run turns NaN: check_run_finite
    return model.eval().requires_grad_(False)


def load_flux(source: str | Path = DEFAULT_REPO, device=None, dtype: torch.dtype | None = None) -> mmdit.Flux:
    """The Flux transformer from a hub repo id, a snapshot folder (BFL file or diffusers `transformer/`) or a file."""
    found = locate(source, "flux")
    tensors, cfg = read_weights(found), read_config(found)
    if found.layout.kind == "folder":
        config, rules = flux_config_from_diffusers(cfg, tensors, found.where), FLUX_FROM_DIFFUSERS
    else:
        config = single_file_config(mmdit.FluxConfig, cfg, tensors, found.where, flux_config_from_shapes)
        rules = ()
    return build(mmdit.Flux, config, "flux", found, tensors, rules, device, dtype)


def load_autoencoder(source: str | Path = DEFAULT_REPO, device=None, dtype: torch.dtype | None = None):
    """The autoencoder from a hub repo id, a snapshot folder (ae.safetensors or diffusers vae/), or a BFL file."""
    found = locate(source, "autoencoder")
    tensors, cfg = read_weights(found), read_config(found)
    if found.layout.kind == "folder":
        config = ae_config_from_diffusers(cfg, found.where)
        rules = ae_from_diffusers(len(config.ch_mult))
    else:
        config = single_file_config(autoencoder.AutoEncoderConfig, cfg, tensors, found.where, ae_config_from_shapes)
        rules = ()
    return build(autoencoder.AutoEncoder, config, "autoencoder", found, tensors, rules, device, dtype)


def load_t5_encoder(
    source: str | Path = DEFAULT_REPO, device=None, dtype: torch.dtype | None = None, component: str = "t5"
) -> t5.T5Encoder:
    """The T5 v1.1 encoder from `text_encoder_2/` (config.json + safetensors, usually sharded with an index);
    component "sd3_t5": SD3.5's `text_encoder_3/`."""
    found = locate(source, component)
    cfg = settings_object(read_config(found), found.where)
    if cfg.get("feed_forward_proj", "gated-gelu") != "gated-gelu" or cfg.get("model_type", "t5") != "t5":
        raise CheckpointError(
            f"{found.where}: only T5 v1.1 encoders (model_type t5, feed_forward_proj gated-gelu) are supported, got "
            f"{cfg.get('model_type')}, {cfg.get('feed_forward_proj')}"
        )
    defaults = {
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
    }
    config = config_from_json(t5.T5Config, cfg, found.where, defaults)
    # transformers ties encoder.embed_tokens to shared; some saves store the tied copy too
    ignore = (r"encoder\.embed_tokens\.weight",)
    return build(t5.T5Encoder, config, component, found, read_weights(found), (), device, dtype, ignore)


def load_clip_encoder(
    source: str | Path = DEFAULT_REPO, device=None, dtype: torch.dtype | None = None, component: str = "clip"
):
    """A CLIP text encoder from `text_encoder/` ("clip": FLUX.1's CLIP-L, SD3's CLIP-L) or SD3's `text_encoder_2/`
    ("clip_2": bigG): config.json + model.safetensors, keys with or without the `text_model.` prefix; a legacy
    position_ids buffer is ignored. A `text_projection.weight` in the file (CLIPTextModelWithProjection) gives the
    model its projection; config.json's `projection_dim` is there either way and is not read."""
    found = locate(source, component)
    cfg = settings_object(read_config(found), found.where)
    cfg = cfg.get("text_config", cfg)  # a full CLIPModel config nests the text tower's
    if cfg.get("hidden_act", "quick_gelu") not in clip.model.ACTIVATIONS:
        raise CheckpointError(
            f"{found.where}: hidden_act {cfg['hidden_act']} is not supported (CLIP-L uses quick_gelu, bigG gelu)"
        )
    tensors = read_weights(found)
    projection = tensors.get("text_projection.weight")
    cfg = {**cfg, "projection_dim": None if projection is None else projection.shape[0]}
    config = config_from_json(clip.CLIPTextConfig, cfg, found.where)
    rules = () if any(k.startswith("text_model.") for k in tensors) else CLIP_WITHOUT_PREFIX
    ignore = tuple(re.escape(k) for key in LEGACY_KEYS for k in (key, key.removeprefix("text_model.")))
    return build(clip.CLIPTextEncoder, config, component, found, tensors, rules, device, dtype, ignore)


def load_t5_tokenizer(source: str | Path = DEFAULT_REPO, component: str = "t5_tokenizer") -> t5.T5Tokenizer:
    """The T5 tokenizer from `tokenizer_2/` (spiece.model or tokenizer.json); "sd3_t5_tokenizer": `tokenizer_3/`."""
    found = locate(source, component)
    return t5.T5Tokenizer.from_folder(found.root / found.layout.folder)


def load_clip_tokenizer(source: str | Path = DEFAULT_REPO, component: str = "clip_tokenizer") -> clip.CLIPTokenizer:
    """A CLIP tokenizer from `tokenizer/` ("clip_tokenizer") or SD3's `tokenizer_2/` ("clip_2_tokenizer"): vocab.json
    + merges.txt, and the pad token from special_tokens_map.json / tokenizer_config.json when present."""
    found = locate(source, component)
    return clip.CLIPTokenizer.from_folder(found.root / found.layout.folder)


def t5_max_length(source: str | Path = DEFAULT_REPO) -> int:
    """T5 tokens per prompt the transformer expects: 256 for schnell-like models (no guidance embedding), 512 for
    guidance-distilled ones like FLUX.1-dev (BFL's cli: `max_length=256 if schnell else 512`), or less when
    `tokenizer_2/tokenizer_config.json` says a smaller `model_max_length` (FLUX.1-schnell's says 512)."""
    found = locate(source, "flux")
    cfg = settings_object(read_config(found), found.where) or {}
    if found.layout.kind == "folder":
        guidance = cfg.get("guidance_embeds", False)
    else:
        guidance = cfg.get("guidance_embed", "guidance_in.in_layer.weight" in read_weights(found))
    length = 512 if guidance else 256
    try:
        tokenizer = locate(source, "t5_tokenizer")
    except FileNotFoundError:
        return length
    return tokenizer_length(tokenizer.root / tokenizer.layout.folder, length, source)


def check_files(source, components: tuple[str, ...], tokenizers: tuple[str, ...] = ()) -> None:
    """`components` loaded on the meta device (files found, headers, configs, tensor names and shapes checked, no data
    read) and `tokenizers` read, so that a missing or damaged file of any component is said before the weights load."""
    from .cogvideox import load_cogvideox_autoencoder, load_cogvideox_transformer

    loaders = {"flux": load_flux, "autoencoder": load_autoencoder, "sd3": load_sd3,
               "sd3_autoencoder": load_sd3_autoencoder, "cogvideox": load_cogvideox_transformer,
               "cogvideox_autoencoder": load_cogvideox_autoencoder}  # fmt: skip
    for component in components:
        if component in loaders:
            loaders[component](source, "meta")
        elif "t5" in component:
            load_t5_encoder(source, "meta", component=component)
        else:
            load_clip_encoder(source, "meta", component=component)
    for component in tokenizers:
        load_clip_tokenizer(source, component=component)
