"""The training set as one bank on the training device: latents and pre-tokenised captions, drawn once.

A step then costs no host work: `Bank.batch` picks scenes and one of each scene's caption variants with a generator
on the device, so a small model on a GPU is not held back by Python drawing scenes and writing captions per step.

Notable features:
- scenes are drawn by a pool of worker processes in chunks (`draw`), and each chunk is encoded by the autoencoder as it
  arrives, so 50k scenes at 128 px never sit in memory as images (a scene takes about 10 ms to draw on one core);
- every scene gets `variants` captions drawn with the recipe's caption options from a generator seeded by the scene's
  own seed, so the bank does not depend on how the work was split; a one-shape scene's variants include its shape word
  alone with the recipe's `single_word` probability, as the per-step captions of the CPU path did.
"""

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from shapes.scenes import SceneConfig, caption_for, make_scene, to_tensor


@dataclass(frozen=True)
class CaptionOptions:
    background_phrase: float
    single_word: float
    colourless: float
    positions: float


def draw_chunk(seeds: list[int], config: SceneConfig, options: CaptionOptions, variants: int):
    """Images (n, H, W, 3) uint8 of `seeds` and `variants` captions for each (n lists)."""
    images, captions = [], []
    caption_config = replace(config, background_phrase=options.background_phrase, colourless=options.colourless,
                             positions=options.positions)  # fmt: skip
    for seed in seeds:
        scene = make_scene(seed, config)
        rng = np.random.default_rng([seed, 2])
        texts = []
        for _ in range(variants):
            if len(scene.shapes) == 1 and rng.random() < options.single_word:
                texts.append(scene.shapes[0][1])
            else:
                texts.append(caption_for(scene.shapes, scene.background, scene.places, rng, caption_config))
        images.append(scene.image)
        captions.append(texts)
    return np.stack(images), captions


def draw(
    seeds: list[int], config: SceneConfig, options: CaptionOptions, variants: int, workers: int, chunk: int = 256
) -> Iterator[tuple[np.ndarray, list[list[str]]]]:
    """`draw_chunk` over `seeds` in order, by `workers` processes (0: in this process)."""
    parts = [seeds[i : i + chunk] for i in range(0, len(seeds), chunk)]
    if workers == 0:
        yield from (draw_chunk(p, config, options, variants) for p in parts)
        return
    # fresh interpreters, not forks: the parent may already hold a CUDA context and threads
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(draw_chunk, parts, [config] * len(parts), [options] * len(parts), [variants] * len(parts))


@dataclass
class Bank:
    latents: Tensor  # (S, 16, h, w) scaled latents, on the training device
    tokens: Tensor  # (S, K, T) int64 caption ids, K variants per scene

    def batch(self, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`size` random scenes and one random caption variant of each: latents (B, 16, h, w), tokens (B, T)."""
        S, K, _ = self.tokens.shape
        device = self.latents.device
        index = torch.randint(0, S, (size,), generator=generator, device=device)
        variant = torch.randint(0, K, (size,), generator=generator, device=device)
        return self.latents[index], self.tokens[index, variant]


@torch.no_grad()
def build(ae, tok, seeds: list[int], config: SceneConfig, options: CaptionOptions, max_length: int, variants: int,
          device: str, workers: int = 0, latents: Tensor | None = None, progress: bool = True) -> Bank:  # fmt: skip
    """Draw, encode (in batches of 256 on `device`) and tokenise the scenes of `seeds` into a Bank on `device`;
    `latents` (S, 16, h, w) already encoded (an earlier run's cache) skip the encoding."""
    encoded, tokens = [], []
    with tqdm(total=len(seeds), desc="drawing and encoding scenes", disable=not progress) as bar:
        for images, captions in draw(seeds, config, options, variants, workers):
            for i in range(0, len(images), 256) if latents is None else ():
                encoded.append(ae.encode(to_tensor(list(images[i : i + 256])).to(device)))
            flat = [text for texts in captions for text in texts]
            tokens.append(tok(flat, max_length).reshape(len(captions), variants, max_length).to(device))
            bar.update(len(images))
    return Bank(torch.cat(encoded) if latents is None else latents.to(device), torch.cat(tokens))


def key(recipe) -> dict:
    """What a bank's contents depend on (fields of a `shapes.recipe.Recipe`): a bank serves recipes with its key."""
    fields = ("world", "size", "scenes", "max_length", "caption_variants", "background_phrase", "single_word",
              "colourless", "positions")  # fmt: skip
    return {name: getattr(recipe, name) for name in fields}


def save(data: Bank, recipe, path: Path) -> Path:
    torch.save({"key": key(recipe), "latents": data.latents.cpu(), "tokens": data.tokens.cpu()}, path)
    return path


def load(path: Path, recipe, device: str) -> Bank:
    """A bank written by `save`, refused when it was drawn for a recipe with another key."""
    saved = torch.load(path, map_location=device)
    if saved["key"] != key(recipe):
        differ = sorted(k for k in saved["key"] if saved["key"][k] != key(recipe)[k])
        raise ValueError(f"{path} was drawn for another recipe (fields {differ} differ): rebuild it or drop --bank")
    return Bank(saved["latents"], saved["tokens"])
