"""Tiny random models for tests: every component built from its "tiny" preset with seeded random weights, and a
SentencePiece tokenizer trained on a small caption corpus written here."""

import dataclasses
import io
import json
import random

import sentencepiece
import torch
from safetensors.torch import save_file

import autoencoder
import mmdit
import t5
from concept_attention import ConceptAttentionPipeline

WORDS = (
    "a an the red green blue yellow purple orange cat dog sky grass tree house car person skyscraper "
    "circle square triangle star on in with and of under above next to background floor water mountain"
).split()


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))) for _ in range(n)]


def train_spiece(folder, vocab_size: int = 60) -> None:
    """A small unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2) as folder/spiece.model."""
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(2000)),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """N(0, 0.2^2) for every tensor of the state dict and N(1, 0.1^2) for norm scales: untrained layers that still
    change the hidden state (used to compare an encoder with its reference under the same weights)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        noise = torch.randn(p.shape, generator=g)
        state[name] = 1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise
    return state


def randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Every parameter drawn from N(0, std^2) (norm scales around 1), so untrained blocks still do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + noise if name.endswith(("scale", "norm.weight", "norm1.weight", "norm2.weight")) else noise)
    return module.eval()


def tiny_pipeline(tokenizer_folder, seed: int = 0, max_length: int = 16, depth: int = 3) -> ConceptAttentionPipeline:
    config = mmdit.CONFIGS["tiny"]
    config = type(config)(**{**config.__dict__, "depth": depth})
    t5_config = t5.CONFIGS["tiny"]
    flux = randomize(mmdit.Flux(config), seed)
    ae = randomize(autoencoder.AutoEncoder(autoencoder.CONFIGS["tiny"]), seed + 1, std=0.1)
    encoder = randomize(t5.T5Encoder(t5_config), seed + 2, std=0.5)
    tokenizer = t5.T5Tokenizer.from_folder(tokenizer_folder)
    return ConceptAttentionPipeline(flux, ae, encoder, tokenizer, device="cpu", max_length=max_length, source="tiny")


def write_model_folder(folder, seed: int = 0, max_length: int = 16) -> None:
    """A tiny random model in this project's own single-file layout (safetensors + sidecar config per component, and
    tokenizer_2/), loadable by `ConceptAttentionPipeline.from_pretrained(folder)`."""
    train_spiece(folder / "tokenizer_2")
    (folder / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))
    pipe = tiny_pipeline(folder / "tokenizer_2", seed=seed, max_length=max_length)
    for stem, module in (("flux", pipe.flux), ("ae", pipe.autoencoder), ("t5", pipe.t5)):
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, folder / f"{stem}.safetensors")
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(module.config).items()}
        (folder / f"{stem}_config.json").write_text(json.dumps(config))


def randomize_like_trained(module: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Weights N(0, std^2) from the global generator, norm weights near 1 (as in trained models): a diffusers
    transformer that changes its input in every layer."""
    with torch.no_grad():
        for key, p in module.named_parameters():
            p.copy_(torch.randn(p.shape) * std + (1.0 if "norm" in key and key.endswith("weight") else 0.0))
    return module


def diffusers_vae(scaling_factor: float, shift_factor: float):
    """A tiny diffusers `AutoencoderKL` in the layout of FLUX.1's and SD3.5's `vae/` (16 latent channels, 4 levels, 8x
    downsampling, no quant convs) with the given latent scale and shift."""
    import diffusers

    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scaling_factor, shift_factor=shift_factor,
    ).eval()  # fmt: skip


def pixel_difference(image, expected) -> tuple[int, float]:
    """The largest difference, in levels of 255, between a PIL image and a diffusers pipeline's `output_type="np"`
    image in [0, 1] (rounded as diffusers' own PIL output is), and the spread of diffusers' pixels."""
    import numpy as np

    theirs = np.round(expected * 255).astype(np.int32)
    return int(np.abs(np.asarray(image, dtype=np.int32) - theirs).max()), float(theirs.std())
