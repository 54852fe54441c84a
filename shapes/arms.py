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
import json
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

import weights
from shapes import bank
from shapes.autoencoding import save_autoencoder, train_autoencoder, train_tokenizer, unit_scaled
from shapes.recipe import Recipe, add_recipe_flags, recipe_from, scene_config

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
    add_recipe_flags(parser)
    return recipe_from(parser.parse_known_args(flags)[0])


def prepare_bank(recipe: Recipe, ae_folder: Path | None, out: Path, device: str, workers: int) -> tuple[Path, Path]:
    """Draw, encode and tokenise the recipe's training scenes once, into out/bank.pt (loaded by every arm). Without
    `ae_folder` the autoencoder is trained here first (`train_autoencoder`, seconds on a GPU), its latent shift and
    scale measured on the bank itself (`unit_scaled`, as `shapes.train` does), and saved to out/ae. Returns the
    bank's path and the autoencoder's folder."""
    tok = train_tokenizer(out / "tokenizer_2", 0)
    options = bank.CaptionOptions(recipe.background_phrase, recipe.single_word, recipe.colourless, recipe.positions)
    if ae_folder is not None:
        ae = weights.load_autoencoder(ae_folder, device=device, dtype=torch.float32)
    else:
        ae = train_autoencoder(recipe, device, 0, lambda record: print(json.dumps(record), flush=True))
    data = bank.build(ae.eval(), tok, list(range(recipe.scenes)), scene_config(recipe), options, recipe.max_length,
                      recipe.caption_variants, device, workers)  # fmt: skip
    if ae_folder is None:
        ae, data.latents = unit_scaled(ae, data.latents, recipe)
        ae_folder = out / "ae"
        save_autoencoder(ae, ae_folder)
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
