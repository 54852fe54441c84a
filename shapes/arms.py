r"""Several training recipes at once on one device: one shared bank of scenes, N concurrent `shapes.train` processes.

    python -m shapes.arms --out $OUT/arms --device cuda --minutes 6 --workers 16 \
        --common "--world shaded --t5-layers 0 --scenes 50000 --bf16 true --batch-probe 256 1024 4096" \
        --arm A "--isolate 0.5" --arm B "--isolate 1.0 --isolate-anneal 0.6" \
        --arm C "--isolate 1.0 --eval-isolated true"

A model this small leaves a large GPU mostly idle, so the arms share it as separate processes. The autoencoder is
trained first into OUT/ae unless `--ae` names one; the training scenes are drawn and encoded once (`--workers`
processes draw, the device encodes) into OUT/bank.pt, which every arm loads; each arm then writes its own folder
OUT/NAME (log, checkpoints, weights, `stdout.txt`). When all have stopped, OUT/summary.md tables the last evaluation
of each arm. The exit code is non-zero when an arm failed.

`--pack DIR` also writes, per arm, one uncompressed DIR/NAME.tar holding a complete model folder (weights, configs,
recipe, tokenizer, autoencoder, the whole log with every evaluation) and DIR/summary.md: few, small files, for a
device whose results must come back through a narrow channel (the project's device loans return at most 8 files of
16 MiB). Unpack with `tar -xf NAME.tar` and evaluate with `python -m shapes.eval --weights NAME`.
"""

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from autoencoder import AutoEncoder, AutoEncoderConfig
from shapes import bank
from shapes.autoencoding import train_autoencoder, train_tokenizer
from shapes.recipe import Recipe, ae_config, scene_config

SUMMARY = {
    "step": "step",
    "probe_loss": "loss",
    "probe_loss_shuffled": "shuffled",
    "alone/output_softmax/miou": "output softmax",
    "alone/attention/miou": "attention",
    "context/cross_softmax/miou": "image -> prompt word",
    "budget/lift": "lift",
    "routing/auroc/max": "best head AUROC",
}


def recipe_from_flags(flags: list[str]) -> Recipe:
    """The Recipe that `shapes.train` would build from these recipe flags (others are ignored)."""
    parser = argparse.ArgumentParser(add_help=False)
    for field in dataclasses.fields(Recipe):
        kind = type(field.default)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=str, default=None)
    known, _ = parser.parse_known_args(flags)
    values = {}
    for field in dataclasses.fields(Recipe):
        text = getattr(known, field.name)
        if text is not None:
            kind = type(field.default)
            values[field.name] = text.lower() in ("1", "true", "yes") if kind is bool else kind(text)
    return Recipe(**values)


def prepare_bank(recipe: Recipe, ae_folder: Path | None, out: Path, device: str, workers: int) -> tuple[Path, Path]:
    """Draw, encode and tokenise the recipe's training scenes once, into out/bank.pt (loaded by every arm). Without
    `ae_folder` the autoencoder is trained here first (`train_autoencoder`, seconds on a GPU), its latent shift and
    scale measured on the bank itself, and saved to out/ae. Returns the bank's path and the autoencoder's folder."""
    tok = train_tokenizer(out / "tokenizer_2", 0)
    options = bank.CaptionOptions(recipe.background_phrase, recipe.single_word, recipe.colourless, recipe.positions)
    if ae_folder is not None:
        ae = AutoEncoder(AutoEncoderConfig(**json.loads((ae_folder / "ae_config.json").read_text())))
        ae.load_state_dict(load_file(ae_folder / "ae.safetensors"), strict=True)
    else:
        ae = train_autoencoder(recipe, device, 0, lambda record: print(json.dumps(record), flush=True))
    data = bank.build(ae.to(device).eval(), tok, list(range(recipe.scenes)), scene_config(recipe), options,
                      recipe.max_length, recipe.caption_variants, device, workers)  # fmt: skip
    if ae_folder is None:  # latents of unit spread around zero, as train.autoencoder_stage makes them
        shift, scale = data.latents.mean().item(), 1.0 / data.latents.std().item()
        data.latents = scale * (data.latents - shift)
        scaled = AutoEncoder(ae_config(recipe, scale, shift))
        scaled.load_state_dict(ae.state_dict(), strict=True)
        ae_folder = out / "ae"
        ae_folder.mkdir(parents=True, exist_ok=True)
        save_file(scaled.state_dict(), ae_folder / "ae.safetensors")
        (ae_folder / "ae_config.json").write_text(json.dumps(dataclasses.asdict(scaled.config), indent=2) + "\n")
    return bank.save(data, recipe, out / "bank.pt"), ae_folder


def summary(out: Path, names: list[str]) -> str:
    """A markdown table of each arm's last evaluation."""
    lines = ["| arm | " + " | ".join(SUMMARY.values()) + " |", "|---" * (len(SUMMARY) + 1) + "|"]
    for name in names:
        log = out / name / "log.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        evals = [r for r in records if r["stage"] == "eval"]
        last = evals[-1] if evals else {}
        cells = [f"{last[k]:.3f}" if isinstance(last.get(k), float) else str(last.get(k, "-")) for k in SUMMARY]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


MODEL_FILES = ("flux.safetensors", "t5.safetensors", "ae.safetensors", "flux_config.json", "t5_config.json",
               "ae_config.json", "recipe.json", "log.jsonl", "tokenizer_2")  # fmt: skip


def pack(folder: Path, path: Path, name: str) -> None:
    """A model folder's files (MODEL_FILES) as one uncompressed tar whose members sit under `name/`."""
    with tarfile.open(path, "w") as tar:
        for file in MODEL_FILES:
            if (folder / file).exists():
                tar.add(folder / file, arcname=f"{name}/{file}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--ae",
        type=Path,
        default=None,
        help="a folder with ae.safetensors and ae_config.json (default: train one first, in OUT/ae)",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--minutes", type=float, required=True, help="each arm's budget for its transformer phase")
    parser.add_argument("--workers", type=int, default=0, help="processes drawing the scenes of the shared bank")
    parser.add_argument("--common", default="", help="shapes.train flags shared by every arm")
    parser.add_argument("--pack", type=Path, default=None, help="also write NAME.tar model folders and summary.md here")
    parser.add_argument("--arm", nargs=2, action="append", metavar=("NAME", "FLAGS"), required=True)
    args = parser.parse_args()
    names = [name for name, _ in args.arm]
    if len(set(names)) != len(names):
        parser.error(f"arm names must differ, got {names}")
    args.out.mkdir(parents=True, exist_ok=True)
    keys = {name: bank.key(recipe_from_flags(shlex.split(args.common) + shlex.split(f))) for name, f in args.arm}
    if any(key != keys[names[0]] for key in keys.values()):
        shared = ", ".join(keys[names[0]])
        parser.error(f"the arms must agree on the bank's fields ({shared}): put them in --common")
    start = time.time()
    recipe = recipe_from_flags(shlex.split(args.common))
    path, ae_folder = prepare_bank(recipe, args.ae, args.out, args.device, args.workers)
    print(f"bank ready in {time.time() - start:.0f} s: {path}", flush=True)
    processes = {}
    for name, flags in args.arm:
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "shapes.train", "--out", str(folder), "--ae", str(ae_folder), "--device",
                   args.device, "--minutes", str(args.minutes), "--bank", str(path), *shlex.split(args.common),
                   *shlex.split(flags)]  # fmt: skip
        (folder / "command.txt").write_text(shlex.join(command) + "\n")
        processes[name] = subprocess.Popen(command, stdout=(folder / "stdout.txt").open("w"), stderr=subprocess.STDOUT)
    failed = [name for name, process in processes.items() if process.wait() != 0]
    table = summary(args.out, names)
    (args.out / "summary.md").write_text(table)
    if args.pack is not None:
        args.pack.mkdir(parents=True, exist_ok=True)
        (args.pack / "summary.md").write_text(table)
        for name in names:
            if (args.out / name / "flux.safetensors").is_file():
                pack(args.out / name, args.pack / f"{name}.tar", name)
    print(table + f"{time.time() - start:.0f} s in all", flush=True)
    if failed:
        print(f"error: arms {failed} failed; see their stdout.txt", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
