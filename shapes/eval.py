"""Quick alignment measurements of a shapes model on held-out scenes, used while training and researching.

The maps come straight from `mmdit.Flux(..., concepts=ConceptInput(...), stop_after_double=True)` on noised latents
x_t = t * noise + (1 - t) * z, one forward per batch; each map is bilinearly upsampled to the image, thresholded at its
mean and compared with the scene's exact mask. Scores follow the prototype's notes (shapes-notes.md): for every shape
present in a scene, the IoU of the foreground and the IoU of the background are averaged ("mIoU"); `fg` is the
foreground IoU alone; `argmax` and `argmax_fg` score the same IoUs with each pixel given to the word whose map is
highest there (a map the same for every word gives every pixel to one word; `shapes.measures.score`). The full
benchmark (pixel accuracy, mAP, every space and layer) is the `segmentation` harness's job; this module only answers
"does it localise yet?" quickly.

Two kinds of concept tokens are measured:
- "alone": every shape word and "background", each encoded by T5 on its own and read at position 0, as the paper does.
  Output space (softmax over the concepts, as the paper, and raw; and with the concepts attending to the image only),
  attention-score space and cross-attention space;
- "context": the whole caption's T5 sequence fed as the concept stream. With a zero pooled vector and zero ids that
  stream is an exact copy of the text stream, so its cross-attention space is the image queries -> prompt-word keys
  attention (softmax over all prompt tokens, per head), the first sign of life, and its output space says what
  ConceptAttention would give if the concept token were the word in its caption.

`budget/*` says where the concept queries' attention goes (`shapes.measures.attention_budget`): how much of it is on
the image, how uniform it is there, and how much more of it lands on the named shape than a uniform map would put
there.
`routing/*` (`routing_diagnostics`) says it per double block: the AUROC with which each head's concept attention ranks
the named shape's tokens above the others, the share of the concept -> image logits that is one positional pattern
shared by every scene, lift and entropy, and the output-space mIoU of the block alone.

`isolate=True` evaluates with the image tokens isolated from each other (each attends only to itself and the text),
the regime of a model trained with `--isolate 1.0`.
"""

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor

from autoencoder import AutoEncoder, AutoEncoderConfig
from checks import OneLineParser, check_count, check_finite, check_t, interrupted, terminate_as_interrupt
from mmdit import ConceptInput, Flux, FluxConfig
from sampling import denoise, get_noise, get_schedule, image_ids, pack, text_ids, unpack
from shapes.measures import attention_budget, routing_diagnostics, score
from shapes.scenes import (
    COLOURS,
    WORLDS,
    Scene,
    SceneConfig,
    held_out_seeds,
    make_batch,
    make_scene,
    validation_seeds,
)
from t5 import T5Config, T5Encoder, T5Tokenizer

SAMPLE_PROMPTS = {  # per world (shapes.scenes.WORLDS): the prompts of the model card's samples.png, in its order
    "full": [
        "a red circle",
        "a blue star on a white background",
        "a yellow heart and a green square",
        "a purple triangle at the top left and a orange diamond at the bottom right",
        "a red star and a blue circle and a green triangle on a black background",
    ],
    "simple": [
        "a red circle",
        "a blue square on a black background",
        "a green triangle and a red square",
        "a blue circle at the top left and a green square at the bottom right",
        "a red triangle and a blue circle and a green square on a black background",
    ],
}
SAMPLE_PROMPTS["shaded"] = [  # most shaded-world runs (third round) never saw places named: these name none
    "a red circle",
    "a blue square on a black background",
    "a green triangle and a red square",
    "a blue circle and a green square",
    "a red triangle and a blue circle and a green square on a black background",
]
COLOUR_CONCEPTS = (*COLOURS, "background")


def world_concepts(world: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The shape concepts and the colour concepts of a scene world (`shapes.scenes.WORLDS`), each with "background"."""
    config = SceneConfig(**WORLDS[world])
    return (*config.shapes, "background"), (*config.colours, "background")


def isolation_mask(batch: int, text: int, image: int, share: float, generator: torch.Generator) -> Tensor | None:
    """Joint-attention masks (B, T+N, T+N) for a batch: in a random `share` of the samples no image token may attend
    to another image token (only to itself and the text), so the text tokens become the image tokens' only channel to
    each other (the research log's r10); None when `share` is 0. Built on the generator's device."""
    if share == 0:
        return None
    L, device = text + image, generator.device
    is_image = torch.arange(L, device=device) >= text
    image_pairs = is_image[:, None] & is_image[None, :] & ~torch.eye(L, dtype=torch.bool, device=device)  # (L, L)
    isolated = torch.rand(batch, generator=generator, device=device) < share  # (B,)
    return ~(isolated[:, None, None] & image_pairs)  # (B, L, L), built on the generator's device


def noised(latents: Tensor, t: float, seed: int) -> Tensor:
    """x_t = t * noise + (1 - t) * z with noise from a seeded CPU generator (the rectified-flow path)."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents)
    return t * noise + (1.0 - t) * latents


def encode_alone(t5: T5Encoder, tok: T5Tokenizer, words: list[str], max_length: int) -> Tensor:
    """Each word encoded on its own, padded, no mask; the output at position 0 (its first piece) -> (C, d_model)."""
    device = next(t5.parameters()).device
    return t5(tok(words, max_length).to(device))[:, 0]


def layer_mean(per_layer: list[Tensor], softmax_dim: int | None) -> Tensor:
    """Mean over layers of (B, ..., C, N) maps, each softmaxed over `softmax_dim` first when given (paper order)."""
    return torch.stack([m.softmax(softmax_dim) if softmax_dim is not None else m for m in per_layer]).mean(0)


def layer_sets(depth: int) -> dict[str, tuple[int, ...]]:
    """The concept-layer sets `--choose-layers` compares, in order of preference on a tie: every double block, the
    deeper half (the paper reads the last 10 of FLUX.1's 19), each block alone."""
    sets = {"all": tuple(range(depth)), "deeper half": tuple(range(depth // 2, depth))}
    sets.update({f"block {i}": (i,) for i in range(depth)})
    unique: dict[str, tuple[int, ...]] = {}
    for name, layers in sets.items():
        if layers not in unique.values():
            unique[name] = layers
    return unique


def evaluate(
    flux: Flux,
    t5: T5Encoder,
    tok: T5Tokenizer,
    latents: Tensor,
    scenes: list[Scene],
    captions: list[str],
    max_length: int,
    t: float = 0.5,
    seed: int = 0,
    layers: tuple[int, ...] | None = None,
    world: str = "full",
    isolate: bool = False,
) -> dict[str, float]:
    """Alignment scores of `flux` on scenes with clean latents (B, 16, H/8, W/8); see the module docstring. The
    concepts are the shape (and colour) words of the scenes' `world`; `isolate` masks image -> image attention."""
    device = latents.device
    B, _, h2, w2 = latents.shape
    size = scenes[0].image.shape[0]
    h, w = h2 // 2, w2 // 2
    img = pack(noised(latents, t, seed))  # (B, N, 64)
    ids = image_ids(B, size, size, device)
    txt = t5(tok(captions, max_length).to(device))  # (B, T, d)
    timesteps = torch.full((B,), t, device=device)
    y = torch.zeros(B, flux.config.vec_in_dim, device=device)  # the pooled vector is zero in this model
    mask = isolation_mask(B, max_length, h * w, 1.0, torch.Generator()) if isolate else None
    mask = None if mask is None else mask.to(device)
    common = dict(
        img=img,
        img_ids=ids,
        txt=txt,
        txt_ids=text_ids(B, max_length, device),
        timesteps=timesteps,
        y=y,
        attention_mask=mask,
    )
    results: dict[str, float] = {}

    # concepts encoded alone
    concepts, colour_concepts = world_concepts(world)
    alone = encode_alone(t5, tok, list(concepts), max_length)[None].expand(B, -1, -1)  # (B, C, d)
    spaces = ("output", "attention", "cross_attention")
    out = flux(**common, concepts=ConceptInput(alone, spaces=spaces, layers=layers), stop_after_double=True)
    by_block = dict(out.saliency)
    sal = [by_block[i] for i in sorted(by_block)]
    words = [list(concepts)] * B
    maps = {
        "output_softmax": layer_mean([s.output for s in sal], softmax_dim=1),  # (B, C, N)
        "output_raw": layer_mean([s.output for s in sal], None),
        "attention": layer_mean([s.attention.mean(1) for s in sal], None),  # heads averaged
        "cross_softmax": layer_mean([s.cross_attention.softmax(2).mean(1) for s in sal], None),
    }
    # colour words as concepts (each colour's mask is the shape painted in it)
    colours = encode_alone(t5, tok, list(colour_concepts), max_length)[None].expand(B, -1, -1)  # (B, C, d)
    out = flux(**common, concepts=ConceptInput(colours, layers=layers), stop_after_double=True)
    colour_maps = layer_mean([out.saliency[i].output for i in sorted(out.saliency)], 1).reshape(B, -1, h, w)
    for key, value in score(colour_maps, scenes, [list(colour_concepts)] * B, COLOURS).items():
        results[f"colours/output_softmax/{key}"] = value
    # the paper's Table 4 ablation: concepts attend to the image only
    out = flux(**common, concepts=ConceptInput(alone, target="image", layers=layers), stop_after_double=True)
    maps["output_softmax_image_target"] = layer_mean([out.saliency[i].output for i in sorted(out.saliency)], 1)
    for name, m in maps.items():
        for key, value in score(m.reshape(B, -1, h, w), scenes, words).items():
            results[f"alone/{name}/{key}"] = value
    if layers is None and len(sal) > 1:  # the deeper half alone (the paper's read-out), beside every block
        deeper = layer_mean([by_block[i].output for i in sorted(by_block)[len(sal) // 2 :]], softmax_dim=1)
        results["alone/output_softmax_deeper/miou"] = score(deeper.reshape(B, -1, h, w), scenes, words)["miou"]
    results.update(attention_budget(sal, scenes, h, w, concepts))
    results.update(routing_diagnostics(by_block, scenes, h, w, concepts, words))

    # the caption itself as the concept stream (an exact copy of the text stream)
    out = flux(
        **common,
        concepts=ConceptInput(txt, spaces=("output", "cross_attention"), layers=layers),
        stop_after_double=True,
    )
    sal = [out.saliency[i] for i in sorted(out.saliency)]
    positions = [[""] * max_length for _ in range(B)]
    for b, caption in enumerate(captions):
        for word, pieces in tok.word_pieces(caption):
            if pieces and pieces[0] < max_length:
                positions[b][pieces[0]] = word
    maps = {
        "output_raw": layer_mean([s.output for s in sal], None),
        "cross_softmax": layer_mean([s.cross_attention.softmax(2).mean(1) for s in sal], None),
    }
    for name, m in maps.items():
        for key, value in score(m.reshape(B, -1, h, w), scenes, positions).items():
            results[f"context/{name}/{key}"] = value
    return results


@torch.no_grad()
def choose_layers(folder: Path, scenes: int = 500, t: float = 0.5, seed: int = 0) -> dict:
    """The concept-layer set of `layer_sets` whose output space with softmax over the concepts (the paper's map) scores
    the highest mIoU on `scenes` VALIDATION scenes (`validation_seeds`: no test scene is ever used) at noise level t;
    -> {"layers": [...], "layers_chosen": {how, and every candidate's score}}, what `write_layers` puts in
    recipe.json."""
    flux, t5, tok, ae, max_length = load(folder)
    world = json.loads((Path(folder) / "recipe.json").read_text()).get("world", "full")
    config = SceneConfig(size=ae.config.resolution, **WORLDS[world])
    concepts, _ = world_concepts(world)
    seeds = validation_seeds(scenes)
    drawn = [make_scene(s, config) for s in seeds]
    per_block: list[Tensor] = []  # (L, C, N) softmaxed over concepts, per scene
    for i in range(0, scenes, 50):
        part = drawn[i : i + 50]
        latents = ae.encode(make_batch(seeds[i : i + 50], config)[0])
        B, _, h2, w2 = latents.shape
        common = dict(
            img=pack(noised(latents, t, seed + i)),
            img_ids=image_ids(B, config.size, config.size),
            txt=t5(tok([s.caption for s in part], max_length)),
            txt_ids=text_ids(B, max_length),
            timesteps=torch.full((B,), t),
            y=torch.zeros(B, flux.config.vec_in_dim),
        )
        alone = encode_alone(t5, tok, list(concepts), max_length)[None].expand(B, -1, -1)
        out = flux(**common, concepts=ConceptInput(alone, spaces=("output",)), stop_after_double=True)
        per_block.append(torch.stack([out.saliency[j].output.float().softmax(1) for j in sorted(out.saliency)], 1))
    maps = torch.cat(per_block)  # (S, L, C, N)
    h, w = h2 // 2, w2 // 2
    words = [list(concepts)] * scenes
    candidates = layer_sets(flux.config.depth)
    scores = {
        name: round(score(maps[:, list(layers)].mean(1).reshape(scenes, -1, h, w), drawn, words)["miou"], 4)
        for name, layers in candidates.items()
    }
    best = max(scores, key=lambda name: scores[name])  # the first of equals: max keeps the earliest
    how = {
        "split": f"validation scenes, seeds {seeds[0]}..{seeds[-1]} (never a test scene)",
        "scenes": scenes,
        "t": t,
        "metric": "output space, softmax over concepts, mean-threshold mIoU (python -m shapes.eval --choose-layers)",
        "chosen": best,
        "scores": {f"{name} {list(layers)}": scores[name] for name, layers in candidates.items()},
    }
    return {"layers": list(candidates[best]), "layers_chosen": how}


def write_layers(folder: Path, choice: dict) -> None:
    """Put `choose_layers`' choice into the folder's recipe.json (its other fields unchanged)."""
    path = Path(folder) / "recipe.json"
    recipe = json.loads(path.read_text())
    recipe.update(choice)
    path.write_text(json.dumps(recipe, indent=2) + "\n")


def recipe_layers(recipe: dict, depth: int) -> tuple[int, ...] | None:
    """A recipe's concept-layer default ("layers"), or None (every block) when it has none."""
    layers = recipe.get("layers")
    if layers is None:
        return None
    if not isinstance(layers, list) or not layers or any(type(i) is not int or not 0 <= i < depth for i in layers):
        raise ValueError(f"recipe.json: layers = {layers!r}, expected a list of double-block indices 0..{depth - 1}")
    return tuple(layers)


def load(folder: Path, device: str = "cpu") -> tuple[Flux, T5Encoder, T5Tokenizer, AutoEncoder, int]:
    """A model folder written by `shapes.train`: (flux, t5, tokenizer, autoencoder, max_length), loaded strictly.
    An evaluation's weights (`RUN/steps/NNNNNN`) or a checkpoint (`RUN/checkpoint`) hold no autoencoder or tokenizer:
    theirs are the run's own (`RUN/ae.safetensors`, `RUN/tokenizer_2`)."""
    folder = Path(folder)
    run = folder.parent.parent if folder.parent.name == "steps" else folder.parent
    shared = run if folder.parent.name == "steps" or folder.name == "checkpoint" else folder

    def own(name: str) -> Path:  # the folder's file, else (an evaluation's or checkpoint's) the run's
        return folder / name if (folder / name).exists() or shared == folder else shared / name

    models = []
    for name, config_class, model_class in (
        ("flux", FluxConfig, Flux),
        ("t5", T5Config, T5Encoder),
        ("ae", AutoEncoderConfig, AutoEncoder),
    ):
        with damaged(own(f"{name}_config.json")):
            model = model_class(config_class(**json.loads(own(f"{name}_config.json").read_text())))
        with damaged(own(f"{name}.safetensors")):
            model.load_state_dict(load_file(own(f"{name}.safetensors")), strict=True)
        check_finite(model, str(own(f"{name}.safetensors")))
        models.append(model.to(device).eval())
    with damaged(folder / "recipe.json"):
        max_length = check_count(json.loads((folder / "recipe.json").read_text())["max_length"], "max_length", 1)
    with damaged(own("tokenizer_2")):
        tokenizer = T5Tokenizer.from_folder(own("tokenizer_2"))
    return models[0], models[1], tokenizer, models[2], max_length


@contextmanager
def damaged(path: Path):
    """Any failure to read `path` as a ValueError of one line that names it."""
    if not path.exists():
        raise ValueError(f"{path} is missing: is {path.parent} a model folder written by shapes.train?")
    try:
        yield
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path} is damaged ({type(error).__name__}: {reason})") from None


def sample(
    flux: Flux,
    t5: T5Encoder,
    tok: T5Tokenizer,
    ae: AutoEncoder,
    prompts: list[str],
    max_length: int,
    num_steps: int = 20,
    seed: int = 0,
    shift: bool = False,
) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] for `prompts`: Euler steps from seeded noise on schnell's schedule (or, with
    `shift`, the shifted one of dev)."""
    size = ae.config.resolution
    B = len(prompts)
    img = pack(get_noise(B, size, size, seed))  # (B, N, 64)
    txt = t5(tok(prompts, max_length))
    ids, txt_ids, y = image_ids(B, size, size), text_ids(B, max_length), torch.zeros(B, flux.config.vec_in_dim)
    img = denoise(lambda x, t: flux(x, ids, txt, txt_ids, t, y), img, get_schedule(num_steps, img.shape[1], shift))
    return ae.decode(unpack(img, size, size)).clamp(-1, 1)


def save_samples(images: Tensor, path: Path) -> None:
    """The images side by side in one PNG, in the order of their prompts."""
    row = ((rearrange(images, "B C H W -> H (B W) C") + 1) * 127.5).round().byte().cpu().numpy()
    Image.fromarray(row).save(path)


def main() -> int:
    parser = OneLineParser(
        prog="python -m shapes.eval", description="Alignment of a shapes model's concept maps on held-out scenes"
    )
    parser.add_argument("--weights", type=Path, required=True, help="a folder written by shapes.train")
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--t", type=float, nargs="+", default=[0.5])
    parser.add_argument("--per-layer", action="store_true", help="also score each double block alone")
    parser.add_argument(
        "--layers",
        default="recipe",
        help="double blocks averaged: 'recipe' (the recipe's layers, else all; the default), 'all', or indices '2,3'",
    )
    parser.add_argument(
        "--choose-layers",
        action="store_true",
        help="choose the recipe's concept layers on --scenes VALIDATION scenes (best output-space softmax mIoU of "
        "all, the deeper half and each block) and write them to the folder's recipe.json",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=Path, default=None, help="also draw the world's SAMPLE_PROMPTS here")
    parser.add_argument(
        "--isolated",
        choices=("recipe", "yes", "no"),
        default="recipe",
        help="evaluate with image tokens isolated from each other (default: as the recipe says)",
    )
    args = parser.parse_args()
    try:
        return evaluate_command(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        return interrupted(stop, "nothing was written")


def evaluate_command(args: argparse.Namespace) -> int:
    for t in args.t:
        check_t(t, "--t")
    check_count(args.scenes, "--scenes", 1, 10**7)
    check_count(args.seed, "--seed", 0, 2**63 - 1 - args.scenes)
    if args.samples is not None and not args.samples.parent.is_dir():
        raise ValueError(f"--samples {args.samples}: the folder {args.samples.parent} does not exist")
    if args.samples is not None and args.samples.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--samples {args.samples}: name a picture file, e.g. samples.png")
    if args.choose_layers:
        choice = choose_layers(args.weights, args.scenes, args.t[0], args.seed)
        write_layers(args.weights, choice)
        print(json.dumps(choice), flush=True)
        return 0
    flux, t5, tok, ae, max_length = load(args.weights)
    recipe = json.loads((args.weights / "recipe.json").read_text())
    if args.layers == "recipe":
        chosen = recipe_layers(recipe, flux.config.depth)
    elif args.layers == "all":
        chosen = None
    else:
        try:
            chosen = tuple(int(i) for i in args.layers.split(","))
        except ValueError:
            raise ValueError(f"--layers {args.layers!r}: give recipe, all, or block indices such as 2,3") from None
        if min(chosen) < 0 or max(chosen) >= flux.config.depth:
            raise ValueError(f"--layers {args.layers}: this model has {flux.config.depth} double blocks, "
                             f"0..{flux.config.depth - 1}")  # fmt: skip
    world = recipe.get("world", "full")
    if world not in WORLDS:
        raise ValueError(f"{args.weights / 'recipe.json'}: world {world!r} is not one of {sorted(WORLDS)}")
    isolate = recipe.get("eval_isolated", False) if args.isolated == "recipe" else args.isolated == "yes"
    config = SceneConfig(size=ae.config.resolution, **WORLDS[world])
    if args.samples is not None:
        with torch.no_grad():
            prompts = SAMPLE_PROMPTS[world]
            steps = recipe.get("sample_steps", 20)
            save_samples(sample(flux, t5, tok, ae, prompts, max_length, steps, args.seed), args.samples)
    scenes = [make_scene(s, config) for s in held_out_seeds(args.scenes)]
    layer_sets = [chosen] + ([(i,) for i in range(flux.config.depth)] if args.per_layer else [])
    with torch.no_grad():
        latents = torch.cat(
            [ae.encode(make_batch(held_out_seeds(50, i), config)[0]) for i in range(0, args.scenes, 50)]
        )[: args.scenes]
        for t in args.t:
            for layers in layer_sets:
                totals: dict[str, float] = {}
                for i in range(0, args.scenes, 50):
                    part = scenes[i : i + 50]
                    scores = evaluate(
                        flux,
                        t5,
                        tok,
                        latents[i : i + 50],
                        part,
                        [s.caption for s in part],
                        max_length,
                        t=t,
                        seed=args.seed + i,
                        layers=layers,
                        world=world,
                        isolate=isolate,
                    )
                    for k, v in scores.items():
                        totals[k] = totals.get(k, 0.0) + v * len(part) / args.scenes
                rounded = {k: round(v, 4) for k, v in totals.items()}
                print(json.dumps({"t": t, "layers": layers, "isolated": isolate, **rounded}), flush=True)
    return 0


if __name__ == "__main__":
    with terminate_as_interrupt():
        code = main()
    sys.exit(code)
