"""The shapes scenes (reproducible, exact masks, held-out split) and the training loop (a few steps lower the loss)."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from shapes.scenes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_SEED_START,
    SHAPES,
    WORLDS,
    SceneConfig,
    held_out_seeds,
    make_batch,
    make_scene,
    shape_mask,
    training_seeds,
)


def test_scenes_are_reproducible_from_their_seed():
    for seed in (0, 7, HELD_OUT_SEED_START + 3):
        a, b = make_scene(seed), make_scene(seed)
        assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.shapes == b.shapes
        assert a.masks.keys() == b.masks.keys() and all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert not np.array_equal(make_scene(0).image, make_scene(1).image)


@pytest.mark.parametrize("seed", range(40))
def test_masks_are_exactly_the_painted_pixels(seed):
    # Independent of the mask code: segment the image by colour. Backgrounds are greys, shape colours are saturated,
    # so a pixel has a shape's RGB exactly when that shape is visible there.
    scene = make_scene(seed)
    union = np.zeros(scene.image.shape[:2], dtype=bool)
    for colour, kind in scene.shapes:
        painted = np.all(scene.image == np.array(COLOURS[colour], dtype=np.uint8), axis=-1)
        assert np.array_equal(scene.masks[kind], painted), f"{kind} mask differs from its {colour} pixels"
        assert np.array_equal(scene.masks[colour], painted)
        assert painted.sum() > 0.005 * painted.size  # every shape is visible
        assert not (union & painted).any()  # shapes never overlap
        union |= painted
        assert kind in scene.caption.split()
    assert np.array_equal(scene.masks["background"], ~union)
    assert np.array_equal(scene.masks[scene.background], ~union)
    for word in scene.masks:
        assert word in SHAPES or word in COLOURS or word in BACKGROUNDS or word == "background"


def test_worlds_restrict_the_vocabulary_and_keep_exact_masks():
    simple = SceneConfig(**WORLDS["simple"])
    seen = set()
    for seed in range(60):
        scene = make_scene(seed, simple)
        for colour, kind in scene.shapes:
            assert kind in simple.shapes and colour in simple.colours
            painted = np.all(scene.image == np.array(COLOURS[colour], dtype=np.uint8), axis=-1)
            assert np.array_equal(scene.masks[kind], painted)
            seen |= {kind, colour}
        assert scene.background in simple.backgrounds
    assert seen == set(simple.shapes) | set(simple.colours)  # every word of the world is drawn
    # the full world is the default, draw for draw
    full = SceneConfig(**WORLDS["full"])
    assert all(np.array_equal(make_scene(s, full).image, make_scene(s).image) for s in range(5))
    with pytest.raises(ValueError, match="shapes must be distinct words"):
        SceneConfig(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="need as many shapes and colours"):
        SceneConfig(colours=("red", "blue"))


def test_shape_areas_match_geometry():
    # known areas: circle pi r^2, square (1.6 r)^2, diamond 2 * 0.75 r * r; pixel-centre sampling error < 2 %
    size, r = 512, 100.0
    for kind, area in (("circle", math.pi * r**2), ("square", (1.6 * r) ** 2), ("diamond", 1.5 * r**2)):
        measured = shape_mask(kind, size / 2, size / 2, r, size).sum()
        print(kind, measured, area)
        assert abs(measured - area) / area < 0.02


def test_caption_options_and_split():
    single = make_scene(3, SceneConfig(single_word=1.0))
    assert single.caption in SHAPES and len(single.shapes) == 1
    plain = make_scene(3, SceneConfig(colourless=1.0, background_phrase=0.0))
    assert not set(plain.caption.split()) & set(COLOURS) and "background" not in plain.caption
    assert np.array_equal(plain.image, make_scene(3).image)  # caption options never change a seed's image
    named = make_scene(3, SceneConfig(background_phrase=1.0))
    assert named.caption.endswith(f"on a {named.background} background")
    assert min(held_out_seeds(5)) >= HELD_OUT_SEED_START
    assert max(training_seeds(torch.Generator().manual_seed(0), 1000)) < HELD_OUT_SEED_START
    images, captions, _ = make_batch([1, 2], SceneConfig(size=32))
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1 and len(captions) == 2


def test_a_few_training_steps_lower_the_loss(tmp_path):
    from shapes.train import Recipe, train

    recipe = Recipe(
        size=32, scenes=64, ae_steps=30, ae_batch=8, ae_size=16, ae_full_steps=5, hidden=32, heads=2, depth=2,
        single=1, t5_dim=32, steps=100, batch=8, lr=3e-3, warmup=10, eval_every=100, eval_scenes=8,
    )  # fmt: skip
    train(recipe, tmp_path, "cpu", seed=0)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    ae = [r["loss"] for r in records if r["stage"] == "ae" and "loss" in r]
    probes = [r["probe_loss"] for r in records if r["stage"] == "eval"]
    print("autoencoder loss", ae[0], "->", ae[-1], "; held-out velocity loss", probes[0], "->", probes[-1])
    assert ae[-1] < ae[0]
    # the probe is a fixed held-out batch with fixed noise at t = 0.5, so the change is not sampling noise
    assert probes[-1] < 0.97 * probes[0]
    for name in ("flux", "t5", "ae"):
        assert (tmp_path / f"{name}.safetensors").is_file() and (tmp_path / f"{name}_config.json").is_file()
    assert (tmp_path / "tokenizer_2" / "spiece.model").is_file()
    import weights

    assert weights.t5_max_length(tmp_path) == recipe.max_length  # the pipeline pads to the model's own length


def test_simple_world_and_an_encoder_that_does_not_mix_words(tmp_path):
    from dataclasses import replace

    from shapes.eval import load
    from shapes.train import Recipe, train

    recipe = Recipe(
        world="simple", t5_layers=0, isolate=0.5, size=32, scenes=32, ae_steps=10, ae_batch=4, ae_size=16,
        ae_full_steps=2, hidden=32, heads=2, depth=1, single=1, t5_dim=32, steps=60, batch=8, lr=3e-3, warmup=5,
        eval_every=60, eval_scenes=8,
    )  # fmt: skip
    train(recipe, tmp_path / "simple", "cpu", seed=0)
    records = [json.loads(line) for line in (tmp_path / "simple" / "log.jsonl").read_text().splitlines()]
    probes = [r["probe_loss"] for r in records if r["stage"] == "eval"]
    assert probes[-1] < probes[0]
    assert torch.load(tmp_path / "simple" / "latents.pt")["world"] == "simple"
    _, t5, *_ = load(tmp_path / "simple")  # strict loading of a T5 without blocks
    assert t5.config.num_layers == 0 and len(t5.encoder.block) == 0
    # cached latents of one world are refused for another
    with pytest.raises(ValueError, match="'simple' world"):
        train(replace(recipe, world="full"), tmp_path / "full", "cpu", seed=0, reuse=tmp_path / "simple")


def test_isolation_mask_cuts_exactly_the_image_to_image_pairs():
    from shapes.eval import isolation_mask

    assert isolation_mask(4, 3, 5, 0.0, torch.Generator()) is None
    mask = isolation_mask(64, 3, 5, 0.5, torch.Generator().manual_seed(0))
    isolated = ~mask.all(dim=(1, 2))
    assert 16 < isolated.sum() < 48  # about half the samples
    assert mask[~isolated].all()
    for m in mask[isolated]:
        assert m[:, :3].all() and m[:3].all()  # every token still sees the text, the text sees everything
        assert torch.equal(m[3:, 3:], torch.eye(5, dtype=torch.bool))  # image tokens see only themselves


def test_alignment_score_known_values():
    from shapes.measures import CONCEPTS, score

    scenes = [make_scene(s) for s in held_out_seeds(6)]
    words = [list(CONCEPTS)] * len(scenes)
    blank = np.zeros(scenes[0].image.shape[:2], dtype=bool)
    # full-resolution maps equal to the masks: the mean threshold recovers each mask exactly, so both IoUs are 1
    perfect = torch.stack(
        [torch.stack([torch.from_numpy(s.masks.get(c, blank)).float() for c in CONCEPTS]) for s in scenes]
    )
    assert score(perfect, scenes, words) == {"miou": 1.0, "fg": 1.0, "argmax": 1.0, "argmax_fg": 1.0}
    # the complement selects exactly the wrong pixels: both IoUs are 0, and under the argmax no word wins its own pixels
    wrong = score(1 - perfect, scenes, words)
    assert (wrong["miou"], wrong["fg"], wrong["argmax_fg"]) == (0.0, 0.0, 0.0), wrong
    # every word's map is the union of the scene's shapes: thresholding credits it (each shape is inside its map), the
    # argmax gives every pixel to the first word ("circle", ties) and leaves the others nothing
    union = perfect[:, : len(CONCEPTS) - 1].amax(1, keepdim=True).expand_as(perfect)
    blind = score(union, scenes, words)
    assert blind["fg"] > 0.3 and blind["argmax_fg"] < 0.05, blind
    # a softmax over the concepts keeps each pixel's order: the argmax scores do not change
    noisy = perfect + 0.3 * torch.rand(perfect.shape, generator=torch.Generator().manual_seed(0))
    ours, softened = score(noisy, scenes, words), score((4 * noisy).softmax(1), scenes, words)
    assert (ours["argmax"], ours["argmax_fg"]) == (softened["argmax"], softened["argmax_fg"])


def test_reference_maps_are_ordered_and_a_concept_blind_object_map_sits_between_disc_and_oracle():
    from shapes.ceilings import ceilings

    r = ceilings(128, "shaded", 60)
    # random < a concept-blind disc < every shape of the scene (still concept-blind) < the named shape alone
    assert r["random"]["miou"] < r["centred disc"]["miou"] < r["all shapes"]["miou"] < r["pooled oracle"]["miou"], r
    assert 0.28 < r["random"]["miou"] < 0.31 and r["pooled oracle"]["miou"] < r["sharpened oracle"]["miou"], r


def test_attention_budget_known_values():
    from mmdit import ConceptSaliency
    from shapes.measures import CONCEPTS, attention_budget

    scenes = [make_scene(s) for s in held_out_seeds(4)]
    B, C, H, h = len(scenes), len(CONCEPTS), 2, 8
    # uniform attention over the image with 0.75 of the mass on it: entropy 1, lift 1, image mass 0.75
    uniform = torch.full((B, H, C, h * h), 0.75 / (h * h))
    budget = attention_budget([ConceptSaliency(attention=uniform)] * 3, scenes, h, h)
    assert budget["budget/image_mass"] == pytest.approx(0.75, abs=1e-6)
    assert budget["budget/entropy"] == pytest.approx(1.0, abs=1e-5)
    assert budget["budget/lift"] == pytest.approx(1.0, abs=1e-5)
    # each concept attending to its own shape's token coverage: lift = sum(area^2) / (sum(area) * mean(area))
    focused, expected = torch.full((B, H, C, h * h), 1e-9), []
    for b, scene in enumerate(scenes):
        for c, word in enumerate(CONCEPTS):
            if word in scene.masks and word != "background":
                mask = torch.from_numpy(scene.masks[word]).float()
                area = mask.reshape(h, mask.shape[0] // h, h, mask.shape[1] // h).mean((1, 3)).flatten()
                focused[b, :, c] = area
                expected.append((area**2).sum() / area.sum() / area.mean())
    budget = attention_budget([ConceptSaliency(attention=focused)], scenes, h, h)
    assert budget["budget/lift"] == pytest.approx(torch.stack(expected).mean().item(), rel=1e-4)
    assert budget["budget/lift"] > 5  # shapes cover a few of the 64 tokens
    assert budget["budget/entropy"] < 0.7


WEIGHTS = Path(__file__).resolve().parents[1] / "shapes" / "weights"


@pytest.mark.skipif(not (WEIGHTS / "flux.safetensors").is_file(), reason="no shipped shapes weights")
def test_shipped_weights_load_strictly_and_reproduce_the_model_card_sample():
    from PIL import Image

    from shapes.eval import SAMPLE_PROMPTS, load, sample

    flux, t5, tok, ae, max_length = load(WEIGHTS)  # load_state_dict(strict=True) for all three models
    with torch.no_grad():
        recipe = json.loads((WEIGHTS / "recipe.json").read_text())
        prompts = SAMPLE_PROMPTS[recipe.get("world", "full")][:2]
        images = sample(flux, t5, tok, ae, prompts, max_length, recipe.get("sample_steps", 20), seed=0)
    ours = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()  # (B, H, W, 3)
    card = np.asarray(Image.open(WEIGHTS.parent / "samples.png"))  # the model card's row, first prompts first
    width = ours.shape[2]
    for i, image in enumerate(ours):
        diff = np.abs(image.astype(int) - card[:, i * width : (i + 1) * width].astype(int))
        print(prompts[i], "max uint8 difference", diff.max())
        # float32 CPU sampling; different thread counts may reorder sums, so allow a few levels of rounding
        assert diff.max() <= 3


def test_shaded_world_paints_each_shape_in_one_unnamed_shade_with_exact_masks():
    shaded = SceneConfig(**WORLDS["shaded"])
    low, high = shaded.shade
    factors, areas = [], []
    for seed in range(40):
        scene = make_scene(seed, shaded)
        for colour, kind in scene.shapes:
            pixels = scene.image[scene.masks[kind]]  # every pixel of a shape has one value, its colour times a factor
            assert (pixels == pixels[0]).all()
            factor = pixels[0].astype(float) / np.array(COLOURS[colour])
            assert np.ptp(factor) < 0.02 and low - 0.01 <= factor.mean() <= high + 0.01
            factors.append(factor.mean())
            areas.append(scene.masks[kind].mean())
            assert not (scene.masks[kind] & scene.masks["background"]).any()
            assert "shade" not in scene.caption and kind in scene.caption
    assert np.ptp(factors) > 0.3  # the shades really vary
    simple = [make_scene(s, SceneConfig(**WORLDS["simple"])) for s in range(40)]
    simple_areas = [s.masks[k].mean() for s in simple for _, k in s.shapes]
    assert np.mean(areas) > 1.3 * np.mean(simple_areas)  # radius 0.20-0.30 against 0.16-0.26
    # a world without shades draws the same scenes as before shades existed: shades have their own generator
    plain = replace(shaded, shade=(1.0, 1.0))
    for seed in range(5):
        scene = make_scene(seed, plain)
        for colour, kind in scene.shapes:
            assert (scene.image[scene.masks[kind]] == np.array(COLOURS[colour], dtype=np.uint8)).all()
        assert np.array_equal(make_scene(seed, shaded).masks["background"], scene.masks["background"])
    with pytest.raises(ValueError, match="shade must be a range"):
        SceneConfig(shade=(1.2, 0.8))


def test_auroc_equals_scikit_learn():
    from sklearn.metrics import roc_auc_score

    from shapes.measures import auroc

    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        labels = torch.rand(64, generator=generator) < 0.3
        scores = torch.randint(0, 6, (3, 64), generator=generator).float()  # ties on purpose
        ours = auroc(scores, labels)
        for k in range(3):
            assert ours[k].item() == pytest.approx(roc_auc_score(labels.numpy(), scores[k].numpy()), abs=1e-6)


def test_routing_diagnostics_known_values():
    from mmdit import ConceptSaliency
    from shapes.measures import CONCEPTS, routing_diagnostics

    scenes = [make_scene(s) for s in held_out_seeds(8)]
    B, C, H, h = len(scenes), len(CONCEPTS), 2, 8
    words = [list(CONCEPTS)] * B
    generator = torch.Generator().manual_seed(0)
    # the same logits for every scene: all of their variance is the shared positional pattern, share 1
    fixed = torch.randn(1, H, C, h * h, generator=generator).expand(B, -1, -1, -1)
    output = torch.randn(B, C, C, h * h, generator=generator)
    sal = {0: ConceptSaliency(attention=0.8 * fixed.softmax(-1), output=output[:, 0])}
    result = routing_diagnostics(sal, scenes, h, h, CONCEPTS, words)
    assert result["routing/positional/b0"] == pytest.approx(1.0, abs=1e-5)
    assert abs(result["routing/word_corr/b0"]) < 0.1  # independent random maps per word
    shared = output[:, :1].expand(-1, C, -1, -1)[:, :, 0] * torch.arange(1.0, C + 1)[None, :, None] + 3.0
    sal = {0: ConceptSaliency(attention=0.8 * fixed.softmax(-1), output=shared)}  # one map, scaled and shifted per word
    assert routing_diagnostics(sal, scenes, h, h, CONCEPTS, words)["routing/word_corr/b0"] == pytest.approx(1.0)
    # logits that are each scene's own masks: nothing shared beyond the masks' overlap, and AUROC 1 on every head
    logits = torch.full((B, H, C, h * h), -4.0)
    for b, scene in enumerate(scenes):
        for c, word in enumerate(CONCEPTS):
            if word in scene.masks and word != "background":
                mask = torch.from_numpy(scene.masks[word]).float()
                area = mask.reshape(h, mask.shape[0] // h, h, mask.shape[1] // h).mean((1, 3)).flatten()
                logits[b, :, c] += 8 * area
    sal = {3: ConceptSaliency(attention=logits.softmax(-1), output=logits[:, 0])}
    result = routing_diagnostics(sal, scenes, h, h, CONCEPTS, words)
    assert result["routing/auroc/b3"] == pytest.approx(1.0) and result["routing/auroc/max"] == pytest.approx(1.0)
    assert result["routing/auroc/b3/h1"] == pytest.approx(1.0)
    assert result["routing/lift/b3"] > 3
    # and their negation ranks every shape token last
    sal = {3: ConceptSaliency(attention=(-logits).softmax(-1), output=logits[:, 0])}
    assert routing_diagnostics(sal, scenes, h, h, CONCEPTS, words)["routing/auroc/b3"] == pytest.approx(0.0)


def test_isolation_share_anneals_linearly_to_zero():
    from shapes.train import Recipe, isolate_share

    constant = Recipe(isolate=0.5)
    assert [isolate_share(constant, s) for s in (0, 1000, 1999)] == [0.5, 0.5, 0.5]
    annealed = Recipe(isolate=1.0, isolate_anneal=0.6, steps=1000)
    assert [isolate_share(annealed, s) for s in (0, 300, 600, 900)] == pytest.approx([1.0, 0.5, 0.0, 0.0])


TINY = dict(
    size=32, scenes=32, ae_steps=10, ae_batch=4, ae_size=16, ae_full_steps=2, hidden=32, heads=2, depth=1, single=1,
    t5_dim=32, batch=8, lr=3e-3, warmup=5, eval_scenes=8,
)  # fmt: skip


def test_budget_stops_a_run_and_resume_continues_it_exactly(tmp_path):
    from safetensors.torch import load_file

    from shapes.train import Recipe, train

    recipe = Recipe(world="shaded", t5_layers=0, isolate=1.0, isolate_anneal=0.5, steps=40, eval_every=1000, **TINY)
    train(recipe, tmp_path / "whole", "cpu", seed=0)
    # the same run stopped by a tiny wall-clock budget, then resumed from its checkpoint
    train(recipe, tmp_path / "cut", "cpu", seed=0, reuse=tmp_path / "whole", minutes=0.003)
    records = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    stopped = records[-1]["step"]
    assert 0 < stopped < 40, "the budget stops the run early"
    assert (tmp_path / "cut" / "checkpoint" / "state.pt").is_file()
    assert (tmp_path / "cut" / "steps" / f"{stopped:06d}" / "flux.safetensors").is_file()  # evaluated when stopped
    train(recipe, tmp_path / "cut", "cpu", seed=0, reuse=tmp_path / "whole", resume=True)
    records = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "resume" and r["step"] == stopped for r in records)
    whole = load_file(tmp_path / "whole" / "flux.safetensors")
    cut = load_file(tmp_path / "cut" / "flux.safetensors")
    worst = max((whole[k] - cut[k]).abs().max().item() for k in whole)
    print("stopped at step", stopped, "; max abs difference after resuming", worst)
    assert worst == 0.0  # optimizer, random streams and schedule all continue where they were


def test_light_checkpoints_are_small_and_resume_with_a_fresh_optimizer(tmp_path):
    from safetensors.torch import load_file

    from shapes.train import REWARM, Recipe, train

    recipe = Recipe(world="shaded", t5_layers=0, steps=30, eval_every=1000, light_checkpoints=True,
                    eval_split="validation", **TINY)  # fmt: skip
    train(recipe, tmp_path / "whole", "cpu", seed=0)
    train(recipe, tmp_path / "cut", "cpu", seed=0, reuse=tmp_path / "whole", minutes=0.003)
    checkpoint = tmp_path / "cut" / "checkpoint"
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    assert "optimizer" not in state and 0 < state["step"] < 30  # weights only: small enough to commit
    assert all(v.dtype == torch.bfloat16 for v in load_file(checkpoint / "flux.safetensors").values())
    stopped = state["step"]
    assert all(v.dtype == torch.bfloat16 for v in load_file(tmp_path / "cut" / "steps" / f"{stopped:06d}" /
                                                              "flux.safetensors").values())  # fmt: skip
    train(recipe, tmp_path / "cut", "cpu", seed=0, reuse=tmp_path / "whole", resume=True)
    records = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r["stage"] == "resume"]
    assert resumed[-1]["step"] == stopped and resumed[-1]["session"] == 2
    assert resumed[-1]["optimizer"] == f"restarted, {REWARM} warm-up steps"
    assert records[-1]["stage"] == "done" and records[-1]["step"] == 30
    ae_config = json.loads((tmp_path / "cut" / "ae_config.json").read_text())
    assert ae_config["resolution"] == recipe.size  # a whole model folder at the recipe's size
    from shapes.eval import load

    for weights in (tmp_path / "cut" / "steps" / f"{stopped:06d}", checkpoint):  # the run's autoencoder and tokenizer
        flux, _, tok, ae, _ = load(weights)
        assert flux.config.depth == recipe.depth and ae.config.resolution == recipe.size and tok.vocab_size > 0


def test_batch_probe_times_steps_with_the_given_clock_and_picks_the_largest_cheap_batch():
    from shapes.train import Recipe, choose_batch, scaled_for_batch, seconds_per_step

    # a fake device: launch-bound up to 1024 samples (10 ms a step), then time grows with the batch
    cost = {256: 0.010, 1024: 0.013, 4096: 0.040}
    clock = [0.0]
    timings = {}
    for batch in cost:
        timings[batch] = seconds_per_step(
            lambda b=batch: clock.__setitem__(0, clock[0] + cost[b]), 5.0, lambda: clock[0]
        )
    assert timings == pytest.approx(cost)
    assert choose_batch(timings) == 1024  # 4096 takes 4x the smallest batch's step, 1024 only 1.3x
    assert choose_batch({256: 0.01, 1024: 0.012, 4096: 0.0149}) == 4096
    assert choose_batch({256: 0.01, 1024: 0.016}) == 256
    recipe = scaled_for_batch(Recipe(batch=32, lr=8e-4, steps=3000), 1024, 0.013, minutes=7.0)
    assert recipe.batch == 1024 and recipe.lr == pytest.approx(8e-4 * math.sqrt(32))
    assert recipe.steps == int(0.85 * 7 * 60 / 0.013)  # 85 % of the budget in steps
    assert scaled_for_batch(Recipe(steps=3000), 64, 0.1, minutes=None).steps == 3000


def test_bank_pairs_each_scene_with_its_own_captions(tmp_path):
    from shapes.autoencoding import train_tokenizer
    from shapes.bank import CaptionOptions, build, draw

    tok = train_tokenizer(tmp_path / "tok", 0)
    config = SceneConfig(size=32, **WORLDS["simple"])
    options = CaptionOptions(background_phrase=0.5, single_word=0.5, colourless=0.0, positions=1.0)
    seeds = list(range(10))
    # two worker processes draw exactly what this process draws
    here = list(draw(seeds, config, options, 4, workers=0, chunk=3))
    pooled = list(draw(seeds, config, options, 4, workers=2, chunk=3))
    for (a, ca), (b, cb) in zip(here, pooled, strict=True):
        assert np.array_equal(a, b) and ca == cb
    latents = torch.randn(10, 16, 4, 4)
    data = build(None, tok, seeds, config, options, 32, 4, "cpu", latents=latents, progress=False)
    assert data.tokens.shape == (10, 4, 32) and torch.equal(data.latents, latents)
    captions = [c for _, chunk in here for c in chunk]
    for i, seed in enumerate(seeds):
        scene = make_scene(seed, config)
        for k in range(4):
            assert torch.equal(data.tokens[i, k], tok([captions[i][k]], 32)[0])
            assert all(kind in captions[i][k] for _, kind in scene.shapes)  # every caption names the scene's shapes
    z, tokens = data.batch(64, torch.Generator().manual_seed(0))
    for row, ids in zip(z, tokens, strict=True):  # every (latent, caption) pair of a batch belongs to one scene
        i = next(j for j in range(10) if torch.equal(latents[j], row))
        assert any(torch.equal(ids, data.tokens[i, k]) for k in range(4))


def test_arms_share_one_bank_and_each_run_stops_on_its_budget(tmp_path):
    import subprocess
    import sys

    small = {k: v for k, v in TINY.items() if k not in ("batch", "lr", "warmup")}
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in small.items())
    flags = f"--world shaded --t5-layers 0 --steps 100000 {flags}"
    command = [sys.executable, "-m", "shapes.arms", "--out", str(tmp_path / "arms"), "--device", "cpu", "--minutes",
               "0.02", "--common", flags, "--pack", str(tmp_path / "packed"), "--arm", "A", "--isolate 0.5",
               "--arm", "C", "--isolate 1.0 --eval-isolated true"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "arms" / "ae" / "ae.safetensors").is_file()  # trained once, before the arms
    bank = torch.load(tmp_path / "arms" / "bank.pt")
    print("bank latents: mean", bank["latents"].mean().item(), "std", bank["latents"].std().item())
    assert abs(bank["latents"].mean().item()) < 1e-4 and abs(bank["latents"].std().item() - 1) < 1e-4
    for arm, isolate in (("A", 0.5), ("C", 1.0)):
        folder = tmp_path / "arms" / arm
        records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        assert records[0]["isolate"] == isolate
        assert 0 < records[-1]["step"] < 100000  # stopped by the budget, evaluated and saved
        assert (folder / "flux.safetensors").is_file() and (folder / "checkpoint" / "state.pt").is_file()
        assert (folder / "ae.safetensors").read_bytes() == (tmp_path / "arms" / "ae" / "ae.safetensors").read_bytes()
    assert "| A |" in (tmp_path / "arms" / "summary.md").read_text()
    # the packed copies are whole model folders: unpacked, they load strictly and hold the run's log
    import tarfile

    from shapes.eval import load

    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == ["A.tar", "C.tar", "summary.md"]
    with tarfile.open(tmp_path / "packed" / "C.tar") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    flux, *_ = load(tmp_path / "unpacked" / "C")
    assert (tmp_path / "unpacked" / "C" / "log.jsonl").read_text() == (
        tmp_path / "arms" / "C" / "log.jsonl"
    ).read_text()
    # arms that would need different banks are refused before anything is drawn
    bad = command[:]
    bad[bad.index("--isolate 0.5")] = "--isolate 0.5 --scenes 8"
    done = subprocess.run(bad, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "must agree on the bank" in done.stderr


def test_placement_and_presence_scores_known_values():
    from shapes.placement import cell_of, placement_score

    config = SceneConfig(**WORLDS["shaded"])
    scenes = [make_scene(s, config) for s in held_out_seeds(30)]
    own = np.stack([s.image for s in scenes])
    # a scene's own image: every named shape is present, and nearly all fill a quarter of their centroid's cell
    assert placement_score(own, scenes, config.colours, places=False) == 1.0
    assert placement_score(own, scenes, config.colours) > 0.85
    # blank images place and show nothing; another scene's image places little
    blank = np.full_like(own, 25)
    assert placement_score(blank, scenes, config.colours) == 0.0
    assert placement_score(blank, scenes, config.colours, places=False) == 0.0
    assert placement_score(np.roll(own, 1, axis=0), scenes, config.colours) < 0.5
    # one red square painted exactly over the top-left cell
    painted = np.full((1, 96, 96, 3), 25, dtype=np.uint8)
    painted[0, :32, :32] = (0.7 * np.array(COLOURS["red"])).astype(np.uint8)  # a dark shade still counts as red
    scene = make_scene(0, config)
    scene.shapes, scene.places = [("red", "square"), ("blue", "circle")], ["top left", "bottom"]
    assert placement_score(painted, [scene], config.colours) == 0.5  # red placed, blue nowhere
    assert [cell_of(p) for p in ("top left", "middle", "right", "bottom")] == [(0, 0), (1, 1), (1, 2), (2, 1)]


# ---- issue 24: one-line errors before any training, and a finished run is never trained over ------------------------
ROOT = Path(__file__).resolve().parents[1]


def shapes_command(module: str, *argv, timeout: int = 120):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip
    return done.returncode, done.stderr


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"steps": 0}, "steps"), ({"steps": -5}, "steps"), ({"batch": 0}, "batch"), ({"eval_every": 0}, "eval_every"),
        ({"lr": math.nan}, "lr = nan"), ({"hidden": "128"}, "hidden = '128'"), ({"bf16": 1}, "bf16 = 1"),
        ({"t5_dim": 40}, "t5_dim"), ({"scenes": 0}, "scenes"), ({"warmup": -1}, "warmup"),
    ],
)  # fmt: skip
def test_recipe_refuses_what_would_train_nothing_or_never_stop(fields, message):
    from shapes.recipe import Recipe

    with pytest.raises(ValueError, match=message):
        Recipe(**fields)


def test_train_refuses_a_finished_run_without_resume_or_force(tmp_path):
    from shapes.train import Recipe, train

    run = tmp_path / "run"
    run.mkdir()
    for name, text in (("run.json", '{"seed": 0, "ae": null}'), ("log.jsonl", "{}\n"), ("flux.safetensors", "w")):
        (run / name).write_text(text)
    tiny = {**TINY, "steps": 2, "eval_every": 2}  # (today's code trains at once: let that be quick)
    with pytest.raises(ValueError, match="holds a training run"):
        train(Recipe(**tiny), run, "cpu", seed=0)
    flags = [x for k, v in tiny.items() for x in (f"--{k.replace('_', '-')}", v)]
    code, err = shapes_command("shapes.train", "--out", run, *flags)
    assert code == 2 and err.startswith("error: ") and "--resume" in err and "--force" in err
    assert err.count("\n") == 1
    assert (run / "log.jsonl").read_text() == "{}\n" and (run / "flux.safetensors").read_text() == "w"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--minutes", "0"], "--minutes = 0.0"),
        (["--steps", "0"], "steps"),
        (["--eval-every", "0"], "eval_every"),
        (["--device", "nodevice"], "nodevice"),
        (["--resume", "{damaged}"], "damaged"),
    ],
)
def test_train_command_errors_are_one_line_and_come_first(tmp_path, argv, message):
    damaged = tmp_path / "damaged"
    (damaged / "checkpoint").mkdir(parents=True)
    (damaged / "checkpoint" / "recipe.json").write_text("{broken")
    (damaged / "checkpoint" / "state.pt").write_text("x")
    (damaged / "run.json").write_text("{}")
    argv = [a.replace("{damaged}", str(damaged)) for a in argv]
    out = [] if "--resume" in argv else ["--out", tmp_path / "new"]
    code, err = shapes_command("shapes.train", *out, *argv)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()


def test_a_damaged_checkpoint_is_a_one_line_error(tmp_path):
    from shapes.checkpoint import load_checkpoint

    (tmp_path / "state.pt").write_text("not a checkpoint")
    (tmp_path / "flux.safetensors").write_text("not safetensors")
    flux = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="is damaged") as err:
        load_checkpoint(tmp_path, flux, flux, torch.optim.SGD(flux.parameters(), 0.1), torch.Generator(), "cpu")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--t", "2"], "--t = 2.0"),
        (["--t", "0.5", "-0.5"], "--t = -0.5"),
        (["--t", "nan"], "--t = nan"),
        (["--scenes", "0"], "--scenes = 0"),
        (["--scenes", str(10**20)], "--scenes = 100000000000000000000"),
        (["--samples", "{missing}"], "name a picture file"),
        (["--weights", "{missing}"], "is missing"),
        (["--weights", "{damaged}"], "t5.safetensors is damaged"),
    ],
)
def test_eval_command_errors_are_one_line(tmp_path, argv, message):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in WEIGHTS.iterdir():
        if f.is_file():
            (damaged / f.name).write_bytes(f.read_bytes())
    (damaged / "t5.safetensors").write_text("garbage")
    argv = [a.replace("{missing}", str(tmp_path / "missing")).replace("{damaged}", str(damaged)) for a in argv]
    weights = [] if "--weights" in argv else ["--weights", WEIGHTS]
    code, err = shapes_command("shapes.eval", *weights, *argv)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


# ---- the model's own concept layers (recipe.json "layers", chosen on validation scenes) --------------------------
def model_copy(folder: Path, **changes) -> Path:
    """A copy of the built-in model whose recipe.json has `changes` (a value None removes the key)."""
    import shutil

    from concept_attention import BUILTIN_MODEL

    shutil.copytree(BUILTIN_MODEL, folder)
    recipe = json.loads((folder / "recipe.json").read_text())
    recipe.update(changes)
    recipe = {k: v for k, v in recipe.items() if v is not None}
    (folder / "recipe.json").write_text(json.dumps(recipe))
    return folder


def test_validation_and_test_scenes_never_meet():
    from shapes.scenes import SPLIT_SIZE, VALIDATION_SEED_START, validation_seeds

    last_test = held_out_seeds(1, start=SPLIT_SIZE - 1)[0]
    assert last_test < VALIDATION_SEED_START == validation_seeds(1)[0]
    assert set(held_out_seeds(1000)).isdisjoint(validation_seeds(1000))
    assert max(training_seeds(torch.Generator().manual_seed(0), 1000)) < HELD_OUT_SEED_START
    for split in (held_out_seeds, validation_seeds):
        with pytest.raises(ValueError, match="a split holds"):
            split(2, start=SPLIT_SIZE - 1)  # a test range can never run into the validation range


def test_choose_layers_uses_validation_scenes_only_and_writes_the_recipe(tmp_path, monkeypatch):
    from shapes import eval as alignment

    folder = model_copy(tmp_path / "model", layers=None, layers_chosen=None)

    def no_test_scenes(*args, **kwargs):
        raise AssertionError("choose_layers drew a TEST scene")

    monkeypatch.setattr(alignment, "held_out_seeds", no_test_scenes)
    choice = alignment.choose_layers(folder, scenes=50)
    alignment.write_layers(folder, choice)
    recipe = json.loads((folder / "recipe.json").read_text())
    how = recipe["layers_chosen"]
    assert recipe["layers"] == choice["layers"] and "validation" in how["split"] and how["scenes"] == 50
    candidates = alignment.layer_sets(4)
    assert list(candidates) == ["all", "deeper half", "block 0", "block 1", "block 2", "block 3"]
    assert candidates["deeper half"] == (2, 3)
    best = max(how["scores"].values())
    assert how["scores"][f"{how['chosen']} {recipe['layers']}"] == best
    assert recipe["world"] == "shaded" and recipe["sample_steps"] == 50  # the rest of the recipe unchanged


def test_a_recipes_layers_are_the_default_and_recorded_and_given_layers_win(tmp_path):
    from PIL import Image

    from concept_attention import ConceptAttentionPipeline, Settings, main

    folder = model_copy(tmp_path / "model", layers=[2, 3])
    scene = make_scene(held_out_seeds(1, start=3)[0], SceneConfig(size=128, **WORLDS["shaded"]))
    image = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(image)
    concepts = ["circle", "square", "triangle", "background"]
    pipe = ConceptAttentionPipeline.from_pretrained(folder)
    assert pipe.default_layers == (2, 3)
    own = pipe.explain(image, concepts, progress=False)
    given = pipe.explain(image, concepts, settings=Settings(layers=(2, 3)), progress=False)
    every = pipe.explain(image, concepts, settings=Settings(layers=(0, 1, 2, 3)), progress=False)
    kept = pipe.explain(image, concepts, keep_grid=True, progress=False)
    assert torch.equal(own.maps, given.maps) and not torch.allclose(own.maps, every.maps)
    assert torch.allclose(kept.maps, own.maps, atol=1e-6)  # the kept grid has every block; the maps are still (2, 3)
    assert kept.layers == (0, 1, 2, 3)
    assert own.record["layers_used"] == [2, 3] and own.record["layers_from"] == "recipe.json"
    assert given.record["layers_from"] == "given" and every.record["layers_used"] == [0, 1, 2, 3]
    plain = ConceptAttentionPipeline.from_pretrained(model_copy(tmp_path / "plain", layers=None))
    assert plain.default_layers is None
    result = plain.explain(image, concepts, progress=False)
    assert torch.allclose(result.maps, every.maps, atol=1e-6) and result.record["layers_from"] == "every block"
    # the command line: settings.json says which layers were averaged and where they came from; --layers wins
    for extra, used, source in (([], [2, 3], "recipe.json"), (["--layers", "1"], [1], "given")):
        out = tmp_path / f"out{len(extra)}"
        argv = ["explain", "--model", str(folder), "--image", str(image), "--concepts", *concepts, "--out", str(out)]
        assert main(argv + extra) == 0
        settings = json.loads((out / "settings.json").read_text())
        assert settings["layers_used"] == used and settings["layers_from"] == source
        assert settings["settings"]["layers"] == used


@pytest.mark.parametrize("layers", ["2", [], [1, 1], [True], [-1]])
def test_a_damaged_recipe_layers_is_named(tmp_path, layers):
    from checks import model_recipe

    folder = model_copy(tmp_path / "model", layers=layers)
    with pytest.raises(ValueError, match="layers = .*expected a list of distinct double-block indices"):
        model_recipe(folder)


def test_recipe_layers_beyond_the_model_are_named(tmp_path):
    from concept_attention import ConceptAttentionPipeline

    pipe = ConceptAttentionPipeline.from_pretrained(model_copy(tmp_path / "model", layers=[7]))
    scene = make_scene(held_out_seeds(1)[0], SceneConfig(size=128, **WORLDS["shaded"]))
    with pytest.raises(ValueError, match="recipe.json: layers \\[7\\], but this model has 4 double blocks"):
        pipe.explain(torch.from_numpy(scene.image).permute(2, 0, 1) / 255, ["circle", "background"], progress=False)
