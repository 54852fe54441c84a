"""FLUX.1-schnell at full size on one GPU: our Flux against diffusers' FluxTransformer2DModel, the concept stream's
cost, and end-to-end `generate` in every memory mode. Seeded random weights, nothing downloaded.

The device run (two calls, results under $OUT). diffusers is not installed on the device machines (their torch,
einops, safetensors, tokenizers, sentencepiece and Pillow are); carry its wheel (pure Python), fetched here once:

    echo /.whl/ >> .git/info/exclude
    .venv/bin/python -m pip download --no-deps -d .whl diffusers==0.42.1
    # run(carry=[".whl"], timeout_s=240): the smoke call, every section at the tiny config on the GPU
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. \
        PYTHONUNBUFFERED=1 && python3 benchmarks/bench_gpu.py --tiny --out $OUT/smoke
    # run(carry=[".whl"], timeout_s=540): the benchmark, full size, at most 8 minutes
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. \
        PYTHONUNBUFFERED=1 && python3 benchmarks/bench_gpu.py --out $OUT/bench

On the CPU (what tests/test_bench_gpu.py runs): `python benchmarks/bench_gpu.py --tiny --device cpu --out DIR`.

Sections, each printed and written to OUT/results.json and OUT/results.md:
1. step: one transformer forward (the sampler's step) at each size with 256 text tokens, ours and diffusers' holding
   the same weights (diffusers' tensors are views of ours, converted in memory by weights/convert.py's table),
   interleaved, after warm-up, median of `--repeats`; peak memory; agreement of the two velocities.
2. concepts: the forward with 1, 5 and 10 concepts at all double blocks (output space), 10 with every space
   (`keep_grid`), and `explain`'s forward that stops after the double blocks, each as a ratio of the plain forward.
3. memory modes: `generate` end to end (T5-XXL + CLIP-L + 4 steps + decode, random weights at full size) per mode:
   median time and peak memory (allocated and reserved), and its image and maps against the first mode ("full").
4. SD3.5 Large (`--no-sd3` skips it): one MM-DiT forward per size, ours against diffusers' SD3Transformer2DModel on
   views of the same weights (diffusers' own single-file converter), and the concept stream's cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import autoencoder
import clip
import mmdit
import t5
from concept_attention import ConceptAttentionPipeline
from mmdit.layers import SPACES
from mmdit.memory import MEMORY_MODES
from sampling import image_ids, text_ids
from weights.convert import FLUX_FROM_DIFFUSERS, sources

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle at the top left and a blue star at the bottom right on a white background"
CONCEPTS = ["circle", "star", "background"]


# ---- models with seeded random weights ------------------------------------------------------------------------------
def build(cls, config, device, dtype: torch.dtype, seed: int) -> nn.Module:
    """`cls(config)` built straight on `device` in `dtype` with PyTorch's default (seeded) initialisation."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)


def diffusers_twin(flux: mmdit.Flux) -> nn.Module:
    """diffusers' FluxTransformer2DModel whose tensors are views of `flux`'s (rows of our fused qkv and linear1), via
    the loader's diffusers table run backwards; only the final layer's swapped (scale, shift) halves are copied."""
    from diffusers import FluxTransformer2DModel

    c = flux.config
    with torch.device("meta"):
        twin = FluxTransformer2DModel(
            patch_size=1, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.depth,
            num_single_layers=c.depth_single_blocks, attention_head_dim=c.head_dim, num_attention_heads=c.num_heads,
            joint_attention_dim=c.context_in_dim, pooled_projection_dim=c.vec_in_dim, guidance_embeds=c.guidance_embed,
            axes_dims_rope=c.axes_dim,
        )  # fmt: skip
    shapes = {name: t.shape for name, t in twin.state_dict().items()}
    parts: dict[str, list] = {}
    for name, ours in flux.state_dict().items():
        start = 0
        for key, part, n in sources(name, FLUX_FROM_DIFFUSERS):
            rows = shapes[key][0] // n
            parts.setdefault(key, [None] * n)[part] = ours[start : start + rows]
            start += rows
    state = {key: p[0] if len(p) == 1 else torch.cat(p) for key, p in parts.items()}
    twin.load_state_dict(state, strict=True, assign=True)
    return twin.eval().requires_grad_(False)


class ByteTokenizer(clip.CLIPTokenizer):
    """CLIP's tokenizer with a byte-level vocabulary and no merges (one token per character): real tokenisation for
    random CLIP weights, without CLIP's 49 k-entry vocabulary file."""

    def __init__(self):
        from tokenizers.pre_tokenizers import ByteLevel

        symbols = sorted(ByteLevel.alphabet())
        words = [*symbols, *(s + "</w>" for s in symbols), clip.tokenizer.BOS, clip.tokenizer.EOS]
        super().__init__({w: i for i, w in enumerate(words)}, [])


# ---- timing -------------------------------------------------------------------------------------------------------
def timed(fn, device: torch.device) -> tuple[float, int, int]:
    """Seconds of one call, and on CUDA the peak allocated and reserved bytes during it (0 elsewhere)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if not cuda:
        return seconds, 0, 0
    return seconds, torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def interleaved(calls: dict, device, repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Rounds over every call in turn (so drifts in clock and temperature hit all alike); median seconds, max peaks."""
    seen = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            result = timed(call, device)
            if round_ >= warmup:
                seen[name].append(result)
    return {
        name: {
            "seconds": statistics.median(r[0] for r in runs),
            "peak_allocated_gb": max(r[1] for r in runs) / 1e9,
            "peak_reserved_gb": max(r[2] for r in runs) / 1e9,
        }
        for name, runs in seen.items()
    }


def agreement(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    a, b = ours.double().flatten(), ref.double().flatten()
    centred = (a - a.mean(), b - b.mean())
    correlation = float(centred[0] @ centred[1] / (centred[0].norm() * centred[1].norm()))
    return {"max_abs": float((a - b).abs().max()), "ref_max_abs": float(b.abs().max()), "correlation": correlation}


# ---- sections -----------------------------------------------------------------------------------------------------
def flux_inputs(config, size: int, text: int, device, dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = (size // 16) ** 2
    return {
        "img": torch.randn(1, n, config.in_channels, generator=g).to(device, dtype),
        "img_ids": image_ids(1, size, size).to(device),
        "txt": torch.randn(1, text, config.context_in_dim, generator=g).to(device, dtype),
        "txt_ids": text_ids(1, text).to(device),
        "timesteps": torch.full((1,), 0.75, device=device, dtype=dtype),
        "y": torch.randn(1, config.vec_in_dim, generator=g).to(device, dtype),
    }


def step_section(flux, twin, sizes, text, device, dtype, repeats) -> dict:
    out = {}
    for size in sizes:
        x = flux_inputs(flux.config, size, text, device, dtype)

        def theirs(x=x):
            return twin(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                        timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                        return_dict=False)[0]  # fmt: skip

        times = interleaved({"ours": lambda x=x: flux(**x), "diffusers": theirs}, device, repeats, warmup=2)
        out[str(size)] = {**times, "ratio": times["ours"]["seconds"] / times["diffusers"]["seconds"],
                          "agreement": agreement(flux(**x), theirs())}  # fmt: skip
    return out


def concept_section(flux, size, text, device, dtype, repeats) -> dict:
    x = flux_inputs(flux.config, size, text, device, dtype)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(1, 10, flux.config.context_in_dim, generator=g).to(device, dtype)
    calls = {"plain": lambda: flux(**x)}
    for c in (1, 5, 10):
        calls[f"{c} concepts, output"] = lambda c=c: flux(**x, concepts=mmdit.ConceptInput(tokens[:, :c]))
    calls["10 concepts, keep_grid"] = lambda: flux(**x, concepts=mmdit.ConceptInput(tokens, spaces=SPACES))
    calls["explain (stop after double)"] = lambda: flux(**x, concepts=mmdit.ConceptInput(tokens),
                                                        stop_after_double=True)  # fmt: skip
    times = interleaved(calls, device, repeats)
    base = times["plain"]["seconds"]
    return {name: {**t, "ratio": t["seconds"] / base} for name, t in times.items()}


def sd3_section(tiny: bool, sizes, text: int, device, dtype, repeats) -> dict:
    """SD3.5 Large (or the tiny config): our MM-DiT against diffusers' SD3Transformer2DModel holding views of the same
    weights (diffusers' own single-file converter splits our fused qkv into row views), per size; then the concept
    stream's cost at the largest size, as for Flux."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    import sd3

    config = sd3.CONFIGS["tiny" if tiny else "sd3.5-large"]
    model = build(sd3.SD3, config, device, dtype, seed=3)
    with torch.device("meta"):
        twin = SD3Transformer2DModel(
            sample_size=64, patch_size=config.patch_size, in_channels=config.in_channels,
            out_channels=config.out_channels, num_layers=config.depth, attention_head_dim=config.head_dim,
            num_attention_heads=config.num_heads, joint_attention_dim=config.joint_attention_dim,
            caption_projection_dim=config.hidden_size, pooled_projection_dim=config.pooled_projection_dim,
            pos_embed_max_size=config.pos_embed_max_size, dual_attention_layers=config.dual_attention_layers,
            qk_norm="rms_norm",
        )  # fmt: skip
    state = convert_sd3_transformer_checkpoint_to_diffusers({k: v for k, v in model.state_dict().items()})
    twin.load_state_dict(state, strict=True, assign=True)
    twin = twin.eval().requires_grad_(False)
    out = {"config": "tiny" if tiny else "sd3.5-large", "step": {}}
    g = torch.Generator().manual_seed(0)
    for size in sizes:
        x = torch.randn(1, config.in_channels, size // 8, size // 8, generator=g).to(device, dtype)
        t = torch.full((1,), 0.75, device=device, dtype=dtype)
        context = torch.randn(1, 77 + text, config.joint_attention_dim, generator=g).to(device, dtype)
        y = torch.randn(1, config.pooled_projection_dim, generator=g).to(device, dtype)

        def theirs(x=x, t=t, context=context, y=y):
            return twin(hidden_states=x, timestep=t * 1000, encoder_hidden_states=context, pooled_projections=y,
                        return_dict=False)[0]  # fmt: skip

        def ours(x=x, t=t, context=context, y=y):
            return model(x, t, context, y)

        times = interleaved({"ours": ours, "diffusers": theirs}, device, repeats, warmup=2)
        out["step"][str(size)] = {**times, "ratio": times["ours"]["seconds"] / times["diffusers"]["seconds"],
                                  "agreement": agreement(ours(), theirs())}  # fmt: skip
    twin.to("meta")  # frees diffusers' own copies (the swapped final-layer halves); the views go with our model
    tokens = torch.randn(1, 10, config.joint_attention_dim, generator=g).to(device, dtype)
    inputs = (x, t, context, y)
    calls = {"plain": ours}
    for c in (1, 5, 10):
        calls[f"{c} concepts, output"] = lambda c=c: model(*inputs, concepts=mmdit.ConceptInput(tokens[:, :c]))
    calls["10 concepts, keep_grid"] = lambda: model(*inputs, concepts=mmdit.ConceptInput(tokens, spaces=SPACES))
    times = interleaved(calls, device, repeats)
    out["concepts"] = {name: {**r, "ratio": r["seconds"] / times["plain"]["seconds"]} for name, r in times.items()}
    return out


def mode_section(masters: dict, configs: dict, modes, size: int, device, dtype, repeats, max_length: int) -> dict:
    """generate in each memory mode, each pipeline built afresh from host copies of the same random weights; the
    first mode is the reference for the images and maps."""
    t5_tokenizer = t5.T5Tokenizer.from_folder(ROOT / "shapes" / "weights" / "tokenizer_2")
    out, reference = {}, None
    for mode in modes:
        models = {}
        for name, (cls, config) in configs.items():
            with torch.device("meta"):
                models[name] = cls(config).eval().requires_grad_(False)
            models[name].load_state_dict(masters[name], strict=True, assign=True)  # shares the host tensors
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        start = time.perf_counter()
        pipe = ConceptAttentionPipeline(models["flux"], models["ae"], models["t5"], t5_tokenizer, models["clip"],
                                        ByteTokenizer(), device, dtype, max_length=max_length, memory=mode)  # fmt: skip
        setup = time.perf_counter() - start
        del models
        results = []

        def run(results=results, pipe=pipe):
            results.append(pipe.generate(PROMPT, CONCEPTS, size, size, seed=0, progress=False))

        stats = interleaved({mode: run}, device, repeats)[mode]
        image = torch.from_numpy(np.array(results[-1].image)).float()
        maps = results[-1].maps
        if reference is None:
            reference = (image, maps)
        out[mode] = {**stats, "setup_seconds": setup, "image_equal_to_first": bool(torch.equal(image, reference[0])),
                     "image_max_abs": float((image - reference[0]).abs().max()),
                     "image_mean_abs": float((image - reference[0]).abs().mean()),
                     "maps": agreement(maps, reference[1])}  # fmt: skip
        print(f"  {mode:8s} {stats['seconds']:7.2f} s  peak {stats['peak_allocated_gb']:6.2f} GB allocated, "
              f"{stats['peak_reserved_gb']:6.2f} GB reserved  image == first: {out[mode]['image_equal_to_first']}, "
              f"maps correlation {out[mode]['maps']['correlation']:.4f}", flush=True)  # fmt: skip
        del pipe, results, run
    return out


# ---- report -------------------------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    lines = [f"device: {results['device']}, dtype {results['dtype']}, config {results['config']}, {results['date']}",
             "", "| step | ours (ms) | diffusers (ms) | ours / diffusers | peak ours / diffusers (GB) | max abs diff |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for size, r in results["step"].items():
        lines.append(f"| {size}^2 | {r['ours']['seconds'] * 1e3:.1f} | {r['diffusers']['seconds'] * 1e3:.1f} | "
                     f"{r['ratio']:.3f} | {r['ours']['peak_allocated_gb']:.2f} / "
                     f"{r['diffusers']['peak_allocated_gb']:.2f} | {r['agreement']['max_abs']:.3g} "
                     f"(of {r['agreement']['ref_max_abs']:.3g}) |")  # fmt: skip
    lines += ["", f"| forward at {results['concept_size']}^2 | ms | x plain |", "|---|---|---|"]
    lines += [f"| {name} | {r['seconds'] * 1e3:.1f} | {r['ratio']:.3f} |" for name, r in results["concepts"].items()]
    lines += ["", f"| generate {results['generate_size']}^2, 4 steps | s | peak allocated (GB) | peak reserved (GB) | "
              "image == first | maps corr. with first |", "|---|---|---|---|---|---|"]  # fmt: skip
    for mode, r in results["modes"].items():
        lines.append(f"| {mode} | {r['seconds']:.2f} | {r['peak_allocated_gb']:.2f} | {r['peak_reserved_gb']:.2f} | "
                     f"{r['image_equal_to_first']} | {r['maps']['correlation']:.4f} |")  # fmt: skip
    if "sd3" in results:
        sd = results["sd3"]
        lines += ["", f"| {sd['config']} step | ours (ms) | diffusers (ms) | ours / diffusers | max abs diff |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for size, r in sd["step"].items():
            lines.append(
                f"| {size}^2 | {r['ours']['seconds'] * 1e3:.1f} | {r['diffusers']['seconds'] * 1e3:.1f} | "
                f"{r['ratio']:.3f} | {r['agreement']['max_abs']:.3g} (of {r['agreement']['ref_max_abs']:.3g}) |"
            )
        lines += ["", f"| {sd['config']} forward | ms | x plain |", "|---|---|---|"]
        lines += [f"| {name} | {r['seconds'] * 1e3:.1f} | {r['ratio']:.3f} |" for name, r in sd["concepts"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (tests, smoke): sizes 32 and 64, 32 tokens")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 7; tiny 2)")
    parser.add_argument("--generate-repeats", type=int, default=2, help="timed generate runs per memory mode")
    parser.add_argument("--sizes", type=int, nargs="+", help="square sizes of the step (default 512 1024; tiny 32 64)")
    parser.add_argument("--modes", nargs="+", choices=MEMORY_MODES, default=list(MEMORY_MODES),
                        help="memory modes for generate (default: all; the first is the reference)")  # fmt: skip
    parser.add_argument("--no-sd3", action="store_true", help="skip the SD3.5 Large section")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = args.tiny
    repeats = args.repeats or (2 if tiny else 7)
    sizes, text = ((32, 64), 32) if tiny else ((512, 1024), 256)
    sizes = tuple(args.sizes) if args.sizes else sizes
    flux_config = mmdit.CONFIGS["tiny" if tiny else "flux-schnell"]
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
               "config": "tiny" if tiny else "flux-schnell", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "torch": torch.__version__, "concept_size": sizes[-1], "generate_size": sizes[-1]}  # fmt: skip
    print(f"{results['device']}, {dtype}, {results['config']}", flush=True)

    with torch.no_grad():
        flux = build(mmdit.Flux, flux_config, device, dtype, seed=0)
        twin = diffusers_twin(flux)
        results["step"] = step_section(flux, twin, sizes, text, device, dtype, repeats)
        for size, r in results["step"].items():
            print(f"  step {size}^2: ours {r['ours']['seconds'] * 1e3:.1f} ms, diffusers "
                  f"{r['diffusers']['seconds'] * 1e3:.1f} ms, x{r['ratio']:.3f}, max abs diff "
                  f"{r['agreement']['max_abs']:.3g} of {r['agreement']['ref_max_abs']:.3g}", flush=True)  # fmt: skip
        del twin
        results["concepts"] = concept_section(flux, sizes[-1], text, device, dtype, repeats)
        for name, r in results["concepts"].items():
            print(f"  {name:28s} {r['seconds'] * 1e3:8.1f} ms  x{r['ratio']:.3f}", flush=True)

        # host copies of every component: each memory mode builds its pipeline from them
        t5_config = t5.CONFIGS["tiny" if tiny else "t5-v1_1-xxl"]
        clip_config = clip.CONFIGS["tiny" if tiny else "clip-vit-large-patch14"]
        if tiny:  # room for the shapes tokenizer's ids
            t5_config = dataclasses.replace(t5_config, vocab_size=max(t5_config.vocab_size, 512))
        configs = {"flux": (mmdit.Flux, flux_config), "t5": (t5.T5Encoder, t5_config),
                   "clip": (clip.CLIPTextEncoder, clip_config),
                   "ae": (autoencoder.AutoEncoder, autoencoder.CONFIGS["tiny" if tiny else "flux"])}  # fmt: skip
        masters = {"flux": {k: v.to("cpu") for k, v in flux.state_dict().items()}}
        del flux
        for seed, name in enumerate(("t5", "clip", "ae"), start=1):
            module = build(*configs[name], device, dtype, seed)
            masters[name] = {k: v.to("cpu") for k, v in module.state_dict().items()}
            del module
        print(f"generate at {sizes[-1]}^2, {len(CONCEPTS)} concepts, per memory mode:", flush=True)
        results["modes"] = mode_section(masters, configs, args.modes, sizes[-1], device, dtype,
                                        args.generate_repeats, text)  # fmt: skip
        del masters
        if not args.no_sd3:
            print(
                "SD3.5: our MM-DiT against diffusers' on the same weights, and the concept stream's cost:", flush=True
            )
            results["sd3"] = sd3_section(tiny, sizes, text, device, dtype, repeats)
            for size, r in results["sd3"]["step"].items():
                print(f"  step {size}^2: x{r['ratio']:.3f}, max abs diff {r['agreement']['max_abs']:.3g}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
