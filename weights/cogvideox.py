"""CogVideoX checkpoints: the transformer's config from diffusers' `transformer/config.json`, and its loader.

Follows the diffusers folders of `THUDM/CogVideoX-2b` and `THUDM/CogVideoX-5b` (`transformer/` with
`diffusion_pytorch_model*.safetensors`, sharded with an index for the 5B). Our module names are diffusers' own, so
the load needs no rename table. Only CogVideoX 1.0 is read: a config with `patch_size_t` (1.5), an `ofs` embedding or
learned positions is refused with what it is.
"""

from __future__ import annotations

from pathlib import Path

import cogvideox

from .configs import reading
from .errors import CheckpointError
from .files import read_config, read_weights
from .find import locate

UNSUPPORTED = ("patch_size_t", "ofs_embed_dim", "use_learned_positional_embeddings")


def cogvideox_config_from_diffusers(cfg: dict, where: str) -> cogvideox.CogVideoXConfig:
    """transformer/config.json (CogVideoXTransformer3DModel) -> our config; every field keeps its name."""
    if cfg.get("_class_name", "CogVideoXTransformer3DModel") != "CogVideoXTransformer3DModel":
        raise CheckpointError(f"{where}: config.json describes a {cfg['_class_name']}, not a CogVideoX transformer")
    if unsupported := [k for k in UNSUPPORTED if cfg.get(k)]:
        raise CheckpointError(f"{where}: config.json sets {unsupported}: CogVideoX 1.5 and image-to-video "
                              "variants are not supported, only CogVideoX-2b and -5b")  # fmt: skip
    affine = cfg.get("norm_elementwise_affine", True)
    if cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate" or not affine:
        raise CheckpointError(f"{where}: config.json has an activation or norm CogVideoX-2b/-5b do not use")
    fields = set(cogvideox.CogVideoXConfig.__dataclass_fields__) - {"rope_theta", "manual_attention"}
    with reading(where, "CogVideoXTransformer3DModel"):
        values = {k: cfg[k] for k in fields if k in cfg}
        values.setdefault("use_rotary_positional_embeddings", False)
        if values.get("out_channels") is None:
            values["out_channels"] = cfg["in_channels"]
        return cogvideox.CogVideoXConfig(**values)


def load_cogvideox_transformer(source: str | Path, device=None, dtype=None) -> cogvideox.CogVideoX:
    """CogVideoX's transformer from a hub repo id (e.g. THUDM/CogVideoX-5b) or a diffusers snapshot folder."""
    from . import build

    found = locate(source, "cogvideox")
    config = cogvideox_config_from_diffusers(read_config(found) or {}, found.where)
    return build(cogvideox.CogVideoX, config, "cogvideox", found, read_weights(found), (), device, dtype)


def load_cogvideox_autoencoder(source: str | Path, device=None, dtype=None):
    """CogVideoX's 3D autoencoder from a snapshot's `vae/` (AutoencoderKLCogVideoX: names kept, no table)."""
    from cogvideox.autoencoder import VideoAutoEncoder, VideoAutoEncoderConfig

    from . import build

    found = locate(source, "cogvideox_autoencoder")
    try:
        config = VideoAutoEncoderConfig.from_diffusers(read_config(found) or {})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{found.where}: {error}") from None
    return build(VideoAutoEncoder, config, "cogvideox_autoencoder", found, read_weights(found), (), device, dtype)
