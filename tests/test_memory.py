"""The memory modes of mmdit.memory on the CPU: fp8 storage against the format's error bound and against bf16, block
streaming against the resident model (bit for bit), and the pipeline's and CLI's `memory` option.

Streaming on the CPU runs the same slot logic as on CUDA with plain copies instead of side-stream copies, so what
these tests cannot see is the CUDA stream ordering itself (benchmarks/bench_gpu.py checks the streamed image against
the resident one on a device).
"""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from concept_attention import ConceptAttentionPipeline, main
from mmdit import CONFIGS, ConceptInput, Flux
from mmdit.layers import SPACES
from mmdit.memory import FP8_MAX, FP8Linear, dequantize_fp8, quantize_fp8, stream_blocks, stream_t5, to_fp8
from saliency import Settings
from sampling import image_ids, text_ids
from t5 import CONFIGS as T5_CONFIGS
from t5 import T5Encoder
from tiny import randomize

PROMPT = "a red circle at the top left and a blue star at the bottom right on a white background"
CONCEPTS = ["circle", "star", "background"]


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


# ---- fp8 storage --------------------------------------------------------------------------------------------------
def test_quantize_fp8_within_the_format_bound():
    g = torch.Generator().manual_seed(0)
    row_scales = 10 ** torch.empty(64, 1).uniform_(-4, 1, generator=g)  # rows of very different magnitude
    w = torch.randn(64, 300, generator=g) ** 3 * row_scales  # heavy tails: many values far below the row's max
    w[5] = 0.0
    w8, scale = quantize_fp8(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (64, 1) and scale.dtype == torch.float32
    # each row's largest magnitude is stored as the format's largest value, so no row saturates or wastes range
    assert torch.equal(w8[torch.arange(64) != 5].float().abs().amax(dim=1), torch.full((63,), FP8_MAX))
    back = dequantize_fp8(w8, scale, torch.float32)
    assert torch.equal(back[5], torch.zeros(300))
    # round to nearest with 3 mantissa bits: |error| <= 2^-4 |w| for normals, <= 2^-10 * scale for subnormals
    bound = torch.maximum(w.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    excess = ((back - w).abs() - bound).max()
    assert excess <= 0, f"fp8 round trip exceeds the format's bound by {excess:.3e}"
    # and, for Gaussian weights, a relative (Frobenius) error of about 2.6 %
    n = torch.randn(256, 256, generator=g)
    error = float((dequantize_fp8(*quantize_fp8(n), torch.float32) - n).norm() / n.norm())
    print(f"fp8 per-row round trip of N(0, 1) weights: relative error {error:.4f}")
    assert 0.01 < error < 0.03


def test_to_fp8_stores_every_block_linear_and_nothing_else():
    flux = Flux(CONFIGS["tiny"])
    block_linears = sum(
        isinstance(m, torch.nn.Linear) for blocks in (flux.double_blocks, flux.single_blocks) for m in blocks.modules()
    )
    outside = [name for name, m in flux.named_modules() if isinstance(m, torch.nn.Linear) and "blocks" not in name]
    to_fp8(flux)
    fp8 = [name for name, m in flux.named_modules() if isinstance(m, FP8Linear)]
    assert len(fp8) == block_linears and all("blocks." in name for name in fp8)
    assert outside == [name for name, m in flux.named_modules() if isinstance(m, torch.nn.Linear)]
    for name, t in flux.state_dict().items():  # fp8 weights, float32 scales, the rest untouched
        kind = torch.float8_e4m3fn if name.endswith(".weight") and name[: -len(".weight")] in fp8 else torch.float32
        assert t.dtype == kind, name


# ---- block streaming ----------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """Bit identity is asserted on one CPU thread: with two, the streamed forward's float sums round differently from
    the resident one's (max abs 3.8e-6 on this model, measured), although every weight is the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_streamed_flux_is_bit_identical_and_loads_each_block_once(one_thread):
    config = CONFIGS["tiny"]
    config = type(config)(**{**config.__dict__, "depth": 3, "depth_single_blocks": 3})
    resident, streamed = randomize(Flux(config), 0), randomize(Flux(config), 0)
    streamer = stream_blocks(streamed, "cpu")
    assert sum(p.numel() for p in streamed.parameters()) < sum(p.numel() for p in resident.parameters()) / 5
    assert len(streamer.slots) == 4  # two per block kind, whatever the depth
    g = torch.Generator().manual_seed(1)
    img, txt, y = (
        torch.randn(2, 12, 64, generator=g),
        torch.randn(2, 5, 32, generator=g),
        torch.randn(2, 32, generator=g),
    )
    ids, tids, t = image_ids(2, 48, 64), text_ids(2, 5), torch.tensor([0.3, 0.8])
    concepts = ConceptInput(torch.randn(2, 4, 32, generator=g), spaces=SPACES)
    with torch.no_grad():
        ours = resident(img, ids, txt, tids, t, y, concepts=concepts)
        # a forward that stops after the double blocks must not leave a wrong block in a slot for the next one
        for run, stop_after_double in enumerate((False, False, True, False)):
            loads = streamer.loads
            theirs = streamed(img, ids, txt, tids, t, y, concepts=concepts, stop_after_double=stop_after_double)
            if not stop_after_double:
                assert torch.equal(theirs.velocity, ours.velocity)
            # at most one copy per block per forward (a slot keeps its block when no other displaced it); the first
            # forward also loads block 0 before prefetching it again at the end
            assert streamer.loads - loads <= (7 if run == 0 else 6)
            for i, s in ours.saliency.items():
                for space in SPACES:
                    assert torch.equal(getattr(theirs.saliency[i], space), getattr(s, space)), (i, space)


def test_streamed_t5_is_bit_identical():
    config = dataclasses.replace(T5_CONFIGS["tiny"], num_layers=4)
    resident, streamed = randomize(T5Encoder(config), 0, std=0.5), randomize(T5Encoder(config), 0, std=0.5)
    streamer = stream_t5(streamed, "cpu")
    assert len(streamer.host) == 3 and len(streamer.slots) == 2  # block 0 (position bias) stays in the module
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = resident(ids)
        for _ in range(2):
            assert torch.equal(streamed(ids), want)


# ---- the pipeline and the command line, on the built-in shapes model ------------------------------------------------
@pytest.fixture(scope="module")
def runs():
    """generate + explain with the shapes model in each memory mode (bf16 on the CPU) and in float32."""
    out = {}
    for name, dtype, memory in (("bf16", torch.bfloat16, "full"), ("fp32", torch.float32, "full"),
                                ("stream", torch.bfloat16, "stream"), ("fp8", torch.bfloat16, "fp8")):  # fmt: skip
        pipe = ConceptAttentionPipeline.from_pretrained("shapes", "cpu", dtype, memory=memory)
        assert pipe.memory == memory and pipe.offload == (memory != "full")
        every = Settings(layers=tuple(range(pipe.depth)))  # the bounds below were measured on every block
        gen = pipe.generate(PROMPT, CONCEPTS, 128, 128, num_steps=4, seed=0, settings=every, progress=False)
        image = gen.image if name == "bf16" else out["bf16"][0].image
        exp = pipe.explain(image, CONCEPTS, settings=every, progress=False)
        out[name] = (gen, exp)
    return out


def pixels(result) -> torch.Tensor:
    return torch.from_numpy(np.array(result.image)).float()


def test_streamed_pipeline_is_bit_identical(runs):
    (gen, exp), (ref_gen, ref_exp) = runs["stream"], runs["bf16"]
    assert torch.equal(pixels(gen), pixels(ref_gen))
    assert torch.equal(gen.maps, ref_gen.maps) and torch.equal(exp.maps, ref_exp.maps)


def test_fp8_maps_and_image_agree_with_bf16(runs):
    """fp8 weights move the maps a little further from bf16 than float32 is (measured on the shipped shapes model,
    4 steps: maps max abs 0.034 generate / 0.041 explain, correlation 0.998 / 0.999, image max 59 / mean 0.84 levels of
    255, the max at a few edge pixels; float32 vs bf16: 0.008 / 0.033, 0.9998 / 0.9996, 19 / 0.37)."""
    for name in ("fp8", "fp32"):
        (gen, exp), (ref_gen, ref_exp) = runs[name], runs["bf16"]
        diff = (pixels(gen) - pixels(ref_gen)).abs()
        print(
            f"{name} vs bf16: maps max abs {(gen.maps - ref_gen.maps).abs().max():.4f} (generate), "
            f"{(exp.maps - ref_exp.maps).abs().max():.4f} (explain), correlation "
            f"{correlation(gen.maps, ref_gen.maps):.4f} / {correlation(exp.maps, ref_exp.maps):.4f}; "
            f"image max {diff.max():.0f}, mean {diff.mean():.2f} of 255"
        )
    (gen, exp), (ref_gen, ref_exp) = runs["fp8"], runs["bf16"]
    assert (gen.maps - ref_gen.maps).abs().max() < 0.1 and (exp.maps - ref_exp.maps).abs().max() < 0.15
    assert correlation(gen.maps, ref_gen.maps) > 0.99 and correlation(exp.maps, ref_exp.maps) > 0.99
    diff = (pixels(gen) - pixels(ref_gen)).abs()
    assert diff.max() <= 80 and diff.mean() < 2.0


def test_cli_memory_option(tmp_path, capsys):
    args = ["generate", "--model", "shapes", "--prompt", PROMPT, "--concepts", *CONCEPTS, "--size", "64",
            "--device", "cpu", "--out"]  # fmt: skip
    for memory in ("full", "stream"):
        assert main([*args, str(tmp_path / memory), "--memory", memory]) == 0
    assert main([*args, str(tmp_path / "offload"), "--offload"]) == 0
    full = load_file(tmp_path / "full" / "maps.safetensors")
    for memory in ("stream", "offload"):
        other = load_file(tmp_path / memory / "maps.safetensors")
        assert all(torch.equal(full[k], other[k]) for k in full), memory
    with pytest.raises(SystemExit) as exit_info:
        main([*args, str(tmp_path / "bad"), "--memory", "half"])
    assert exit_info.value.code == 2 and "invalid choice: 'half'" in capsys.readouterr().err
