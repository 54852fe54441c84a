"""Model folders and checkpoints of a shapes training run.

A model folder holds `flux.safetensors`, `t5.safetensors`, their configs and `recipe.json` (with the autoencoder and
tokenizer beside them it is a complete model, loaded by `shapes.eval.load`). A checkpoint is a model folder plus
`state.pt` (step, optimizer, random states), written beside its place and then moved into it, so a run killed at any
moment leaves either the previous checkpoint or the new one, whole.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmdit import Flux
from t5 import T5Encoder


def save_weights(folder: Path, flux: Flux, t5: T5Encoder, recipe, seed: int) -> None:
    """The transformer and text encoder with their configs and the recipe (a model folder, with the autoencoder)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(flux.state_dict(), folder / "flux.safetensors")
    save_file({k: v.contiguous() for k, v in t5.state_dict().items()}, folder / "t5.safetensors")
    for name, config in (("flux", flux.config), ("t5", t5.config)):
        (folder / f"{name}_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    (folder / "recipe.json").write_text(json.dumps({"seed": seed, **dataclasses.asdict(recipe)}, indent=2) + "\n")


def save_checkpoint(
    folder: Path,
    step: int,
    flux: Flux,
    t5: T5Encoder,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    recipe,
    seed: int,
) -> None:
    """Weights, optimizer and random states after `step` steps, written beside `folder` and then moved into place, so
    a run killed at any moment leaves either the previous checkpoint or this one, whole."""
    partial, old = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")
    shutil.rmtree(partial, ignore_errors=True)
    save_weights(partial, flux, t5, recipe, seed)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
    }
    torch.save(state, partial / "state.pt")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    partial.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    folder: Path,
    flux: Flux,
    t5: T5Encoder,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    device: str,
) -> int:
    """Restore what `save_checkpoint` wrote; returns the step to continue from."""
    if not (folder / "state.pt").is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {folder / 'state.pt'} is missing")
    try:
        flux.load_state_dict(load_file(folder / "flux.safetensors", device=device), strict=True)
        t5.load_state_dict(load_file(folder / "t5.safetensors", device=device), strict=True)
        state = torch.load(folder / "state.pt", map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].cpu())
        return int(state["step"])
    except Exception as error:  # truncated, not a checkpoint, or another model's: none of these can be resumed
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"the checkpoint {folder} is damaged ({type(error).__name__}: {reason}); resume from "
                         "another run, or start anew with --out") from None  # fmt: skip
