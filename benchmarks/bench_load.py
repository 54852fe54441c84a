"""Peak host memory while `weights.load_flux` loads a ~1 GB BFL checkpoint, as a ratio of the file size.

Writes a random bfloat16 Flux transformer (hidden 1024, 8 + 16 blocks: about 1.1 GB) to a temporary folder, then loads
it in fresh processes and prints each one's peak resident memory (ru_maxrss) minus its resident memory before the load:
- `weights.load_flux(dtype=bfloat16)`: the model is as large as the file, so about 1.0 is the floor;
- `weights.load_flux()` (float32, the CPU default): the model is twice the file, so about 2.0 is the floor;
- for comparison, the usual way: build the model on the CPU, `safetensors.torch.load_file`, `load_state_dict`.
Not a test (the numbers depend on the machine); run it by hand: `python benchmarks/bench_load.py [--keep DIR]`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("weights-bf16", "weights-fp32", "naive-fp32")


def rss_bytes() -> int:
    """Resident memory now (from /proc; ru_maxrss only gives the peak)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def bench_config():
    import mmdit

    return replace(
        mmdit.CONFIGS["flux-schnell"], hidden_size=1024, num_heads=8, depth=8, depth_single_blocks=16
    )  # head dim 128, as the real model


def write_checkpoint(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    import mmdit

    with torch.device("meta"):
        model = mmdit.Flux(bench_config())
    generator = torch.Generator().manual_seed(0)
    state = {
        name: (0.02 * torch.randn(t.shape, generator=generator)).bfloat16() for name, t in model.state_dict().items()
    }
    save_file(state, path)


def measure(mode: str, path: Path) -> dict:
    """Runs in its own process: import everything first, then load once and report the memory it took."""
    import torch

    import mmdit
    import weights

    before, start = rss_bytes(), time.perf_counter()
    if mode == "weights-bf16":
        model = weights.load_flux(path, device="cpu", dtype=torch.bfloat16)
    elif mode == "weights-fp32":
        model = weights.load_flux(path, device="cpu")
    else:
        from safetensors.torch import load_file

        model = mmdit.Flux(bench_config())
        model.load_state_dict(load_file(path))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"before": before, "peak": peak, "seconds": seconds, "model_bytes": model_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keep", type=Path, help="write (or reuse) the checkpoint in this folder instead of a temp one"
    )
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "flux-bench.safetensors"
        if not path.exists():
            print(f"writing {path} ...", flush=True)
            write_checkpoint(path)  # in this process: the loads below each run in a fresh one
        size = path.stat().st_size
        print(f"checkpoint: {size / 1e9:.2f} GB (bfloat16)")
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--measure", mode, str(path)], capture_output=True, text=True
            )
            if out.returncode:
                raise SystemExit(f"{mode} failed:\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            extra = r["peak"] - r["before"]
            speed = size / 1e9 / r["seconds"]
            print(
                f"{mode:13s} peak RSS over baseline {extra / 1e9:5.2f} GB = {extra / size:.2f} x file size "
                f"(model {r['model_bytes'] / size:.1f} x file; {r['seconds']:.1f} s, {speed:.2f} GB/s)"
            )


if __name__ == "__main__":
    main()
