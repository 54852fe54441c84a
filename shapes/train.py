"""Train the built-in shapes model: a SentencePiece tokenizer, a small autoencoder, and a small T5 + Flux pair.

    python -m shapes.train --out DIR --device cpu --seed 0 --threads 1

Stages, all seeded: (1) a word-level SentencePiece model on the caption vocabulary (T5's ids: pad 0, EOS 1, unk 2);
(2) an autoencoder with Flux's layout (factor 8, 16 latent channels), trained first on scenes drawn small, then on
full-size ones, its latent shift and scale measured on the training scenes; (3) the training scenes encoded once and
cached; (4) T5 (from scratch) and Flux trained jointly with the rectified-flow objective: x_t = t * noise + (1 - t) *
z, target velocity noise - z, t drawn logit-normally. The pooled vector `y` is always zero (this model has no CLIP;
`vec_in_dim` is 1 only because the layer must exist). Alignment is measured on held-out scenes every `eval_every`
steps (`shapes.eval`), and everything goes to DIR/log.jsonl. The `Recipe` defaults are the shipped model's recipe
(about 30 minutes on a 2-core CPU with `--threads 1`; see shapes/MODEL_CARD.md).

Notable features: `--ae DIR` reuses the autoencoder and cached latents of an earlier run, so experiments on the
transformer cost only its own training; every recipe field (`shapes.recipe.Recipe`) is a command-line flag
(`--hidden 192`, ...); the training set is a bank on the device (`shapes.bank`: no host work per step); `--minutes`
bounds the transformer phase, a whole checkpoint is written every minute and `--resume DIR` continues it exactly;
`--batch-probe` picks the batch size on the device; `--bf16 true` and `--compile true` for GPUs.
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from checks import OneLineParser, check_count, check_device, check_number, interrupted, terminate_as_interrupt
from mmdit import Flux
from sampling import image_ids, pack, text_ids
from shapes import bank
from shapes import eval as alignment
from shapes.autoencoding import (
    encode_scenes,
    reconstruction_check,
    reused_autoencoder,
    save_autoencoder,
    train_autoencoder,
    train_tokenizer,
    unit_scaled,
)
from shapes.checkpoint import load_checkpoint, save_checkpoint, save_weights
from shapes.eval import isolation_mask
from shapes.recipe import Recipe, add_recipe_flags, flux_config, lr_at, recipe_from, scene_config, t5_config
from shapes.scenes import held_out_seeds, make_scene, validation_seeds
from t5 import T5Encoder

__all__ = ["Recipe", "train"]


def initialize(flux: Flux) -> Flux:
    """DiT's recipe: Xavier-uniform linears, and every modulation and the final projection zeroed, so each block
    starts as the identity and the model starts by predicting zero velocity."""
    for module in flux.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            torch.nn.init.zeros_(module.bias)
    for name, param in flux.named_parameters():
        if "_mod.lin" in name or "modulation" in name or name.startswith("final_layer.linear"):
            torch.nn.init.zeros_(param)
    return flux


def sample_t(generator: torch.Generator, batch: int, sampler: str, mean: float) -> Tensor:
    """Noise levels t (B,) on the generator's device: sigmoid(N(mean, 1)) (SD3's logit-normal; median sigmoid(mean))
    or uniform."""
    if sampler == "uniform":
        return torch.rand(batch, generator=generator, device=generator.device)
    return torch.sigmoid(mean + torch.randn(batch, generator=generator, device=generator.device))


def isolate_share(recipe: Recipe, step: int) -> float:
    """The share of isolated samples at `step`: `isolate`, or with `isolate_anneal` a linear fall to 0."""
    if recipe.isolate_anneal == 0:
        return recipe.isolate
    return recipe.isolate * max(0.0, 1.0 - step / (recipe.isolate_anneal * recipe.steps))


def velocity_loss(
    flux: Flux,
    t5: T5Encoder,
    tokens: Tensor,
    z: Tensor,
    noise: Tensor,
    t: Tensor,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Rectified flow: x_t = t * noise + (1 - t) * z; the velocity should be noise - z. Captions are token ids (B, T);
    the pooled vector is zero."""
    B, _, h, w = z.shape
    t_ = t[:, None, None, None]
    txt = t5(tokens)  # (B, T, d_model), no attention mask (as Flux)
    ids_img, ids_txt = image_ids(B, 8 * h, 8 * w, z.device), text_ids(B, tokens.shape[1], z.device)
    y = torch.zeros(B, flux.config.vec_in_dim, device=z.device)
    v = flux(pack(t_ * noise + (1 - t_) * z), ids_img, txt, ids_txt, t, y, attention_mask=attention_mask)
    return (v.float() - pack(noise - z)).pow(2).mean()


def probe_batch(z: Tensor, tokens: Tensor, seed: int) -> dict[str, tuple]:
    """A fixed held-out batch at t = 0.5 with fixed noise, with its captions and with every caption moved one scene
    along (the gap between the two losses says how much the model uses its caption)."""
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + 3)).to(z)
    t = torch.full((z.shape[0],), 0.5, device=z.device)
    return {"probe_loss": (tokens, z, noise, t), "probe_loss_shuffled": (tokens.roll(-1, 0), z, noise, t)}


def choose_batch(seconds_per_step: dict[int, float], tolerance: float = 1.5) -> int:
    """The largest batch whose step takes at most `tolerance` times the step of the smallest batch: on a device that
    small batches leave idle, bigger batches are nearly free until the device is full."""
    smallest = min(seconds_per_step)
    return max(b for b, s in seconds_per_step.items() if s <= tolerance * seconds_per_step[smallest])


def seconds_per_step(step: Callable[[], None], seconds: float, timer: Callable[[], float] = time.perf_counter) -> float:
    """Mean wall-clock time of `step` over about `seconds` (after two warm-up calls, which compile and allocate)."""
    step(), step()
    start, count = timer(), 0
    while count < 3 or timer() - start < seconds:
        step()
        count += 1
    return (timer() - start) / count


def scaled_for_batch(recipe: Recipe, batch: int, step_seconds: float, minutes: float | None) -> Recipe:
    """The recipe at another batch size: learning rate scaled by sqrt(batch / recipe.batch) (the square-root rule
    for Adam), and, when the run has a time budget, as many steps as fit in 85 % of it (the rest is evaluation)."""
    lr = recipe.lr * math.sqrt(batch / recipe.batch)
    steps = recipe.steps if minutes is None else max(1, int(0.85 * 60 * minutes / step_seconds))
    return dataclasses.replace(recipe, batch=batch, lr=lr, steps=steps)


REWARM = 100  # steps of linear warm-up after resuming a light checkpoint (its optimizer state was not kept)
RUN_FILES = ("run.json", "log.jsonl", "checkpoint", "flux.safetensors", "t5.safetensors", "ae.safetensors", "steps")


def check_new_run(out: Path) -> None:
    """Refuse a folder that holds a training run: a new run would overwrite its weights and mix their logs."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found:
        raise ValueError(
            f"{out} holds a training run ({', '.join(found)}); continue it with --resume {out}, give a new --out, "
            "or --force to train over it (its weights, checkpoint and log are replaced)"
        )


def train(
    recipe: Recipe,
    out: Path,
    device: str,
    seed: int,
    reuse: Path | None = None,
    minutes: float | None = None,
    resume: bool = False,
    checkpoint_seconds: float = 60.0,
    workers: int = 0,
    batch_probe: tuple[int, ...] = (),
    probe_seconds: float = 20.0,
    eval_minutes: float | None = None,
    bank_file: Path | None = None,
    force: bool = False,
) -> Recipe:
    """Train into `out`; returns the recipe as run (the batch probe may change batch, lr and steps). A folder that
    already holds a run is refused unless `resume` (continue it) or `force` (train over it, its log started anew).

    `minutes` bounds the transformer phase (it then evaluates and saves as if its steps were done); a checkpoint goes
    to out/checkpoint every `checkpoint_seconds` and at the end, and `resume` continues from it (the run's own recipe,
    seed and autoencoder); every evaluation's weights go to out/steps/NNNNNN. `workers` processes draw the scenes;
    `batch_probe` lists batch sizes to time for `probe_seconds` in all (`choose_batch`, `scaled_for_batch`);
    `eval_minutes` adds an evaluation whenever that much time has passed since the last one; `bank_file` is a bank
    drawn ahead (`shapes.arms`)."""
    if not resume and not force:
        check_new_run(out)
    out.mkdir(parents=True, exist_ok=True)
    if resume and reuse is None:
        reuse = out  # the run trained its own autoencoder: it is in the run's folder
    elif not resume:
        (out / "run.json").write_text(json.dumps({"seed": seed, "ae": reuse and str(reuse)}) + "\n")
    log_file = (out / "log.jsonl").open("a" if resume else "w")
    start = time.time()

    def log(record: dict) -> None:
        record = {"time": round(time.time() - start, 1), **record}
        print(json.dumps(record), flush=True)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    log({"stage": "recipe", "seed": seed, "device": device, **dataclasses.asdict(recipe)})
    # 1-3: tokenizer, autoencoder, the training set as a bank of latents and caption ids on the device
    tok = train_tokenizer(out / "tokenizer_2", seed)
    # the pipeline pads prompts and concepts to this length (T5 runs unmasked, so the length changes the encodings)
    (out / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": recipe.max_length}))
    if bank_file is not None and reuse is None:
        raise ValueError(f"--bank {bank_file} was encoded by an existing autoencoder: give it with --ae")
    ae, cached = reused_autoencoder(recipe, reuse, device) if reuse is not None else (None, None)
    if ae is None:  # trained here; its latent shift and scale are measured on the bank's (unscaled) latents below
        ae = train_autoencoder(recipe, device, seed, log)
    if cached is not None and len(cached) < recipe.scenes:
        cached = None
    if bank_file is not None:
        data = bank.load(bank_file, recipe, device)
    else:
        options = bank.CaptionOptions(recipe.background_phrase, recipe.single_word, recipe.colourless,
                                      recipe.positions)  # fmt: skip
        data = bank.build(ae, tok, list(range(recipe.scenes)), scene_config(recipe), options, recipe.max_length,
                          recipe.caption_variants, device, workers,
                          latents=None if cached is None else cached[: recipe.scenes], progress=False)  # fmt: skip
    if reuse is None:
        ae, data.latents = unit_scaled(ae, data.latents, recipe)
        mse = reconstruction_check(ae, scene_config(recipe), out / "ae_samples.png", device)
        log({"stage": "ae", "held_out_mse": mse})
        save_autoencoder(ae, out)
        torch.save({"world": recipe.world, "train": data.latents.cpu()}, out / "latents.pt")
    split = validation_seeds if recipe.eval_split == "validation" else held_out_seeds
    held_scenes = [make_scene(s, scene_config(recipe)) for s in split(recipe.eval_scenes)]
    if not resume:
        copy_autoencoder(reuse, out, recipe)  # the run's folder is a whole model folder from the start
    held_captions = [s.caption for s in held_scenes]
    held_latents = encode_scenes(ae, held_scenes, device)
    log({"stage": "data", "latents": list(data.latents.shape), "std": data.latents.std().item()})

    # 4: T5 + Flux
    torch.manual_seed(seed)
    t5 = T5Encoder(t5_config(recipe, tok.vocab_size)).to(device)
    flux = initialize(Flux(flux_config(recipe))).to(device)
    params = [*t5.parameters(), *flux.parameters()]
    log({"stage": "model", "flux_params": sum(p.numel() for p in flux.parameters()),
         "t5_params": sum(p.numel() for p in t5.parameters())})  # fmt: skip
    model = torch.compile(flux) if recipe.compile else flux
    generator = torch.Generator(device).manual_seed(seed + 1)
    image_tokens = data.latents.shape[2] * data.latents.shape[3] // 4
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=recipe.bf16)

    def training_step(optimizer, batch: int, lr: float, share: float) -> Tensor:
        for group in optimizer.param_groups:
            group["lr"] = lr
        z, tokens = data.batch(batch, generator)
        noise = torch.randn(z.shape, generator=generator, device=generator.device)
        t = sample_t(generator, batch, recipe.t_sampler, recipe.t_mean)
        mask = isolation_mask(batch, recipe.max_length, image_tokens, share, generator)
        with autocast:
            loss = velocity_loss(model, t5, tokens, z, noise, t, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss

    def new_optimizer() -> torch.optim.Optimizer:
        fused = torch.device(device).type == "cuda"
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0, fused=fused)

    if batch_probe and not resume:
        saved = {k: v.clone() for k, v in [*flux.state_dict().items(), *t5.state_dict().items()]}
        timings = {}
        for b in batch_probe:
            optimizer = new_optimizer()
            timings[b] = seconds_per_step(lambda b=b, o=optimizer: training_step(o, b, 0.0, recipe.isolate),
                                          probe_seconds / len(batch_probe))  # fmt: skip
        flux.load_state_dict({k: v for k, v in saved.items() if k in flux.state_dict()})
        t5.load_state_dict({k: v for k, v in saved.items() if k in t5.state_dict()})
        chosen = choose_batch(timings)
        recipe = scaled_for_batch(recipe, chosen, timings[chosen], minutes)
        log({"stage": "batch_probe", "seconds_per_step": timings, "batch": chosen, "lr": recipe.lr,
             "steps": recipe.steps})  # fmt: skip
    optimizer = new_optimizer()
    step, rewarm_from = 0, None
    if resume:
        step, restored = load_checkpoint(out / "checkpoint", flux, t5, optimizer, generator, device)
        rewarm_from = None if restored else step
        sessions = 2 + sum(1 for line in (out / "log.jsonl").read_text().splitlines() if '"stage": "resume"' in line)
        log({"stage": "resume", "step": step, "session": sessions, "optimizer": "restored" if restored else
             f"restarted, {REWARM} warm-up steps"})  # fmt: skip
    probe = probe_batch(held_latents[:32], tok(held_captions[:32], recipe.max_length).to(device), seed)
    deadline = math.inf if minutes is None else time.time() + 60 * minutes
    last_checkpoint = last_eval = time.time()
    while True:
        out_of_time = time.time() > deadline
        due = eval_minutes is not None and time.time() - last_eval > 60 * eval_minutes
        if step % recipe.eval_every == 0 or step == recipe.steps or out_of_time or due:
            flux.eval()
            with torch.no_grad():
                scores = {k: velocity_loss(flux, t5, *batch).item() for k, batch in probe.items()}
                for i in range(0, recipe.eval_scenes, 50):
                    part = alignment.evaluate(flux, t5, tok, held_latents[i : i + 50], held_scenes[i : i + 50],
                                              held_captions[i : i + 50], recipe.max_length, world=recipe.world,
                                              isolate=recipe.eval_isolated)  # fmt: skip
                    for k, v in part.items():
                        scores[k] = scores.get(k, 0.0) + v * len(held_scenes[i : i + 50]) / recipe.eval_scenes
            log({"stage": "eval", "step": step, **{k: round(v, 4) for k, v in scores.items()}})
            save_weights(out / "steps" / f"{step:06d}", flux, t5, recipe, seed, bf16=recipe.light_checkpoints)
            flux.train()
            last_eval = time.time()
        if step == recipe.steps or out_of_time:
            break
        share = isolate_share(recipe, step)
        lr = lr_at(step, recipe.steps, recipe.warmup, recipe.lr)
        if rewarm_from is not None:
            lr *= min(1.0, (step - rewarm_from + 1) / REWARM)
        loss = training_step(optimizer, recipe.batch, lr, share)
        step += 1
        if step % 100 == 0:
            log({"stage": "flux", "step": step, "loss": round(loss.item(), 5), "isolate": round(share, 4)})
        if time.time() - last_checkpoint > checkpoint_seconds:
            save_checkpoint(out / "checkpoint", step, flux, t5, optimizer, generator, recipe, seed,
                            light=recipe.light_checkpoints)  # fmt: skip
            last_checkpoint = time.time()

    save_checkpoint(out / "checkpoint", step, flux, t5, optimizer, generator, recipe, seed,
                    light=recipe.light_checkpoints)  # fmt: skip
    save_weights(out, flux, t5, recipe, seed)
    copy_autoencoder(reuse, out, recipe)
    log({"stage": "done", "step": step, "time_total": round(time.time() - start, 1)})
    return recipe


def copy_autoencoder(reuse: Path | None, out: Path, recipe: Recipe) -> None:
    """A reused autoencoder's files into the run's folder, its config's resolution set to the recipe's size (the
    autoencoder is convolutional; the resolution tells `shapes.eval` and the pipeline what size the model works at)."""
    if reuse is None or reuse.resolve() == out.resolve():
        return
    (out / "ae.safetensors").write_bytes((reuse / "ae.safetensors").read_bytes())
    config = json.loads((reuse / "ae_config.json").read_text())
    (out / "ae_config.json").write_text(json.dumps({**config, "resolution": recipe.size}, indent=2) + "\n")


def main() -> int:
    parser = OneLineParser(prog="python -m shapes.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="the run's folder (weights, log, checkpoints)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--ae", type=Path, default=None, help="reuse the autoencoder and cached latents of a run")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget of the transformer phase")
    parser.add_argument("--workers", type=int, default=0, help="processes drawing the training scenes (0: this one)")
    parser.add_argument(
        "--batch-probe",
        type=int,
        nargs="*",
        default=[],
        help="batch sizes to time; the largest whose "
        "step stays within 1.5x of the smallest's is used, lr scaled by sqrt(batch ratio)",
    )
    parser.add_argument("--probe-seconds", type=float, default=20.0, help="the batch probe's time, all sizes together")
    parser.add_argument("--bank", type=Path, default=None, help="a bank.pt drawn ahead by shapes.arms")
    parser.add_argument("--eval-minutes", type=float, default=None, help="also evaluate every this many minutes")
    parser.add_argument("--resume", type=Path, default=None, help="continue the run in this folder (its own recipe)")
    parser.add_argument("--force", action="store_true", help="train over the run already in --out")
    add_recipe_flags(parser)
    args = parser.parse_args()
    try:
        recipe = checked_arguments(parser, args)
        if args.threads:
            torch.set_num_threads(args.threads)  # one thread per process is fastest on a small shared CPU
        train(recipe, args.out, args.device, args.seed, args.ae, args.minutes, args.resume is not None,
              workers=args.workers, batch_probe=tuple(args.batch_probe), probe_seconds=args.probe_seconds,
              eval_minutes=args.eval_minutes, bank_file=args.bank, force=args.force)  # fmt: skip
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        return interrupted(stop, "the last checkpoint is kept (--resume continues from it)")
    return 0


def checked_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Recipe:
    """Every check that needs no training, in one-line ValueErrors; -> the recipe (a resumed run's own)."""
    check_device(args.device)
    check_count(args.seed, "--seed", 0, 2**63 - 1)
    check_count(args.threads, "--threads", 0)
    check_count(args.workers, "--workers", 0, 1024)
    for name in ("minutes", "eval_minutes", "probe_seconds"):
        value = getattr(args, name)
        if value is not None and check_number(value, f"--{name.replace('_', '-')}") <= 0:
            raise ValueError(f"--{name.replace('_', '-')} = {value}: give a positive number")
    for b in args.batch_probe:
        check_count(b, "--batch-probe", 1, 2**31 - 1)
    for name, path in (("--ae", args.ae), ("--bank", args.bank)):
        if path is not None and not path.exists():
            raise ValueError(f"{name} {path} does not exist")
    if args.resume is None:
        if args.out is None:
            parser.error("give --out DIR (a new run) or --resume DIR (continue one)")
        if not args.force:
            check_new_run(args.out)
        return recipe_from(args)
    recipe_file, run_file = args.resume / "checkpoint" / "recipe.json", args.resume / "run.json"
    for file in (recipe_file, run_file, args.resume / "checkpoint" / "state.pt"):
        if not file.is_file():
            raise ValueError(f"--resume {args.resume}: {file} is missing (no checkpoint was written there)")
    try:
        saved, run = json.loads(recipe_file.read_text()), json.loads(run_file.read_text())
        args.out, args.seed, args.ae = args.resume, saved.pop("seed"), run["ae"] and Path(run["ae"])
        return Recipe(**saved)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"--resume {args.resume}: {recipe_file} or {run_file} is damaged ({error!r})") from None


if __name__ == "__main__":
    with terminate_as_interrupt():
        code = main()
    sys.exit(code)
