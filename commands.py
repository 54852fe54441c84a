"""The command line of `concept_attention.py`: its parser, the facts of a model read from small files, every check that
needs no weights, and `main`, which runs `generate` or `explain` and writes one result folder.

Every argument is checked before any weights load: the concepts, the device and dtype, the sizes against the model and
the host memory, the steps and layers against the checkpoint's headers, the image or video, and the output folder; the
result is written into a temporary folder moved into place at the end (`outputs.OutputFolder`). Errors are one line
(`error: ...`, exit 2); Ctrl-C and SIGTERM leave nothing behind (exit 130, 143).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import concept_attention
import imaging
from checks import (
    InputWarning,
    OneLineParser,
    check_count,
    check_device,
    check_seed,
    check_t,
    index,
    interrupted,
    text_warnings,
    unseen_words,
)
from concept_attention import (
    BUILTIN_MODEL,
    DEFAULT_MODEL,
    EXPLAIN_GUIDANCE,
    MAX_SAMPLES,
    MAX_STEPS,
    ConceptAttentionPipeline,
    native_size,
    sampling_defaults,
)
from mmdit.memory import MEMORY_MODES
from outputs import OutputFolder
from saliency import (
    PRESETS,
    SPACES,
    TARGETS,
    TOKEN_RULES,
    Settings,
    check_concepts,
    family_settings,
    for_family,
)
from sampling import check_size
from shapes.scenes import world_words
from video import latent_frames


def _parse_size(text: str) -> tuple[int, int]:
    """ "512" -> (512, 512); "512x768" -> (512, 768) as height x width."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size {text!r}: give one number (512) or height x width (512x768)")
    h, w = (int(parts[0]), int(parts[-1]))
    return h, w


def _settings_from_args(args: argparse.Namespace, family: str = "flux") -> Settings:
    """The preset (the family's own version of it: "official" on SD3.5 is the official SD3 recipe) with the options
    given beside it, checked against the family."""
    base = for_family(PRESETS[args.preset], family)
    changes = {
        "space": args.space,
        "layers": tuple(args.layers) if args.layers else None,
        "steps": tuple(args.steps_used) if args.steps_used else None,
        "target": args.target,
        "token_rule": args.token_rule,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.no_softmax:
        changes["softmax"] = False
    if args.normalize:
        changes["normalize"] = True
    return family_settings(dataclasses.replace(base, **changes), family)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="concept_attention.py", description=concept_attention.__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate an image and its concept maps")
    gen.add_argument("--prompt", required=True, help="what to draw, e.g. 'a cat on the grass under the sky'")
    gen.add_argument("--num-steps", type=int, default=None,
                     help="sampling steps (default: the model's own: 4 for schnell and SD3.5 Large Turbo, 28 for "
                     "SD3.5 Large, 40 for Medium, 50 for shapes)")  # fmt: skip
    gen.add_argument("--frames", type=int, default=None,
                     help="CogVideoX: frames of the video, 1 + 4k (default 49); refused for image models")  # fmt: skip
    gen.add_argument("--guidance", type=float, default=None,
                     help="SD3.5: classifier-free guidance scale, none at or below 1 (default: the model card's: 0 for "
                     "Large Turbo, 3.5 Large, 4.5 Medium); FLUX.1-dev: its distilled guidance (3.5)")  # fmt: skip
    exp = sub.add_parser("explain", help="concept maps for a given image")
    exp.add_argument("--image", help="PNG/JPEG file (image models)")
    exp.add_argument("--video", help="a clip for CogVideoX: an animated GIF/WebP or a folder of frames")
    exp.add_argument("--prompt", default="", help="caption used as the prompt (default: empty)")
    exp.add_argument("--t", type=float, default=0.5, help="noise level of the single forward (default 0.5)")
    exp.add_argument("--samples", type=int, default=1, help="noise draws averaged (seeds seed..seed+n-1)")
    exp.add_argument("--guidance", type=float, default=EXPLAIN_GUIDANCE,
                     help=f"guidance for guidance-distilled models such as FLUX.1-dev (default {EXPLAIN_GUIDANCE}; "
                     "the official code feeds 0); schnell ignores it")  # fmt: skip
    for p in (gen, exp):
        p.add_argument("--concepts", nargs="+", required=True, help="the words to localise, e.g. cat sky grass")
        p.add_argument("--out", required=True, help="folder for the image, heatmaps, overlay, masks, maps, settings")
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local folder or 'shapes' ({DEFAULT_MODEL})")
        p.add_argument(
            "--size",
            type=_parse_size,
            help="512 or HxW, multiples of 16 (default: the model's native "
            "size, 1024 for FLUX.1 and 128 for shapes; explain: the image, long side at most that)",
        )
        p.add_argument(
            "--seed",
            type=int,
            default=0,
            help="seed of the noise (generate: the image; explain: the first draw); default 0",
        )
        p.add_argument(
            "--preset",
            choices=sorted(PRESETS),
            default="default",
            help="a named set of the options below: default (the paper's output space, every block and "
            "step, concepts as the mean of their pieces); official (the official code's blocks and token "
            "rule; on SD3.5 and CogVideoX the official code's whole recipe there); official-demo; paper-imagenet. "
            "An option given beside it wins",
        )
        p.add_argument("--space", choices=SPACES, help="saliency space (default: output, the paper's)")
        p.add_argument(
            "--layers",
            type=index,
            nargs="+",
            help="double-block indices averaged (default: the model's own, recipe.json's layers, else all)",
        )
        p.add_argument("--steps-used", type=index, nargs="+", help="sampling steps (or noise samples) averaged")
        p.add_argument("--target", choices=TARGETS, help="what concepts attend to (default: concepts+image)")
        p.add_argument("--token-rule", choices=TOKEN_RULES, help="multi-piece concepts (default: mean)")
        p.add_argument("--no-softmax", action="store_true", help="skip the softmax over concepts")
        p.add_argument("--normalize", action="store_true", help="the official evaluation's concept normalisation")
        p.add_argument("--grid", action="store_true", help="also keep and save the layer x step grid of maps")
        p.add_argument("--device", help="cuda, cpu, mps ... (default: cuda if available)")
        p.add_argument(
            "--dtype",
            metavar="{bfloat16,float32}",
            help="default: bfloat16 on a GPU, float32 on the CPU (float16 overflows these models)",
        )
        p.add_argument("--memory", choices=MEMORY_MODES, default="full",
                       help="full; offload (text encoders on the CPU between uses); stream (transformer and T5 "
                       "blocks streamed from host memory); fp8 (fp8 transformer weights, T5 streamed)")  # fmt: skip
        p.add_argument("--offload", action="store_true", help="the same as --memory offload")
    return parser


@dataclass(frozen=True)
class ModelFacts:
    """What the command checks its arguments against, read from small files before any weights load."""

    source: str
    depth: int  # double blocks
    hidden_size: int
    ae_channels: int  # width of the autoencoder's full-resolution level
    max_length: int
    native_size: int
    tokenizer: object
    num_steps: int = 4  # the model's default sampling steps
    block_kind: str = "double blocks"  # what `--layers` indexes
    max_size: int | None = None  # the largest side the model takes (SD3: its position table), None = any
    known_words: frozenset[str] | None = None  # a built-in model's world (recipe.json), None for real models
    family: str = "flux"
    native_shape: tuple[int, int] | None = None  # height, width of a generated result when not square (CogVideoX)


def model_facts(source: str | Path) -> ModelFacts:
    """The tokenizer, the T5 length and the sizes that matter for the checks, from the checkpoints' headers."""
    import weights
    from weights.configs import count_blocks

    source = BUILTIN_MODEL if str(source) == "shapes" else source
    family = weights.family(source)
    if family == "sd3":
        from sd3.pipeline import sd3_facts

        return sd3_facts(source)
    if family == "cogvideox":
        from cogvideox.pipeline import cogvideox_facts

        return cogvideox_facts(source)
    flux = weights.read_weights(weights.locate(source, "flux"))
    depth = count_blocks(flux, "double_blocks") or count_blocks(flux, "transformer_blocks")
    embed = flux.get("img_in.weight") or flux.get("x_embedder.weight")
    ae = weights.read_weights(weights.locate(source, "autoencoder")).get("encoder.conv_in.weight")
    return ModelFacts(
        str(source), depth, embed.shape[0] if embed else 3072, ae.shape[0] if ae else 128,
        weights.t5_max_length(source), native_size(source), weights.load_t5_tokenizer(source),
        sampling_defaults(source)[0], known_words=world_words(source),
    )  # fmt: skip


PICK = "; give --layers and --steps-used, or another --preset"  # when a preset's choice does not fit the model


# the components whose float16 safety the command line checks before anything loads, per family
FAMILY_COMPONENTS = {"flux": ("flux", "autoencoder", "t5"), "sd3": ("sd3", "sd3_autoencoder", "sd3_t5"),
                     "cogvideox": ("cogvideox", "cogvideox_autoencoder", "cogvideox_t5")}  # fmt: skip


def check_arguments(args: argparse.Namespace, settings: Settings, facts: ModelFacts) -> tuple[int, int]:
    """Every check that needs no weights; -> the size the model will run at (explain: printed when resized)."""
    size = _check_arguments(args, settings, facts)
    if facts.max_size is not None and max(size) > facts.max_size:
        raise ValueError(f"size {size[0]}x{size[1]}: this model takes at most {facts.max_size} px a side (its position "
                         "table); give a smaller --size")  # fmt: skip
    return size


def _check_arguments(args: argparse.Namespace, settings: Settings, facts: ModelFacts) -> tuple[int, int]:
    if args.command == "generate" and args.num_steps is None:
        args.num_steps = facts.num_steps
    count = args.num_steps if args.command == "generate" else args.samples
    if args.command == "generate":
        check_count(args.num_steps, "--num-steps", 1, MAX_STEPS)
    else:
        check_t(args.t)
        check_count(args.samples, "--samples", 1, MAX_SAMPLES)
    check_seed(args.seed, 1 if args.command == "generate" else args.samples)
    if settings.steps is not None and max(settings.steps) >= count:
        what = "sampling steps (--num-steps)" if args.command == "generate" else "noise samples (--samples)"
        given, fix = ("--steps-used", "") if args.steps_used else (f"the preset {args.preset!r} uses steps", PICK)
        raise ValueError(f"{given} {list(settings.steps)}: there are only {count} {what}{fix}")
    if settings.layers is not None and max(settings.layers) >= facts.depth:
        given, fix = ("--layers", "") if args.layers else (f"the preset {args.preset!r} averages blocks", PICK)
        raise ValueError(f"{given} {list(settings.layers)}: this model has {facts.depth} {facts.block_kind} "
                         f"(0..{facts.depth - 1}){fix}")  # fmt: skip
    if args.grid and facts.family == "cogvideox":
        raise ValueError("--grid: the layer x step grid is not available for videos (CogVideoX) yet")
    if args.command == "generate":
        if facts.family == "cogvideox":
            from cogvideox.pipeline import FRAMES, check_frames

            args.frames = check_frames(FRAMES if args.frames is None else args.frames)
        elif args.frames is not None:
            raise ValueError(f"--frames is for CogVideoX (video); {args.model} is an image model ({facts.family})")
        return args.size or facts.native_shape or (facts.native_size, facts.native_size)
    if (args.image is None) == (args.video is None):
        raise ValueError("explain needs --image FILE (image models) or --video CLIP (CogVideoX), one of them")
    if (args.video is not None) != (facts.family == "cogvideox"):
        given = "--video" if args.video is not None else "--image"
        raise ValueError(f"{given} does not fit the model {facts.source} ({facts.family}): give "
                         f"{'--image' if given == '--video' else '--video'}")  # fmt: skip
    if args.video is not None:
        from video import load_video

        image = load_video(args.video, max_frames=1)[0]
    else:
        image = imaging.load_image(args.image)
    if args.size is not None:
        return args.size
    size = imaging.auto_size(image.height, image.width, facts.native_size)
    if size != (image.height, image.width):
        rule = f"long side at most {facts.native_size}, multiples of 16"
        print(f"note: {args.video or args.image} is {image.height}x{image.width}; explaining it at {size[0]}x{size[1]} "
              f"({rule}); --size HxW picks another size", file=sys.stderr)  # fmt: skip
    return size


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = None
    try:
        concepts = check_concepts(args.concepts)
        device = check_device(args.device)
        import weights

        if args.dtype not in (None, "bfloat16", "float32", "float16"):  # float16: refused below, with the reason
            raise ValueError(f"--dtype {args.dtype!r}: choose bfloat16 or float32")
        dtype = getattr(torch, args.dtype) if args.dtype else None
        facts = model_facts(args.model)
        for component in FAMILY_COMPONENTS[facts.family]:  # float16 refused here, naming the family's own model
            run_dtype = weights.resolve_device_dtype(component, device, dtype)[1]
        settings = _settings_from_args(args, facts.family)
        size = check_arguments(args, settings, facts)
        check_size(*size)
        video = args.command == "generate" and facts.family == "cogvideox"  # explain's clip is counted once read
        imaging.check_memory(*size, device, run_dtype, facts.ae_channels, facts.hidden_size, facts.max_length,
                             latent_frames(args.frames) if video else 1)  # fmt: skip
        prompt = args.prompt
        notes = text_warnings(facts.tokenizer, facts.max_length, prompt, concepts, settings.softmax)
        for note in notes + unseen_words(concepts, facts.known_words):
            print(f"warning: {note}", file=sys.stderr)
        inputs = tuple(p for p in (getattr(args, "image", None), getattr(args, "video", None)) if p is not None)
        folder = OutputFolder(args.out, concepts, inputs=inputs)
        pipe = ConceptAttentionPipeline.from_pretrained(args.model, device, dtype, args.offload, args.memory)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputWarning)  # already printed above
            if args.command == "generate":
                frames = {"num_frames": args.frames} if facts.family == "cogvideox" else {}
                result = pipe.generate(prompt, concepts, size[0], size[1], args.num_steps, args.seed, settings,
                                       keep_grid=args.grid, guidance=args.guidance, **frames)  # fmt: skip
            else:
                source = args.video or args.image
                result = pipe.explain(source, concepts, prompt, args.t, args.samples, args.seed, settings,
                                      keep_grid=args.grid, size=args.size, guidance=args.guidance)  # fmt: skip
        result.record.update(device=str(device), dtype=str(pipe.dtype).removeprefix("torch."), memory=pipe.memory)
        out = folder.write(result)
        if (note := result.flat_note()) is not None:
            print(f"warning: {note}", file=sys.stderr)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM under terminate_as_interrupt: the finally cleans up
        return interrupted(stop, "nothing was written" if folder is None else f"nothing was written to {folder.out}")
    finally:
        if folder is not None:
            folder.discard()
    done = "replaced the earlier result in" if folder.replaces else "wrote"
    grid = "grid.png, " if result.grid is not None else ""
    pictures = "video.webp, contact_sheet.png" if facts.family == "cogvideox" else f"image.png, overlay.png, {grid}"
    print(f"{done} {out}/: {pictures.rstrip(', ')}, heatmaps/, masks/, maps.safetensors, settings.json")
    return 0
