"""The shapes model's autoencoder (Flux's layout: factor 8, 16 latent channels) and its word-level tokenizer: how
they are trained, and the latent cache a run builds or reuses."""

import dataclasses
import json
from pathlib import Path

import sentencepiece
import torch
from einops import rearrange
from PIL import Image
from safetensors.torch import save_file

import weights
from autoencoder import AutoEncoder
from shapes.recipe import Recipe, ae_config, lr_at, scene_config
from shapes.scenes import Scene, SceneConfig, corpus, held_out_seeds, make_batch, to_tensor, training_seeds
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
def encode_scenes(ae: AutoEncoder, scenes: list[Scene], device: str) -> torch.Tensor:
    """Latents (S, 16, size/8, size/8) of drawn scenes, in batches of 32."""
    images = [s.image for s in scenes]
    return torch.cat([ae.encode(to_tensor(images[i : i + 32]).to(device)) for i in range(0, len(images), 32)])


@torch.no_grad()
def reconstruction_check(ae: AutoEncoder, config: SceneConfig, path: Path, device: str) -> float:
    """MSE of 32 held-out scenes at full size (pixels in [-1, 1]); eight originals above their reconstructions saved
    to `path`."""
    x = make_batch(held_out_seeds(32), config)[0].to(device)
    rec = ae.decode(ae.encode(x)).clamp(-1, 1)
    rows = torch.cat([x[:8], rec[:8]], dim=2)  # (8, 3, 2H, W)
    Image.fromarray(((rearrange(rows, "B C H W -> H (B W) C") + 1) * 127.5).round().byte().cpu().numpy()).save(path)
    return round((rec - x).pow(2).mean().item(), 5)


def unit_scaled(ae: AutoEncoder, raw: torch.Tensor, recipe: Recipe) -> tuple[AutoEncoder, torch.Tensor]:
    """The autoencoder with the shift and scale that give the training latents `raw` (encoded with shift 0, scale 1)
    mean 0 and standard deviation 1, and those latents so scaled."""
    shift, scale = raw.mean().item(), 1.0 / raw.std().item()
    scaled = AutoEncoder(ae_config(recipe, scale, shift)).to(raw.device).eval()
    scaled.load_state_dict(ae.state_dict(), strict=True)
    return scaled, scale * (raw - shift)


def save_autoencoder(ae: AutoEncoder, folder: Path) -> None:
    """ae.safetensors and ae_config.json: the layout `weights.load_autoencoder` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(ae.state_dict(), folder / "ae.safetensors")
    (folder / "ae_config.json").write_text(json.dumps(dataclasses.asdict(ae.config), indent=2) + "\n")


def reused_autoencoder(recipe: Recipe, reuse: Path, device: str) -> tuple[AutoEncoder, torch.Tensor | None]:
    """An earlier run's scaled autoencoder and, when it cached them for this recipe's world, its training latents."""
    ae = weights.load_autoencoder(reuse, device=device, dtype=torch.float32).eval()
    if not (reuse / "latents.pt").exists():
        return ae, None
    cache = torch.load(reuse / "latents.pt")
    if cache.get("world", "full") != recipe.world:
        raise ValueError(
            f"{reuse / 'latents.pt'} holds scenes of the {cache.get('world', 'full')!r} world, the recipe asks for "
            f"{recipe.world!r}: train without --ae, or reuse a run of the same world"
        )
    return ae, cache["train"]
