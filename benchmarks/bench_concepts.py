"""What the concept stream costs: the transformer forward with concepts against the plain forward, same process.

    python benchmarks/bench_concepts.py [--device cuda] [--hidden 3072 --heads 24 --depth 19 --single 38 --size 1024]

Random weights (the cost does not depend on their values), a 1024 x 1024 image by default (4096 image tokens, 256
text tokens) on a model narrower than Flux on the CPU. Prints the time of each variant as a ratio of the plain
forward, and on a GPU the peak memory as a ratio too. Variants: concepts with the output space at the last 4 double
blocks (the official default), at every block, every space at every block (what `keep_grid` asks for), and the
forward that stops after the double blocks (`explain`).
"""

from __future__ import annotations

import argparse
import time

import torch

from mmdit import CONFIGS, ConceptInput, Flux
from sampling import image_ids, text_ids

SPACES = ("output", "attention", "value", "cross_attention")


def timed(fn, device: torch.device) -> tuple[float, int]:
    """Seconds and peak GPU bytes (0 on the CPU) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--single", type=int, default=6)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--concepts", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    head = args.hidden // args.heads
    axes = (head - 2 * (head * 7 // 16 // 2 * 2), head * 7 // 16 // 2 * 2, head * 7 // 16 // 2 * 2)
    config = type(CONFIGS["flux-schnell"])(**{**CONFIGS["flux-schnell"].__dict__, "hidden_size": args.hidden,
                                             "num_heads": args.heads, "depth": args.depth, "axes_dim": axes,
                                             "depth_single_blocks": args.single})  # fmt: skip
    torch.manual_seed(0)
    flux = Flux(config).to(device, dtype).eval()
    n = (args.size // 16) ** 2
    img = torch.randn(1, n, 64, device=device, dtype=dtype)
    txt = torch.randn(1, 256, config.context_in_dim, device=device, dtype=dtype)
    concepts = torch.randn(1, args.concepts, config.context_in_dim, device=device, dtype=dtype)
    ids, tids = image_ids(1, args.size, args.size).to(device), text_ids(1, 256).to(device)
    t = torch.full((1,), 0.5, device=device, dtype=dtype)
    y = torch.zeros(1, config.vec_in_dim, device=device, dtype=dtype)
    last4 = tuple(range(max(0, args.depth - 4), args.depth))
    variants = {
        "plain forward": None,
        "output space, last 4 blocks": ConceptInput(concepts, layers=last4),
        "output space, every block": ConceptInput(concepts),
        "all four spaces, every block": ConceptInput(concepts, spaces=SPACES),
    }
    shape = f"{config.hidden_size} wide, {args.depth} + {args.single} blocks, {n} image tokens"
    print(f"{shape}, {args.concepts} concepts, {device.type} {dtype}")
    calls = {name: (lambda c=c: flux(img, ids, txt, tids, t, y, concepts=c)) for name, c in variants.items()}
    calls["explain (stop after double)"] = lambda: flux(img, ids, txt, tids, t, y, concepts=variants[
        "output space, every block"], stop_after_double=True)  # fmt: skip
    best = {name: (float("inf"), 0) for name in calls}
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # rounds interleave the variants; the first round warms up
            for name, call in calls.items():
                seconds, peak = timed(call, device)
                best[name] = (min(best[name][0], seconds), max(best[name][1], peak))
    base_time, base_peak = best["plain forward"]
    for name, (seconds, peak) in best.items():
        memory = f", peak memory x{peak / base_peak:.3f}" if base_peak else ""
        print(f"{name:32s} {seconds * 1000:8.1f} ms   time x{seconds / base_time:.3f}{memory}")


if __name__ == "__main__":
    main()
