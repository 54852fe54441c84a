"""The official CogVideoX recipe (`--preset official` on CogVideoX, `PRESETS["official-cogvideox"]`): its options
leave the video bitwise unchanged, the padded softmax's maps equal an independent computation from each block's
inputs (the official block's SDPA over [concepts; video], the softmax over all 226 slots, the padding dropped, the mean
over layers and steps), Flux and SD3.5 refuse the CogVideoX options and CogVideoX the SD3 ones; and, when
CONCEPT_ATTENTION_OFFICIAL names a folder holding the official source
(`git -C <mirror of helblazer811/ConceptAttention> archive HEAD | tar -x -C DIR`), our maps equal the official
`ModifiedCogVideoXPipeline`'s on the same tiny weights (2B-like and 5B-like, with guidance: the official pipeline
crashes without it). Tiny random models only.

Run: `CONCEPT_ATTENTION_OFFICIAL=/tmp/official .venv/bin/python -m pytest tests/test_cogvideox_official.py -s`
"""

import copy
import dataclasses
import logging
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import test_cogvideox_pipeline
import torch
import torch.nn.functional as F
from test_cogvideox import randomize

import cogvideox
from checks import InputWarning
from concept_attention import ConceptAttentionPipeline, ConceptPipeline
from mmdit import ConceptInput
from mmdit.math import apply_rope
from saliency import PADDING, PRESETS, Settings, check_family, family_settings, for_family, reduce_space

diffusers = pytest.importorskip("diffusers")

OFFICIAL = os.environ.get("CONCEPT_ATTENTION_OFFICIAL")
RTOL = 1e-5  # relative to the largest expected value, both sides run in float64 (our maps are reduced in float32)
# fp32: the padded softmax gives each concept about 1/226 of the mass, so the maps carry the absolute fp32 error of the
# logits o_c . o_x (a few 1e-6 here) as a relative error; measured 0.7e-5 to 1.7e-5, bounded at 5e-5
RTOL_FP32 = 5e-5
TEXT = 226  # the prompt's T5 length, and the official code's concept slots (hard-coded there)
CONCEPTS = ["cat", "grass", "sky"]
PROMPT = "a red cat on the grass under the sky"
RUN = dict(height=32, width=48, num_steps=3, seed=5, num_frames=5)  # 2 latent frames of 2 x 3 tokens


# ---- settings ----------------------------------------------------------------------------------------------------
def test_preset_and_family_checks():
    official = PRESETS["official-cogvideox"]
    assert (official.token_rule, official.pad_concepts, official.concept_length, official.guided_half) == (
        "first", True, 16, "conditional")  # fmt: skip
    assert (official.space, official.softmax, official.layers, official.steps) == ("output", True, None, None)
    assert for_family(PRESETS["official"], "cogvideox") is official
    assert for_family(PRESETS["official"], "flux") is PRESETS["official"]
    assert family_settings(PRESETS["official"], "cogvideox") is official
    d = Settings()  # the defaults are unchanged
    assert (d.pad_concepts, d.concept_length, d.token_rule) == (False, None, "mean")
    for family in ("flux", "sd3"):
        for change in ({"pad_concepts": True}, {"concept_length": 16}):
            with pytest.raises(ValueError, match="CogVideoX only"):
                check_family(Settings(**change), family)
        with pytest.raises(ValueError, match="CogVideoX only"):
            check_family(official, family)
    for change in ({"concept_encoder": "clip-joined"}, {"image_vectors": "concepts"}, {"reduce": "vectors"}):
        with pytest.raises(ValueError, match="SD3.5 only"):
            check_family(Settings(**change), "cogvideox")
    check_family(Settings(guided_half="unconditional"), "cogvideox")  # a guided batch: the choice makes sense
    check_family(Settings(guided_half="unconditional"), "sd3")
    with pytest.raises(ValueError, match="SD3.5 and CogVideoX only"):
        check_family(Settings(guided_half="unconditional"), "flux")
    for name in ("default", "official", "official-demo", "paper-imagenet"):
        check_family(PRESETS[name], "cogvideox")
    for bad in (1, 0, "16", True, 2.5):
        with pytest.raises(ValueError, match="concept_length"):
            Settings(concept_length=bad)
    with pytest.raises(ValueError, match="True or False"):
        Settings(pad_concepts="yes")


def test_padded_softmax_by_hand():
    """Padding rows join the softmax over concepts and are dropped after it; pieces are averaged first."""
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(1, 6, 5, generator=gen)  # (B, C', N): concept 0 in two pieces, concept 1, three pads
    owner = torch.tensor([0, 0, 1, PADDING, PADDING, PADDING])
    rows = torch.cat((value[:, :2].mean(1, keepdim=True), value[:, 2:]), dim=1)  # (B, 5, N)
    expected = rows.softmax(dim=1)[:, :2]
    assert torch.allclose(reduce_space(value, owner, 2, softmax=True), expected, atol=1e-7)
    assert torch.allclose(reduce_space(value, owner, 2, softmax=False), rows[:, :2], atol=1e-7)  # no softmax: dropped
    heads = torch.randn(1, 2, 6, 5, generator=gen)  # a head-wise space: softmax per head, then the head mean
    rows = torch.cat((heads[:, :, :2].mean(2, keepdim=True), heads[:, :, 2:]), dim=2)
    assert torch.allclose(reduce_space(heads, owner, 2, softmax=True), rows.softmax(2)[:, :, :2].mean(1), atol=1e-7)


@pytest.mark.parametrize("name", ["tiny-2b", "tiny-5b"])
def test_padding_leaves_the_video_bitwise(name):
    config = cogvideox.CONFIGS[name]
    model = cogvideox.CogVideoX(config).eval()
    randomize(model, 3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, config.in_channels, 8, 12, generator=gen)
    t = torch.tensor([999, 500])
    context = torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=gen)
    tokens = torch.randn(1, 3, config.text_embed_dim, generator=gen)
    padded = torch.cat((tokens, torch.zeros(1, config.max_text_seq_length - 3, config.text_embed_dim)), 1)
    with torch.no_grad():
        plain = model(x, t, context)
        out = model(x, t, context, concepts=ConceptInput(padded.expand(2, -1, -1)))
    assert torch.equal(out.prediction, plain)
    assert out.saliency[0].output.shape == (2, config.max_text_seq_length, 2 * 4 * 6)


# ---- the pipeline ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["2b-like", "5b-like"])
def pair(request, tmp_path_factory):
    """A tiny diffusers CogVideoX snapshot whose text is 226 T5 tokens (the official code pads concepts to 226, which
    the 2B's sin-cos table takes only at its max_text_seq_length), and our pipeline on it."""
    folder = tmp_path_factory.mktemp("cogvideox-official") / "tiny-cogvideox"
    saved, test_cogvideox_pipeline.TEXT = test_cogvideox_pipeline.TEXT, TEXT
    try:
        reference = test_cogvideox_pipeline.snapshot(folder, request.param)
    finally:
        test_cogvideox_pipeline.TEXT = saved
    ours = ConceptAttentionPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert ours.max_length == TEXT
    return ours, reference, folder


@pytest.fixture(scope="module")
def ours64(pair):
    return ConceptAttentionPipeline.from_pretrained(pair[2], device="cpu", dtype=torch.float64)


def generate(ours, settings, guidance):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        return ours.generate(PROMPT, CONCEPTS, RUN["height"], RUN["width"], RUN["num_steps"], seed=RUN["seed"],
                             settings=settings, guidance=guidance, progress=False,
                             num_frames=RUN["num_frames"])  # fmt: skip


def heads(attn, x):
    B, L, _ = x.shape
    q, k, v = (f(x).view(B, L, attn.num_heads, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    return attn.norm_q(q), attn.norm_k(k), v  # (B, H, L, D)


def block_map_by_hand(block, video, text, temb, pe, concepts):
    """The official block's output-space map from a block's inputs: text-half modulation of the concepts, one SDPA
    over [concepts; video] queries, keys and values (video rotated on the 5B), o_c . o_x of the joint attention's
    video rows, both before `to_out` -> (B, P, N) over every concept slot."""
    shift, scale, _, t_shift, t_scale, _ = block.norm1.linear(F.silu(temb))[:, None].chunk(6, dim=-1)
    norm = block.norm1.norm
    nx, nt, nc = norm(video) * (1 + scale) + shift, norm(text) * (1 + t_scale) + t_shift, norm(concepts) * (
        1 + t_scale) + t_shift  # fmt: skip
    T, P = text.shape[1], concepts.shape[1]
    q, k, v = heads(block.attn1, torch.cat((nt, nx), dim=1))
    if pe is not None:
        q = torch.cat((q[:, :, :T], apply_rope(q[:, :, T:], pe)), dim=2)
        k = torch.cat((k[:, :, :T], apply_rope(k[:, :, T:], pe)), dim=2)
    o_x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)[:, T:]  # (B, N, H*D)
    c_q, c_k, c_v = heads(block.attn1, nc)
    o = F.scaled_dot_product_attention(torch.cat((c_q, q[:, :, T:]), 2), torch.cat((c_k, k[:, :, T:]), 2),
                                       torch.cat((c_v, v[:, :, T:]), 2))  # fmt: skip
    o_c = o[:, :, :P].transpose(1, 2).flatten(2)  # (B, P, H*D)
    return torch.einsum("bpd,bnd->bpn", o_c, o_x)


@pytest.mark.parametrize("guidance", [0.0, 3.0], ids=["plain", "cfg"])
def test_padded_maps_equal_an_independent_computation(ours64, guidance):
    """Each block's inputs recorded during `generate` (float64); by hand: the map over all 226 slots, the row of the
    conditional half, softmax over the slots, the first C kept, the mean over layers and steps. No guidance runs (the
    official pipeline crashes there)."""
    ours = ours64
    seen = []
    hooks = [
        b.register_forward_pre_hook(lambda m, a: seen.append((m, a[:5]))) for b in ours.transformer.transformer_blocks
    ]
    try:
        result = generate(ours, PRESETS["official"], guidance)
    finally:
        for hook in hooks:
            hook.remove()
    assert result.settings == PRESETS["official-cogvideox"]
    depth, C = len(ours.transformer.transformer_blocks), len(CONCEPTS)
    seen = seen[-RUN["num_steps"] * depth :]  # the sampling forwards (every block reports)
    assert all(a[4] is not None and a[4].shape[1] == TEXT for _, a in seen)  # 226 concept slots
    row = 1 if guidance > 1 else 0
    with torch.no_grad():
        maps = [block_map_by_hand(block, *args)[row].softmax(dim=0)[:C] for block, args in seen]
    expected = torch.stack(maps).mean(0).reshape(C, 2, 2, 3).float()  # (C, latent frames, h, w)
    err = (result.maps - expected).abs().max().item()
    print(f"guidance {guidance}: max |ours - by hand| = {err:.3e}")
    assert err <= RTOL * expected.abs().max().item()
    assert (result.maps.sum(0) < 1).all()  # the padding slots took their share of the softmax


def test_official_options_leave_the_frames(pair):
    ours = pair[0]
    plain, official = generate(ours, Settings(), 3.0), generate(ours, PRESETS["official"], 3.0)
    for a, b in zip(plain.frames, official.frames, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not torch.allclose(plain.maps, official.maps, atol=1e-3)


# ---- the official code, from its source ------------------------------------------------------------------------
def import_official(root: str):
    """The official cogvideox modules, bypassing the package's __init__ (it imports the Flux stack)."""
    package = Path(root) / "concept_attention"
    if not (package / "cogvideox").is_dir():
        pytest.fail(f"CONCEPT_ATTENTION_OFFICIAL={root}: no concept_attention/cogvideox/ there")
    saved = sys.modules.get("concept_attention")
    module = types.ModuleType("concept_attention")
    module.__path__ = [str(package)]
    sys.modules["concept_attention"] = module  # our own `concept_attention` is restored below
    try:
        from concept_attention.cogvideox import dit, pipeline
    finally:
        if saved is not None:
            sys.modules["concept_attention"] = saved
    return dit, pipeline


@pytest.fixture(scope="module")
def official(pair):
    """The official pipeline on the snapshot's weights: {torch.float32: pipe, torch.float64: pipe}."""
    if not OFFICIAL:
        pytest.skip("set CONCEPT_ATTENTION_OFFICIAL to the extracted official source to compare with it")
    dit, pipeline = import_official(OFFICIAL)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    reference = pair[1]
    pipes = {}
    for dtype in (torch.float32, torch.float64):
        transformer = dit.ModifiedCogVideoXTransformer3DModel.from_config(reference.transformer.config).eval()
        transformer.load_state_dict(reference.transformer.state_dict(), strict=True)
        components = {k: copy.deepcopy(v) for k, v in reference.components.items() if k != "transformer"}
        pipe = pipeline.ModifiedCogVideoXPipeline(transformer=transformer, **components).to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        pipes[dtype] = pipe
    return pipes


def run_official(pipe, guidance: float, depth: int):
    with torch.no_grad():
        video, maps = pipe(PROMPT, concepts=CONCEPTS, height=RUN["height"], width=RUN["width"],
                           num_frames=RUN["num_frames"], num_inference_steps=RUN["num_steps"],
                           guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(RUN["seed"]),
                           output_type="np", max_sequence_length=TEXT,
                           concept_attention_kwargs={"layers": list(range(depth))})  # fmt: skip
    return video.frames[0], maps["concept_attention_maps"].float()  # (frames, H, W, 3), (C, F, h, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_generate_equals_official(pair, ours64, official, dtype):
    """Guidance 6 (the official example's), every block and step: the maps [C, latent frames, h, w] and the frames."""
    ours = pair[0] if dtype == torch.float32 else ours64
    depth = len(ours.transformer.transformer_blocks)
    frames, theirs = run_official(official[dtype], 6.0, depth)
    result = generate(ours, PRESETS["official"], 6.0)
    err = (result.maps - theirs).abs().max().item()
    scale, spread = theirs.abs().max().item(), (theirs.amax() - theirs.amin()).item()
    print(f"{type(official[dtype].scheduler).__name__} {dtype}: max |ours - official| = {err:.3e}, relative "
          f"{err / scale:.2e} (official maps: max {scale:.4f}, max - min {spread:.4f})")  # fmt: skip
    tolerance = RTOL if dtype == torch.float64 else RTOL_FP32
    assert result.maps.shape == theirs.shape and err <= tolerance * scale
    pixels = np.abs(np.stack([np.asarray(f, dtype=np.int32) for f in result.frames])
                    - np.round(frames * 255).astype(np.int32)).max()  # fmt: skip
    assert pixels <= 1, f"the frames differ by {pixels} of 255"
    for change in ({"pad_concepts": False}, {"concept_length": None}, {"guided_half": "unconditional"}):
        other = generate(ours, dataclasses.replace(PRESETS["official-cogvideox"], **change), 6.0).maps
        control = (other - theirs).abs().max().item()
        print(f"  control {change}: max |other - official| = {control:.3e}")
        assert control > 1000 * RTOL * scale


def test_official_crashes_without_guidance_ours_does_not(pair, official):
    ours = pair[0]
    with pytest.raises(RuntimeError):  # its concepts have batch 2, the latents batch 1
        run_official(official[torch.float32], 1.0, len(ours.transformer.transformer_blocks))
    assert generate(ours, PRESETS["official"], 1.0).maps.shape == (3, 2, 2, 3)


def test_flux_refuses_the_cogvideox_preset():
    flux = object.__new__(ConceptPipeline)
    flux.family = "flux"
    with pytest.raises(ValueError, match="CogVideoX only"):  # refused before anything runs
        ConceptPipeline.generate(
            flux, "a cat", ["cat"], 32, 32, 1, settings=PRESETS["official-cogvideox"], guidance=0.0
        )


def test_explain_and_command_line_read_official_as_cogvideox(pair, tmp_path):
    """`explain` and `--preset official` on a CogVideoX snapshot run the official CogVideoX recipe."""
    import json

    from PIL import Image

    from concept_attention import main

    ours = pair[0]
    clip = [Image.new("RGB", (48, 32), (30 * i, 80, 160)) for i in range(5)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        result = ours.explain(clip, CONCEPTS, "a cat", settings=PRESETS["official"], progress=False)
    assert result.settings == PRESETS["official-cogvideox"] and result.maps.shape == (3, 2, 2, 3)
    assert (result.maps.sum(0) < 1).all()  # the padding slots' share
    out = tmp_path / "g"
    argv = ["generate", "--model", str(pair[2]), "--prompt", "a cat", "--concepts", *CONCEPTS, "--device", "cpu",
            "--size", "32x48", "--frames", "5", "--num-steps", "2", "--guidance", "6", "--preset", "official",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert (settings["pad_concepts"], settings["concept_length"], settings["token_rule"]) == (True, 16, "first")
