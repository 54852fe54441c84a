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


def save_weights(folder: Path, flux: Flux, t5: T5Encoder, recipe, seed: int, bf16: bool = False) -> None:
    """The transformer and text encoder with their configs and the recipe (a model folder, with the autoencoder);
    `bf16` halves the files (loading casts them back to the model's dtype)."""
    folder.mkdir(parents=True, exist_ok=True)

    def kept(module) -> dict:
        return {k: (v.to(torch.bfloat16) if bf16 and v.is_floating_point() else v).contiguous()
                for k, v in module.state_dict().items()}  # fmt: skip

    save_file(kept(flux), folder / "flux.safetensors")
    save_file(kept(t5), folder / "t5.safetensors")
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
    light: bool = False,
) -> None:
    """Weights, optimizer and random states after `step` steps, written beside `folder` and then moved into place, so
    a run killed at any moment leaves either the previous checkpoint or this one, whole. `light`: bf16 weights and no
    optimizer state (a checkpoint small enough to commit; resuming it restarts the optimizer)."""
    partial, old = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")
    shutil.rmtree(partial, ignore_errors=True)
    save_weights(partial, flux, t5, recipe, seed, bf16=light)
    state = {"step": step, "generator": generator.get_state()}
    if not light:
        state["optimizer"] = optimizer.state_dict()
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
) -> tuple[int, bool]:
    """Restore what `save_checkpoint` wrote; returns the step to continue from and whether the optimizer state was
    restored (a light checkpoint has none: the optimizer starts afresh)."""
    if not (folder / "state.pt").is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {folder / 'state.pt'} is missing")
    try:
        flux.load_state_dict(load_file(folder / "flux.safetensors", device=device), strict=True)
        t5.load_state_dict(load_file(folder / "t5.safetensors", device=device), strict=True)
        state = torch.load(folder / "state.pt", map_location=device, weights_only=False)
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].cpu())
        return int(state["step"]), "optimizer" in state
    except Exception as error:  # truncated, not a checkpoint, or another model's: none of these can be resumed
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"the checkpoint {folder} is damaged ({type(error).__name__}: {reason}); resume from "
                         "another run, or start anew with --out") from None  # fmt: skip
