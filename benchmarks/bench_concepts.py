"""What the concept stream costs, beside diffusers' Flux holding the same weights, in one process.

    python benchmarks/bench_concepts.py [--device cuda] [--hidden 3072 --heads 24 --depth 19 --single 38 --size 1024]

Random weights (the cost does not depend on their values) written once by diffusers' `save_pretrained`, then loaded
by `weights.load_flux` and by `FluxTransformer2DModel.from_pretrained`: both hold the same tensors, and their plain
outputs are compared before any timing. A 1024 x 1024 image by default (4096 image tokens, 256 text tokens) on a model
narrower than Flux on the CPU. Variants, interleaved round by round (medians over the rounds with their spread, and
ratios against our plain forward):
- the plain forward, ours and diffusers' (the peer: it has no concept stream);
- concepts with the output space at the last 4 double blocks (the official default), at every block, and every space
  at every block (what `keep_grid` asks for); the forward that stops after the double blocks (`explain`);
- the official ConceptAttention code, an ESTIMATE from its code rather than a run of it: its double block runs a second
  joint attention of [concepts; image] queries over [concepts; image] keys, so we time our plain forward plus one
  (C + N) x (C + N) SDPA per double block (its other concept work, C rows through the text weights, is left out).
On a GPU the peak memory of each variant is printed as a ratio of our plain forward's too.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import interleaved, report

import weights
from mmdit import ConceptInput
from sampling import image_ids, text_ids

SPACES = ("output", "attention", "value", "cross_attention")


def peak_bytes(fn, device: torch.device) -> int:
    """Peak GPU memory of one call (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def write_diffusers(folder: Path, args) -> None:
    """A random FluxTransformer2DModel in diffusers' own layout: folder/transformer/."""
    from diffusers import FluxTransformer2DModel

    head = args.hidden // args.heads
    side = head * 7 // 16 // 2 * 2  # Flux's (16, 56, 56) split of 128, scaled to the head dim
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=args.depth,
                                   num_single_layers=args.single, attention_head_dim=head,
                                   num_attention_heads=args.heads, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=False,
                                   axes_dims_rope=(head - 2 * side, side, side))  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-initialises some layers; every weight does something here
            p.normal_(0.0, 0.02)
    model.save_pretrained(folder / "transformer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--single", type=int, default=6)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--concepts", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    from diffusers import FluxTransformer2DModel

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        write_diffusers(Path(tmp), args)
        flux = weights.load_flux(tmp, device=device, dtype=dtype)
        theirs = FluxTransformer2DModel.from_pretrained(Path(tmp) / "transformer", torch_dtype=dtype)
        theirs = theirs.to(device).eval()
    config = flux.config
    n = (args.size // 16) ** 2
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(1, n, 64, generator=gen).to(device, dtype)
    txt = torch.randn(1, 256, config.context_in_dim, generator=gen).to(device, dtype)
    concepts = torch.randn(1, args.concepts, config.context_in_dim, generator=gen).to(device, dtype)
    ids, tids = image_ids(1, args.size, args.size).to(device), text_ids(1, 256).to(device)
    t = torch.full((1,), 0.5, device=device, dtype=dtype)
    y = torch.randn(1, config.vec_in_dim, generator=gen).to(device, dtype)

    def diffusers_forward():
        return theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                      img_ids=ids[0], txt_ids=tids[0], return_dict=False)[0]  # fmt: skip

    # the official code's second joint attention, [concepts; image] x [concepts; image], once per double block
    head = config.hidden_size // config.num_heads
    joint = torch.randn(1, config.num_heads, args.concepts + n, head, generator=gen).to(device, dtype)

    def official_estimate():
        flux(img, ids, txt, tids, t, y)
        for _ in range(config.depth):
            F.scaled_dot_product_attention(joint, joint, joint)

    last4 = tuple(range(max(0, config.depth - 4), config.depth))
    every = ConceptInput(concepts)
    calls = {
        "ours, plain forward": lambda: flux(img, ids, txt, tids, t, y),
        "diffusers, plain forward": diffusers_forward,
        "ours, output space, last 4 blocks": lambda: flux(img, ids, txt, tids, t, y,
                                                          concepts=ConceptInput(concepts, layers=last4)),
        "ours, output space, every block": lambda: flux(img, ids, txt, tids, t, y, concepts=every),
        "ours, all four spaces, every block": lambda: flux(img, ids, txt, tids, t, y,
                                                           concepts=ConceptInput(concepts, spaces=SPACES)),
        "ours, explain (stop after double)": lambda: flux(img, ids, txt, tids, t, y, concepts=every,
                                                          stop_after_double=True),
        "official code, ESTIMATE (see doc)": official_estimate,
    }  # fmt: skip
    with torch.no_grad():
        plain = flux(img, ids, txt, tids, t, y)
        difference, scale = (plain - diffusers_forward()).abs().max().item(), plain.abs().max().item()
    shape = f"{config.hidden_size} wide, {config.depth} + {config.depth_single_blocks} blocks, {n} image tokens"
    print(f"{shape}, {args.concepts} concepts, {device.type} {dtype}, {torch.get_num_threads()} threads")
    print(f"ours against diffusers, same weights: max abs difference {difference:.1e} (outputs up to {scale:.2f})")
    for line in report(interleaved(calls, args.rounds, device), "ours, plain forward"):
        print(line)
    if device.type == "cuda":
        base = peak_bytes(calls["ours, plain forward"], device)
        for name, call in calls.items():
            print(f"{name:36s} peak memory x{peak_bytes(call, device) / base:.3f}")


if __name__ == "__main__":
    main()
