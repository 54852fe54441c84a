"""Command line of the segmentation benchmark.

    python -m segmentation run --dataset imagenet --data gtsegs_ijcv.mat --protocol paper-imagenet --out runs/in
    python -m segmentation run --dataset voc --data VOCdevkit --protocol paper-voc-single \
        --methods output attention value cross_attention --softmax on off --out runs/voc
    torchrun --nproc-per-node 8 -m segmentation run ...      (each rank takes every 8th image; the last one merges)
    python -m segmentation merge --out runs/voc               (merge shards by hand, e.g. after runs on several hosts)
    python -m segmentation protocols                          (print the presets)

Every protocol setting can be overridden; `--methods`, `--softmax`, `--layers`, `--t` and `--blur` take several values
and the run scores every combination, sharing one forward per image and t.

Bad input is one line on stderr (`error: ...`) and exit code 2, with no traceback, and everything that can be checked
without the weights is checked before they load: the arguments (layer ranges, t, samples, seed, limit, rank and world
size), the device and dtype, the dataset files, the class map, the output folder, each image's size against its mask,
each image's concepts, and the layers against the checkpoint (its headers, config and tokenizer; no weights read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from checks import OneLineParser

from .datasets import open_dataset
from .protocols import CLASS_MAPS, PROTOCOLS
from .run import check_layers, merge, method_grid, parse_layers, prepare, run_plan

SWITCH = {"on": True, "off": False}


def at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m segmentation", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="score methods on a dataset (resumes from OUT/cache)")
    r.add_argument("--dataset", required=True, choices=("imagenet", "voc", "folder"))
    r.add_argument("--data", required=True, help="gtsegs_ijcv.mat, the VOCdevkit folder, or your folder")
    r.add_argument("--split", default="val", help="VOC split file in ImageSets/Segmentation (default val)")
    r.add_argument("--protocol", default="paper-imagenet", choices=sorted(PROTOCOLS))
    r.add_argument("--model", default="black-forest-labs/FLUX.1-schnell", help="hub id, local folder, or 'shapes'")
    r.add_argument("--out", required=True, help="results, cache and shards go here")
    r.add_argument("--methods", nargs="+", choices=("output", "attention", "value", "cross_attention"),
                   help="saliency spaces to compare (default: the protocol's)")  # fmt: skip
    r.add_argument("--softmax", nargs="+", choices=("on", "off"), help="softmax over concepts (default: protocol)")
    r.add_argument("--layers", nargs="+", help="layer sets, e.g. 14-17 all 18 (default: the protocol's)")
    r.add_argument("--t", nargs="+", type=float, help="noise levels (default: the protocol's)")
    r.add_argument("--blur", nargs="+", choices=("on", "off"), help="3x3 Gaussian blur (default: protocol)")
    r.add_argument("--samples", type=at_least(1), help="noise samples per image (default: the protocol's)")
    r.add_argument("--seed", type=at_least(0), help="seed of the first noise sample (default: the protocol's)")
    r.add_argument("--normalize", choices=("on", "off"), help="official concept normalisation (default: protocol)")
    r.add_argument("--token-rule", choices=("first", "mean", "pieces"), help="multi-piece concepts (default: protocol)")
    r.add_argument("--class-map", help=f"{', '.join(CLASS_MAPS)} or a JSON file {{class: concept}}")
    r.add_argument("--limit", type=at_least(1), help="score only the first N selected images")
    r.add_argument("--rank", type=at_least(0), help="this shard (default: $RANK or 0)")
    r.add_argument("--world-size", type=at_least(1), help="number of shards (default: $WORLD_SIZE or 1)")
    r.add_argument("--device", help="default: cuda:$LOCAL_RANK when a GPU is present, else cpu")
    r.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    r.add_argument("--offload", action="store_true", help="keep the text encoders on the CPU")
    r.add_argument("--no-progress", action="store_true")
    m = sub.add_parser("merge", help="merge the shard files in OUT/shards into OUT/results.json and results.md")
    m.add_argument("--out", required=True)
    m.add_argument("--world-size", type=at_least(1), help="default: the largest shard count found")
    sub.add_parser("protocols", help="print the presets")
    return parser


def protocol_from_args(args: argparse.Namespace):
    protocol = PROTOCOLS[args.protocol]
    return protocol.with_overrides(num_samples=args.samples, seed=args.seed, token_rule=args.token_rule,
                                   normalize=None if args.normalize is None else SWITCH[args.normalize])  # fmt: skip


def methods_from_args(args: argparse.Namespace, protocol) -> list:
    return method_grid(
        args.methods or [protocol.space],
        [SWITCH[s] for s in args.softmax] if args.softmax else [protocol.softmax],
        [parse_layers(x) for x in args.layers] if args.layers else [protocol.layers],
        args.t or [protocol.t],
        [SWITCH[s] for s in args.blur] if args.blur else [protocol.blur],
    )


def environment_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    if not text.strip().isdigit():
        raise ValueError(f"${name} = {text!r}: expected a whole number (torchrun sets it)")
    return int(text)


def choose_device(text: str | None) -> str:
    """The device to run on, after checking it exists here: cuda:$LOCAL_RANK when a GPU is present, else cpu."""
    import torch

    from checks import check_device

    if text is None:
        text = f"cuda:{environment_int('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    return str(check_device(text))


def build_pipeline(args: argparse.Namespace):
    import torch

    from concept_attention import ConceptAttentionPipeline

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return ConceptAttentionPipeline.from_pretrained(args.model, device=args.device, dtype=dtype, offload=args.offload)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = build_parser().parse_args(argv)
    try:
        return command(args)
    except (ValueError, OSError, ImportError) as error:  # bad input, missing or damaged files, a missing package
        print(f"error: {error}", file=sys.stderr)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM under terminate_as_interrupt
        from checks import interrupted

        return interrupted(stop, "the finished images are in the cache: the same command resumes")
    except torch.OutOfMemoryError:
        device = getattr(args, "device", None)
        print(f"error: out of memory on {device}; try --dtype bfloat16, --offload, or a smaller protocol resize",
              file=sys.stderr)  # fmt: skip
    return 2


def command(args: argparse.Namespace) -> int:
    from commands import model_facts

    if args.command == "protocols":
        for name, protocol in PROTOCOLS.items():
            print(name, json.dumps(protocol.to_json()))
        return 0
    if args.command == "merge":
        results = merge(args.out, args.world_size)
        print(open(os.path.join(args.out, "results.md")).read() if results else "")
        return 0
    rank = args.rank if args.rank is not None else environment_int("RANK", 0)
    world_size = args.world_size if args.world_size is not None else environment_int("WORLD_SIZE", 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}: ranks run from 0 to world size - 1")
    if args.dtype == "float16":
        raise ValueError("--dtype float16: T5 and the autoencoder overflow in it (NaN); use bfloat16 or float32")
    protocol = protocol_from_args(args)
    methods = methods_from_args(args, protocol)
    args.device = choose_device(args.device)
    dataset = open_dataset(args.dataset, args.data, args.split)
    class_map = args.class_map or ("none" if args.dataset == "folder" else protocol.class_map)
    facts = model_facts(args.model)  # the checkpoint's headers, config and tokenizer: no weights read
    if facts.family == "cogvideox":
        raise ValueError(f"{args.model} is a CogVideoX (video) model; the benchmark scores image models (FLUX.1, "
                         "SD3.5, the built-in model)")  # fmt: skip
    check_layers(methods, facts.depth, f"the model {args.model}", facts.block_kind)
    plan = prepare(dataset, protocol, methods, args.out, limit=args.limit, rank=rank, world_size=world_size,
                   class_map=class_map, model=args.model)  # fmt: skip
    pipe = build_pipeline(args)
    results = run_plan(pipe, plan, progress=not args.no_progress)
    if results is not None:
        print((open(os.path.join(args.out, "results.md"))).read())
    else:
        print(f"rank {rank}: shard written to {args.out}/shards; the results appear when all {world_size} are in")
    return 0


if __name__ == "__main__":
    from checks import terminate_as_interrupt

    with terminate_as_interrupt():
        code = main()
    sys.exit(code)
