"""The ConceptAttention pipeline on tiny random weights, end to end on the CPU.

The maps are checked against an independent computation written here from the model's own weights (block 0, where
the inputs are known without running the concept stream), the image against plain sampling without concepts, and the
averaging options against their definitions."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mmdit
from concept_attention import EXPLAIN_GUIDANCE, PRESETS, ConceptAttentionPipeline, InputWarning, Settings
from mmdit.math import timestep_embedding
from sampling import denoise, get_noise, get_schedule, image_ids, pack, text_ids, unpack
from tiny import randomize, tiny_pipeline, train_spiece


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_spiece(folder)
    return tiny_pipeline(folder)


def photo(height=32, width=48, seed=0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, height // 8, width // 8, generator=g)
    x = F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy())


CONCEPTS = ["cat", "sky", "grass"]


@pytest.mark.parametrize("size", [(32, 32), (32, 48), (48, 16)])
def test_generate_image_is_plain_sampling(pipe, size):
    h, w = size
    result = pipe.generate("a red cat", CONCEPTS, height=h, width=w, num_steps=3, seed=3, progress=False)
    assert result.maps.shape == (3, h // 16, w // 16) and result.image.size == (w, h)

    # the same sampling written out here, with no concepts anywhere
    flux, ae = pipe.flux, pipe.autoencoder
    y = torch.zeros(1, flux.config.vec_in_dim)
    img = pack(get_noise(1, h, w, 3))
    with torch.no_grad():  # as the pipeline runs: SDPA may pick another kernel when autograd records
        txt = pipe.t5(pipe.t5_tokenizer(["a red cat"], max_length=pipe.max_length))
        ids, tids = image_ids(1, h, w), text_ids(1, txt.shape[1])
        img = denoise(lambda x, t: flux(x, ids, txt, tids, t, y), img, get_schedule(3, img.shape[1]))
        x = ae.decode(unpack(img, h, w))[0]
    expected = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert (torch.from_numpy(expected) == torch.from_numpy(np.array(result.image))).all()


def test_softmax_maps_sum_to_one(pipe):
    result = pipe.explain(photo(), CONCEPTS, progress=False)
    sums = result.maps.sum(0)
    print("max |sum - 1| =", (sums - 1).abs().max().item())
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    raw = pipe.explain(photo(), CONCEPTS, settings=Settings(softmax=False), progress=False)
    assert not torch.allclose(raw.maps.sum(0), torch.ones_like(sums), atol=1e-2)


def rope(x: torch.Tensor, ids: torch.Tensor, axes_dim, theta) -> torch.Tensor:
    """Interleaved-pair rotation of x (B, H, L, D) at positions ids (B, L, n_axes), written out independently."""
    angles = []
    for axis, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(ids[..., axis, None].double() * omega)  # (B, L, d/2)
    angle = torch.cat(angles, dim=-1)[:, None].float()  # (B, 1, L, D/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = angle.cos(), angle.sin()
    return torch.stack((cos * even - sin * odd, sin * even + cos * odd), dim=-1).flatten(-2)


def block0_spaces(pipe, image, concepts, prompt, t, seed, guidance=None):
    """Block 0's four saliency spaces for explain(), computed from the weights: returns {space: (H, C, N)} (and the
    value space per head as "value_heads"). `guidance` for a model with a guidance embedding."""
    flux, cfg = pipe.flux, pipe.flux.config
    blk, H = flux.double_blocks[0], cfg.num_heads
    height, width = image.height, image.width
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 * 2 - 1
    z = pack(pipe.autoencoder.encode(x[None]))
    x_t = t * pack(get_noise(1, height, width, seed)) + (1 - t) * z
    prompt_ids = pipe.t5_tokenizer([prompt], max_length=pipe.max_length)
    txt = flux.txt_in(pipe.t5(prompt_ids))
    concept_tokens = pipe.t5(pipe.t5_tokenizer(concepts, max_length=pipe.max_length))[:, 0]  # one-piece words
    c = flux.txt_in(concept_tokens)[None]  # (1, C, hidden)
    temb = flux.time_in(timestep_embedding(torch.tensor([t]), 256))
    if guidance is not None:
        temb = temb + flux.guidance_in(timestep_embedding(torch.tensor([guidance]), 256))
    vec = temb + flux.vector_in(torch.zeros(1, cfg.vec_in_dim))  # explain uses the zero pooled vector for all
    img = flux.img_in(x_t)

    def stream(x, mod, attn):
        shift, scale = mod.lin(F.silu(vec)).chunk(6, dim=-1)[:2]
        xm = (1 + scale[:, None]) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift[:, None]
        q, k, v = attn.qkv(xm).chunk(3, dim=-1)
        split = lambda u: u.unflatten(-1, (H, -1)).transpose(1, 2)  # noqa: E731  (B, H, L, D)
        rms = lambda u, s: u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + 1e-6) * s  # noqa: E731
        return rms(split(q), attn.norm.query_norm.scale), rms(split(k), attn.norm.key_norm.scale), split(v)

    iq, ik, iv = stream(img, blk.img_mod, blk.img_attn)
    tq, tk, tv = stream(txt, blk.txt_mod, blk.txt_attn)
    cq, ck, cv = stream(c, blk.txt_mod, blk.txt_attn)
    ids = torch.cat((text_ids(1, txt.shape[1]), image_ids(1, height, width)), dim=1)
    q = rope(torch.cat((tq, iq), 2), ids, cfg.axes_dim, cfg.theta)
    k = rope(torch.cat((tk, ik), 2), ids, cfg.axes_dim, cfg.theta)
    v = torch.cat((tv, iv), 2)
    D, T = q.shape[-1], txt.shape[1]
    o_x = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v)[:, :, T:]  # (1, H, N, D)
    keys, values = torch.cat((ck, k[:, :, T:]), 2), torch.cat((cv, iv), 2)  # concepts at position 0: no rotation
    w = torch.softmax(cq @ keys.transpose(-1, -2) / math.sqrt(D), -1)  # (1, H, C, C+N)
    o_c = w @ values
    C = len(concepts)
    return {
        "output": torch.einsum("hcd,hnd->cn", o_c[0], o_x[0])[None],
        "attention": w[0, :, :, C:],
        "value": torch.einsum("hcd,hnd->cn", cv[0], iv[0])[None],
        "value_heads": torch.einsum("hcd,hnd->hcn", cv[0], iv[0]),
        "cross_attention": torch.einsum("hcd,hnd->hcn", ck[0], iq[0]),
    }


@pytest.mark.parametrize("space", ["output", "attention", "value", "cross_attention"])
@pytest.mark.parametrize("softmax", [False, True])
def test_maps_equal_independent_computation(pipe, space, softmax):
    image = photo(32, 48, seed=1)
    settings = Settings(space=space, softmax=softmax, layers=(0,), token_rule="first")
    result = pipe.explain(image, CONCEPTS, prompt="a cat", t=0.4, seed=5, settings=settings, progress=False)
    with torch.no_grad():
        per_head = block0_spaces(pipe, image, CONCEPTS, "a cat", 0.4, 5)[space]  # (H or 1, C, N)
    expected = (per_head.softmax(1) if softmax else per_head).mean(0).reshape(result.maps.shape)
    err = (result.maps - expected).abs().max().item()
    print(f"{space} softmax={softmax}: max abs error {err:.2e}")
    assert err <= 1e-4 * max(1.0, expected.abs().max().item())  # float32 round-off over a few hundred terms


def test_layer_and_step_selection_average_what_they_say(pipe):
    grid = pipe.generate("a cat", CONCEPTS, 32, 32, num_steps=3, settings=Settings(softmax=False), keep_grid=True,
                         progress=False)  # fmt: skip
    raw = grid.grid["output"]  # (L, T, C, N)
    assert raw.shape[:2] == (3, 3)
    chosen = pipe.generate("a cat", CONCEPTS, 32, 32, num_steps=3, progress=False,
                           settings=Settings(softmax=False, layers=(0, 2), steps=(1,)))  # fmt: skip
    expected = raw[[0, 2]][:, [1]].mean(dim=(0, 1)).reshape(chosen.maps.shape)
    print("layer/step selection max abs error", (chosen.maps - expected).abs().max().item())
    assert torch.allclose(chosen.maps, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(grid.select(layers=(0, 2), steps=(1,)), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(grid.select(layers=(1,)), expected, atol=1e-3)


def test_num_samples_averages_different_noise(pipe):
    image, s = photo(), Settings(softmax=False)
    two = pipe.explain(image, CONCEPTS, num_samples=2, seed=7, settings=s, progress=False).maps
    a = pipe.explain(image, CONCEPTS, num_samples=1, seed=7, settings=s, progress=False).maps
    b = pipe.explain(image, CONCEPTS, num_samples=1, seed=8, settings=s, progress=False).maps
    assert not torch.allclose(a, b, atol=1e-4)  # the two draws really differ
    assert torch.allclose(two, (a + b) / 2, atol=1e-5, rtol=1e-5)


def test_token_rules(pipe):
    tok = pipe.t5_tokenizer
    single = [w for w in ("cat", "sky", "red", "dog") if len(tok.encode(w)) == 2]
    multi = [w for w in ("zebra", "hippopotamus", "skyscraper") if len(tok.encode(w)) > 2]  # not in the corpus
    assert len(single) >= 2 and multi, "the test tokenizer must split some words and not others"
    image = photo()
    maps = {r: pipe.explain(image, single, settings=Settings(token_rule=r), progress=False).maps for r in
            ("first", "mean", "pieces")}  # fmt: skip
    assert torch.allclose(maps["first"], maps["mean"], atol=1e-6) and torch.allclose(maps["first"], maps["pieces"])
    concepts = single[:1] + multi[:1]
    maps = {r: pipe.explain(image, concepts, settings=Settings(token_rule=r), progress=False).maps for r in
            ("first", "mean", "pieces")}  # fmt: skip
    assert not torch.allclose(maps["first"], maps["mean"], atol=1e-4)
    assert not torch.allclose(maps["mean"], maps["pieces"], atol=1e-4)


def test_bad_input(pipe):
    with pytest.raises(ValueError, match="duplicate concept 'cat'"):
        pipe.explain(photo(), ["cat", "cat"], progress=False)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe.generate("a cat", ["cat"], 40, 32, progress=False)
    with pytest.raises(ValueError, match="no concepts"):
        pipe.explain(photo(), [], progress=False)
    with pytest.raises(ValueError, match="double blocks"):
        pipe.explain(photo(), ["cat"], settings=Settings(layers=(7,)), progress=False)
    with pytest.raises(ValueError, match="space"):
        Settings(space="keys")
    assert PRESETS["official"].layers == (15, 16, 17, 18)


def test_result_helpers_and_save(pipe, tmp_path):
    result = pipe.explain(photo(32, 48), CONCEPTS, progress=False)
    assert result.upsample().shape == (3, 32, 48)
    masks = result.masks("argmax")
    assert masks.shape == (3, 32, 48) and (masks.sum(0) == 1).all()
    out = result.save(tmp_path / "out")
    for name in ("image.png", "overlay.png", "maps.safetensors", "settings.json"):
        assert (out / name).is_file()
    assert len(list((out / "heatmaps").glob("*.png"))) == 3 and len(list((out / "masks").glob("*.png"))) == 3


@pytest.mark.parametrize("softmax", [False, True])
def test_official_value_space_is_softmax_per_head_then_head_mean(pipe, softmax):
    # The official baseline: v_c . v_x per head, softmax over concepts per head, mean over heads. Ours by default sums
    # the heads first (one softmax over the concatenated heads' dot product); both are checked against block 0.
    image = photo(32, 48, seed=1)
    per_head = block0_spaces(pipe, image, CONCEPTS, "a cat", 0.4, 5)["value_heads"]  # (H, C, N)
    for value_per_head, expected in [
        (True, (per_head.softmax(1) if softmax else per_head).mean(0)),
        (False, per_head.sum(0).softmax(0) if softmax else per_head.sum(0)),
    ]:
        settings = Settings(space="value", softmax=softmax, layers=(0,), token_rule="first",
                            value_per_head=value_per_head)  # fmt: skip
        result = pipe.explain(image, CONCEPTS, prompt="a cat", t=0.4, seed=5, settings=settings, progress=False)
        expected = expected.reshape(result.maps.shape)
        err = (result.maps - expected).abs().max().item()
        print(f"value per_head={value_per_head} softmax={softmax}: max abs error {err:.2e}")
        assert err <= 1e-4 * max(1.0, expected.abs().max().item())
    assert PRESETS["paper-imagenet"].value_per_head and not Settings().value_per_head


@pytest.fixture(scope="module")
def guided(pipe):
    """The tiny pipeline with a transformer that has a guidance embedding, as FLUX.1-dev has."""
    config = dataclasses.replace(pipe.flux.config, guidance_embed=True)
    flux = randomize(mmdit.Flux(config), seed=11)
    return ConceptAttentionPipeline(flux, pipe.autoencoder, pipe.t5, pipe.t5_tokenizer, device="cpu",
                                    max_length=pipe.max_length, source="tiny-guided")  # fmt: skip


def test_explain_feeds_the_guidance_it_is_given(pipe, guided):
    image, settings = photo(32, 48, seed=2), Settings(softmax=False, layers=(0,), token_rule="first")
    expected = {
        g: block0_spaces(guided, image, CONCEPTS, "a cat", 0.4, 5, guidance=g)["output"].mean(0) for g in (0.0, 3.5)
    }
    assert EXPLAIN_GUIDANCE == 3.5
    for guidance in (None, 0.0):  # None: the default
        kwargs = {} if guidance is None else {"guidance": guidance}
        result = guided.explain(image, CONCEPTS, prompt="a cat", t=0.4, seed=5, settings=settings, progress=False,
                                **kwargs)  # fmt: skip
        fed = EXPLAIN_GUIDANCE if guidance is None else guidance
        want, other = (expected[g].reshape(result.maps.shape) for g in (fed, 3.5 - fed))
        err = (result.maps - want).abs().max().item()
        print(f"guidance {fed}: max abs error {err:.2e}, to the other guidance {(want - other).abs().max():.2e}")
        assert err <= 1e-4 * max(1.0, want.abs().max().item()) < (want - other).abs().max().item()
        assert result.record["guidance"] == fed
    plain = pipe.explain(image, CONCEPTS, settings=settings, progress=False, guidance=7.0)  # no guidance embedding
    assert plain.record["guidance"] is None


def test_api_checks(pipe):
    grid = pipe.explain(photo(), CONCEPTS, keep_grid=True, progress=False)
    for selection in ({"layers": ()}, {"steps": ()}, {"layers": "12"}):
        with pytest.raises(ValueError, match="layers|steps"):
            grid.select(**selection)
    assert torch.isfinite(grid.select(layers=(1,))).all()
    for kwargs, message in [({"t": 1.5}, "t = 1.5"), ({"num_samples": 0}, "num_samples = 0"),
                            ({"num_samples": 1.5}, "whole number"), ({"seed": -1}, "seed = -1")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            pipe.explain(photo(), CONCEPTS, progress=False, **kwargs)
    with pytest.raises(ValueError, match="num_steps = 1000000000000"):
        pipe.generate("a cat", CONCEPTS, 32, 32, num_steps=10**12, progress=False)
    with pytest.raises(ValueError, match="must be a string"):
        pipe.explain(photo(), ["cat", None], progress=False)


def test_explain_image_inputs(pipe):
    raw = Settings(softmax=False)  # the tiny random model saturates the softmax
    image = photo(32, 48, seed=3)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    reference = pipe.explain(image, CONCEPTS, settings=raw, progress=False).maps
    assert torch.allclose(pipe.explain(x, CONCEPTS, settings=raw, progress=False).maps, reference, atol=1e-6)
    with pytest.raises(ValueError, match=r"takes \[0, 1\]"):
        pipe.explain(x * 2 - 1, CONCEPTS, settings=raw, progress=False)  # [-1, 1] is refused, not clamped
    rgba = image.convert("RGBA")
    rgba.putalpha(128)
    over_white = Image.alpha_composite(Image.new("RGBA", image.size, "white"), rgba).convert("RGB")
    got = pipe.explain(rgba, CONCEPTS, settings=raw, progress=False).maps
    assert torch.allclose(got, pipe.explain(over_white, CONCEPTS, settings=raw, progress=False).maps, atol=1e-6)
    assert not torch.allclose(got, reference, atol=1e-3)
    odd = pipe.explain(photo(40, 56), CONCEPTS, settings=raw, progress=False)  # not multiples of 16: resized, recorded
    assert odd.maps.shape == (3, 3, 4) and odd.record["input_size"] == [40, 56] and odd.image.size == (64, 48)


def test_single_concept_warns(pipe):
    with pytest.warns(InputWarning, match="background"):
        pipe.explain(photo(), ["cat"], progress=False)
