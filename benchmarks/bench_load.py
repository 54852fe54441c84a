"""Peak host memory and time of loading a ~1 GB Flux checkpoint: our loader against diffusers and the naive way.

Writes a random bfloat16 Flux transformer (hidden 1024, 8 + 16 blocks: about 1.1 GB) twice with the same tensors: as
diffusers' `save_pretrained` folder (`transformer/`) and as a BFL single file. Then loads it in fresh processes,
interleaved over `--repeats` rounds. Each load is followed by one read of every weight (diffusers' bf16 load maps the
file and reads it lazily, on first use). For each way it prints the peak resident memory (ru_maxrss) minus the resident
memory before the load, as a ratio of the file size, the seconds of the load and of load + read, and the latter as a
ratio of diffusers' bf16 load; medians over the rounds with their spread (ratios: of the per-round ratios):
- `weights.load_flux(dtype=bfloat16)` from the BFL file and from the diffusers folder: the model is as large as the
  file, so 1.0 is the floor;
- `weights.load_flux()` (float32, the CPU default): the model is twice the file, so 2.0 is the floor;
- diffusers: `FluxTransformer2DModel.from_pretrained(folder, torch_dtype=...)`, bf16 and fp32;
- naive: build the model on the CPU in the target dtype, `safetensors.torch.load_file`, `load_state_dict`.
Like diffusers', our loads do not scan the weights for NaN (the pipelines check their outputs and scan the weights
only when one is not finite). The imports' garbage is collected before each clock starts.
Memory-mapped file pages that a loader touches count as resident, as the kernel counts them; after the first load the
file sits in the page cache, so the loads compare warm reads. Not a test (the numbers depend on the machine); run it
by hand: `python benchmarks/bench_load.py [--keep DIR] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = (
    "ours-bf16",
    "ours-bf16-diffusers",
    "ours-fp32",
    "diffusers-bf16",
    "diffusers-fp32",
    "naive-bf16",
    "naive-fp32",
)
PEER = "diffusers-bf16"


def rss_bytes() -> int:
    """Resident memory now (from /proc; ru_maxrss only gives the peak)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def bench_config():
    import mmdit

    return replace(
        mmdit.CONFIGS["flux-schnell"], hidden_size=1024, num_heads=8, depth=8, depth_single_blocks=16
    )  # head dim 128, as the real model


def write_checkpoints(folder: Path) -> None:
    """folder/transformer/ by diffusers' save_pretrained, then folder/flux-bench.safetensors with the same tensors."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    import weights

    config = bench_config()
    with torch.device("meta"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=config.in_channels, num_layers=config.depth,
                                       num_single_layers=config.depth_single_blocks, attention_head_dim=128,
                                       num_attention_heads=config.num_heads, joint_attention_dim=config.context_in_dim,
                                       pooled_projection_dim=config.vec_in_dim, guidance_embeds=False,
                                       axes_dims_rope=config.axes_dim)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    state = {
        name: (0.02 * torch.randn(t.shape, generator=generator)).bfloat16() for name, t in model.state_dict().items()
    }
    model.load_state_dict(state, assign=True)
    model.save_pretrained(folder / "transformer")
    del model, state
    ours = weights.load_flux(folder, device="cpu", dtype=torch.bfloat16)
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, folder / "flux-bench.safetensors")


def touch(model) -> None:
    """Read one element per 4 KB page of every weight: a lazily memory-mapped model (diffusers' bf16 load) is read from
    the file here, an in-memory one costs next to nothing."""
    for t in model.state_dict().values():
        t.reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum()


def measure(mode: str, folder: Path) -> dict:
    """Runs in its own process: import what this way needs first, then load once, read every weight, and report the
    memory it took (other ways' imports stay out: diffusers' alone adds about 0.2 GB of resident memory)."""
    import torch

    dtype = torch.bfloat16 if "bf16" in mode else torch.float32
    if mode.startswith("diffusers"):
        from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
    else:
        from safetensors.torch import load_file

        import mmdit
        import weights
    gc.collect()  # the imports' garbage, collected before the clock starts for every way alike (else a full
    # collection falls due inside whichever load allocates the most Python objects: 0.1 s of ours, not its work)
    before, start = rss_bytes(), time.perf_counter()
    if mode == "ours-bf16-diffusers":
        model = weights.load_flux(folder, device="cpu", dtype=dtype)
    elif mode.startswith("ours"):
        model = weights.load_flux(folder / "flux-bench.safetensors", device="cpu", dtype=dtype)
    elif mode.startswith("diffusers"):
        model = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype)
    else:
        torch.set_default_dtype(dtype)
        model = mmdit.Flux(bench_config())
        model.load_state_dict(load_file(folder / "flux-bench.safetensors"))
    seconds = time.perf_counter() - start
    touch(model)
    ready = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"before": before, "peak": peak, "seconds": seconds, "ready": ready, "model_bytes": model_bytes}


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="write (or reuse) the checkpoints in this folder, not a temp one")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of fresh processes, one per way and round")
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "flux-bench.safetensors").exists():
            print(f"writing {folder} ...", flush=True)
            write_checkpoints(folder)  # in this process: the loads below each run in a fresh one
        size = (folder / "flux-bench.safetensors").stat().st_size
        print(f"checkpoint: {size / 1e9:.2f} GB (bfloat16), {args.repeats} rounds")
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                command = [sys.executable, __file__, "--measure", mode, str(folder)]
                out = subprocess.run(command, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{mode} failed:\n{out.stderr}")
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for mode, rs in runs.items():
            extra = [(r["peak"] - r["before"]) / size for r in rs]
            ratios = [r["ready"] / p["ready"] for r, p in zip(rs, runs[PEER], strict=True)]
            print(
                f"{mode:20s} peak RSS over baseline x{spread(extra, '.2f')} file size "
                f"(model {rs[0]['model_bytes'] / size:.1f} x file); load {spread([r['seconds'] for r in rs], '.2f')} s,"
                f" weights read {spread([r['ready'] for r in rs], '.2f')} s = x{spread(ratios, '.2f')} of {PEER}"
            )


if __name__ == "__main__":
    main()
