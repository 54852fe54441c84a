"""The shapes model's autoencoder (Flux's layout: factor 8, 16 latent channels) and its word-level tokenizer: how
they are trained, and the latent cache a run builds or reuses."""

import dataclasses
import json
from pathlib import Path

import sentencepiece
import torch
from einops import rearrange
from PIL import Image
from safetensors.torch import load_file, save_file

from autoencoder import AutoEncoder, AutoEncoderConfig
from shapes.recipe import Recipe, ae_config, lr_at, scene_config
from shapes.scenes import SceneConfig, corpus, held_out_seeds, make_batch, training_seeds
from t5 import T5Tokenizer


def train_tokenizer(folder: Path, seed: int) -> T5Tokenizer:
    """A word-level SentencePiece model over the captions, with T5's special ids: every caption word is one piece
    (a unigram model of this tiny corpus splits "background" into six pieces); unknown words become <unk>."""
    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(2000)),
        model_prefix=str(folder / "spiece"),
        model_type="word",
        vocab_size=64,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    (folder / "spiece.vocab").unlink(missing_ok=True)
    return T5Tokenizer.from_folder(folder)


def train_autoencoder(recipe: Recipe, device: str, seed: int, log) -> AutoEncoder:
    """Reconstruction (MSE) from the posterior mean, with a light L2 pull on the latents: first `ae_steps` on whole
    scenes drawn at `ae_size` (cheap), then `ae_full_steps` on full-size scenes. The second phase is needed: with
    32 channels in 32 GroupNorm groups every norm is an instance norm, and a model that only saw small scenes
    reconstructs full-size ones with wrong colours (held-out MSE 0.25, see MODEL_CARD.md)."""
    torch.manual_seed(seed)
    ae = AutoEncoder(ae_config(recipe)).to(device)
    optimizer = torch.optim.AdamW(ae.parameters(), lr=recipe.ae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    total = recipe.ae_steps + recipe.ae_full_steps
    for step in range(total):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, 100, recipe.ae_lr)
        small = step < recipe.ae_steps
        size, batch = (recipe.ae_size, recipe.ae_batch) if small else (recipe.size, recipe.ae_full_batch)
        x = make_batch(training_seeds(generator, batch), scene_config(recipe, size))[0].to(device)
        mean = ae.encoder(x).chunk(2, dim=1)[0]  # (B, 16, h, w)
        loss = (ae.decoder(mean) - x).pow(2).mean() + 1e-4 * mean.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == total - 1:
            log({"stage": "ae", "step": step, "size": size, "loss": loss.item()})
    return ae.eval()


@torch.no_grad()
def encode_scenes(ae: AutoEncoder, seeds: list[int], config: SceneConfig, device: str) -> torch.Tensor:
    """Scaled latents (S, 16, size/8, size/8) of the scenes of `seeds`, in batches of 32."""
    chunks = [ae.encode(make_batch(seeds[i : i + 32], config)[0].to(device)) for i in range(0, len(seeds), 32)]
    return torch.cat(chunks)


@torch.no_grad()
def reconstruction_check(ae: AutoEncoder, config: SceneConfig, path: Path, device: str) -> float:
    """MSE of 32 held-out scenes at full size (pixels in [-1, 1]); eight originals above their reconstructions saved
    to `path`."""
    x = make_batch(held_out_seeds(32), config)[0].to(device)
    rec = ae.decode(ae.encode(x)).clamp(-1, 1)
    rows = torch.cat([x[:8], rec[:8]], dim=2)  # (8, 3, 2H, W)
    Image.fromarray(((rearrange(rows, "B C H W -> H (B W) C") + 1) * 127.5).round().byte().cpu().numpy()).save(path)
    return round((rec - x).pow(2).mean().item(), 5)


def autoencoder_stage(recipe: Recipe, out: Path, device: str, seed: int, reuse: Path | None, log):
    """The scaled autoencoder and the latent cache: an earlier run's (`reuse`), or trained and measured here."""
    if reuse is not None:
        config = AutoEncoderConfig(**json.loads((reuse / "ae_config.json").read_text()))
        ae = AutoEncoder(config)
        ae.load_state_dict(load_file(reuse / "ae.safetensors"), strict=True)
        cache = torch.load(reuse / "latents.pt") if (reuse / "latents.pt").exists() else {"world": recipe.world}
        if cache.get("world", "full") != recipe.world:
            raise ValueError(
                f"{reuse / 'latents.pt'} holds scenes of the {cache.get('world', 'full')!r} world, the recipe asks for "
                f"{recipe.world!r}: train without --ae, or reuse a run of the same world"
            )
        return ae.to(device).eval(), cache
    ae = train_autoencoder(recipe, device, seed, log)
    raw = encode_scenes(ae, list(range(recipe.scenes)), scene_config(recipe), device)  # scale 1, shift 0 so far
    shift, scale = raw.mean().item(), 1.0 / raw.std().item()
    trained, ae = ae, AutoEncoder(ae_config(recipe, scale, shift)).to(device).eval()
    ae.load_state_dict(trained.state_dict(), strict=True)
    log({"stage": "ae", "held_out_mse": reconstruction_check(ae, scene_config(recipe), out / "ae_samples.png", device)})
    cache = {"world": recipe.world, "train": scale * (raw - shift)}
    torch.save(cache, out / "latents.pt")
    save_file(ae.state_dict(), out / "ae.safetensors")
    (out / "ae_config.json").write_text(json.dumps(dataclasses.asdict(ae.config), indent=2) + "\n")
    return ae, cache
