"""The official SD3 recipe (`--preset official` on SD3.5, `PRESETS["official-sd3"]`): its options leave the image
bitwise unchanged, the second attention's image vectors equal diffusers' own attention module run over
[image; concepts], the CLIP-joined concepts equal diffusers' prompt encoding of the joined text, Flux refuses the
options; and, when CONCEPT_ATTENTION_OFFICIAL names a folder holding the official source
(`git -C <mirror of helblazer811/ConceptAttention> archive HEAD | tar -x -C DIR`), our maps equal the official code's
`generate_image` (without and with guidance) and `encode_image` on the same tiny weights. Tiny random models only.

Run: `CONCEPT_ATTENTION_OFFICIAL=/tmp/official .venv/bin/python -m pytest tests/test_sd3_official.py -s`
"""

import dataclasses
import logging
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_sd3 import inputs, random_sd3, reference
from test_sd3_pipeline import snapshot  # noqa: F401  (a fixture: a tiny diffusers SD3 snapshot)

import sd3
from checks import InputWarning
from concept_attention import ConceptAttentionPipeline, ConceptPipeline
from saliency import PRESETS, MapCollector, Settings, check_family, family_settings, for_family
from sd3.model import SD3ConceptInput
from sd3.pipeline import OFFICIAL_T

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

OFFICIAL = os.environ.get("CONCEPT_ATTENTION_OFFICIAL")
RTOL = 1e-5  # relative to the largest official value
T5_LENGTH = 256  # the official pipeline's max_sequence_length


@pytest.mark.parametrize("name", ["tiny", "tiny-medium"])
def test_official_options_leave_the_image_and_match_diffusers_attention(name):
    """The velocity is bitwise that without concepts; per block, o_x (image_vectors="concepts") equals the image rows,
    before `to_out`, of diffusers' Attention module of the same block called with the image as hidden states and the
    concepts as encoder hidden states, and o_c equals its concept rows before `to_add_out` (Medium: `attn2` unused)."""
    config = sd3.CONFIGS[name]
    model = random_sd3(name)
    x, t, context, y = inputs(config)
    tokens = torch.randn(1, 4, config.joint_attention_dim, generator=torch.Generator().manual_seed(9)).expand(2, -1, -1)
    seen = []
    with torch.no_grad():
        plain = model(x, t, context, y)
        hooks = [b.register_forward_hook(lambda m, a, o: seen.append((a[0], a[3]))) for b in model.joint_blocks]
        concepts = SD3ConceptInput(tokens, image_vectors="concepts", vectors=True)
        out = model(x, t, context, y, concepts=concepts)
        prompt_side = model(x, t, context, y, concepts=SD3ConceptInput(tokens, vectors=True))
    for hook in hooks:
        hook.remove()
    assert torch.equal(out.velocity, plain), "the official options changed the image"
    assert torch.equal(prompt_side.velocity, plain)

    ref = reference(config)
    ref.load_state_dict(single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(
        {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    ))  # fmt: skip
    with torch.no_grad():
        temb = ref.time_text_embed(t * 1000, y)
        for i, block in enumerate(ref.transformer_blocks):
            image, cpt = seen[i]
            nx = block.norm1(image, emb=temb)[0]
            if block.context_pre_only:  # the last block: AdaLayerNormContinuous
                nc = block.norm1_context(cpt, temb)
            else:
                nc = block.norm1_context(cpt, emb=temb)[0]
            attn = block.attn
            to_out, to_add_out = attn.to_out[0], getattr(attn, "to_add_out", None)
            attn.to_out[0] = torch.nn.Identity()  # the rows before the output projections
            if to_add_out is not None:
                attn.to_add_out = torch.nn.Identity()
            try:
                result = attn(hidden_states=nx, encoder_hidden_states=nc)
            finally:
                attn.to_out[0] = to_out
                if to_add_out is not None:
                    attn.to_add_out = to_add_out
            o_x, o_c = result if isinstance(result, tuple) else (result[:, : nx.shape[1]], result[:, nx.shape[1] :])
            s = out.saliency[i]
            for ours, theirs, what in ((s.image_vectors, o_x, "image"), (s.concept_vectors, o_c, "concept")):
                err = (ours - theirs).abs().max().item() / theirs.abs().max().item()
                assert err < 1e-5, f"{name} block {i}: {what} vectors differ from diffusers' attention by {err:.2e}"
            dot = torch.einsum("bcd,bnd->bcn", s.concept_vectors, s.image_vectors)
            assert torch.allclose(s.output, dot)  # the output space is o_c . o_x of the second attention
            # the prompt-side image vectors are another thing (the real attention's rows)
            assert not torch.allclose(prompt_side.saliency[i].image_vectors, s.image_vectors, atol=1e-3)


def test_settings_presets_and_family_checks():
    official = PRESETS["official-sd3"]
    assert (official.concept_encoder, official.image_vectors, official.reduce, official.guided_half) == (
        "clip-joined", "concepts", "vectors", "unconditional")  # fmt: skip
    assert official.layers is None and official.steps is None and official.softmax
    assert for_family(PRESETS["official"], "sd3") is official
    assert for_family(PRESETS["official"], "flux") is PRESETS["official"]
    assert for_family(Settings(layers=(1,)), "sd3") == Settings(layers=(1,))
    d = Settings()  # the paper-faithful default is unchanged
    assert (d.concept_encoder, d.image_vectors, d.reduce, d.guided_half) == ("t5", "prompt", "maps", "conditional")
    for name in set(PRESETS) - {"official-cogvideox"}:  # CogVideoX's own: tests/test_cogvideox_official.py
        check_family(PRESETS[name], "sd3")
        if name != "official-sd3":
            check_family(PRESETS[name], "flux")  # Flux's presets keep working
    with pytest.raises(ValueError, match="SD3.5 only"):
        check_family(official, "flux")
    assert family_settings(PRESETS["official"], "sd3") is official
    with pytest.raises(ValueError, match="SD3.5 only"):
        family_settings(dataclasses.replace(PRESETS["official"], reduce="vectors"), "flux")
    with pytest.raises(ValueError, match="choose one of"):
        Settings(concept_encoder="clip")
    with pytest.raises(ValueError, match="space='output'"):
        Settings(reduce="vectors", space="value")
    with pytest.raises(ValueError, match="grid"):
        MapCollector(official, (0,), torch.arange(2), 2, keep_grid=True)


def test_vector_reduction_by_hand():
    """Vectors averaged over steps, BOS dropped, concepts L2-normalised, dot, softmax over concepts, layer mean."""
    gen = torch.Generator().manual_seed(0)
    steps = [[(torch.randn(1, 4, 6, generator=gen), torch.randn(1, 5, 6, generator=gen)) for _ in range(2)]
             for _ in range(3)]  # fmt: skip
    collector = MapCollector(PRESETS["official-sd3"], (0, 1), torch.tensor([-1, 0, 1, 2]), 3, keep_grid=False)
    for step in steps:
        collector.add({i: types.SimpleNamespace(concept_vectors=c, image_vectors=x) for i, (c, x) in enumerate(step)})
    maps = []
    for layer in range(2):
        c = torch.stack([s[layer][0][0] for s in steps]).mean(0)[1:]
        x = torch.stack([s[layer][1][0] for s in steps]).mean(0)
        c = c / (c.norm(dim=-1, keepdim=True) + 1e-8)
        maps.append((c @ x.T).softmax(0))
    assert torch.allclose(collector.total / collector.count, torch.stack(maps).mean(0), atol=1e-6)


@pytest.fixture(scope="module")
def official_ours(snapshot):  # noqa: F811
    pipe = ConceptAttentionPipeline.from_pretrained(snapshot[0], device="cpu", dtype=torch.float32)
    pipe.max_length = pipe.text.max_length = T5_LENGTH
    return pipe


def test_clip_joined_concepts_equal_diffusers_prompt_encoding(snapshot, official_ours):  # noqa: F811
    """Rows 0..C of the joined text's CLIP part, as diffusers' encode_prompt makes it (and `clip_tokens`)."""
    concepts = ["cat", "grass", "sky"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        tokens, owner = official_ours.encode_concepts_clip_joined(concepts)
    joined = " ".join(concepts)
    assert torch.equal(tokens, official_ours.text.clip_tokens(joined)[:, :4])
    with torch.no_grad():
        theirs = snapshot[1].encode_prompt(joined, joined, joined, do_classifier_free_guidance=False,
                                           max_sequence_length=T5_LENGTH)[0][:, :4]  # fmt: skip
    assert (tokens - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    assert owner.tolist() == [-1, 0, 1, 2]
    with pytest.warns(InputWarning, match="not one CLIP token"):
        official_ours.encode_concepts_clip_joined(["cat", "a b c d"])


def test_official_preset_runs_on_sd3_and_is_refused_by_flux(official_ours):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        result = official_ours.generate("a cat", ["cat", "sky"], 32, 48, 2, settings=PRESETS["official"],
                                        guidance=2.0, progress=False)  # fmt: skip
    assert result.settings == PRESETS["official-sd3"]  # "official" read as SD3's own
    assert result.maps.shape == (2, 2, 3) and torch.allclose(result.maps.sum(0), torch.ones(2, 3))
    flux = object.__new__(ConceptPipeline)
    flux.family = "flux"
    with pytest.raises(ValueError, match="SD3.5 only"):  # refused before anything runs
        ConceptPipeline.generate(flux, "a cat", ["cat"], 32, 32, 1, settings=PRESETS["official-sd3"], guidance=0.0)


# ---- the official code, from its source ------------------------------------------------------------------------
def import_official(root: str):
    """The official sd3 modules, bypassing the package's __init__ (it imports the Flux stack)."""
    package = Path(root) / "concept_attention"
    if not (package / "sd3").is_dir():
        pytest.fail(f"CONCEPT_ATTENTION_OFFICIAL={root}: no concept_attention/sd3/ there")
    saved = sys.modules.get("concept_attention")
    module = types.ModuleType("concept_attention")
    module.__path__ = [str(package)]
    sys.modules["concept_attention"] = module  # our own `concept_attention` is restored below
    try:
        from concept_attention.sd3 import concept_attention_pipeline, dit_block, pipeline
    finally:
        if saved is not None:
            sys.modules["concept_attention"] = saved
    return dit_block, pipeline, concept_attention_pipeline


@pytest.fixture(scope="module")
def official(snapshot):  # noqa: F811
    if not OFFICIAL:
        pytest.skip("set CONCEPT_ATTENTION_OFFICIAL to the extracted official source to compare with it")
    dit_block, pipeline, cap = import_official(OFFICIAL)
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # "cross_attention_kwargs ... ignored", every call
    reference = snapshot[1]
    transformer = dit_block.CustomSD3Transformer2DModel.from_config(reference.transformer.config).eval()
    transformer.load_state_dict(reference.transformer.state_dict(), strict=True)
    components = {k: v for k, v in reference.components.items() if k not in ("transformer", "image_encoder",
                                                                             "feature_extractor")}  # fmt: skip
    pipe = pipeline.CustomStableDiffusion3Pipeline(transformer=transformer, **components)
    pipe.set_progress_bar_config(disable=True)
    runner = object.__new__(cap.ConceptAttentionSD3Pipeline)  # its __init__ loads from the hub
    runner.model_name, runner.device, runner.dtype, runner.transformer, runner.pipe = (
        "tiny", "cpu", torch.float32, transformer, pipe)  # fmt: skip
    return runner, cap


def compare(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    err = (ours - theirs).abs().max().item()
    scale, spread = theirs.abs().max().item(), (theirs.amax() - theirs.amin()).item()
    print(f"{what}: max |ours - official| = {err:.3e} (official maps: max {scale:.3f}, max - min {spread:.3f})")
    assert ours.shape == theirs.shape and err <= RTOL * scale, f"{what}: {err:.3e}"


def differs(pipe, run, theirs: torch.Tensor, **change) -> None:
    """A negative control: one official option changed, the maps are clearly not the official ones."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        other = run(dataclasses.replace(PRESETS["official-sd3"], **change)).maps
    err = (other - theirs).abs().max().item()
    print(f"  control {change}: max |other - official| = {err:.3e}")
    assert err > 1000 * RTOL * theirs.abs().max().item()


CONCEPTS = ["cat", "grass", "sky", "tree"]
PROMPT = "a cat on the grass under the sky"


@pytest.mark.parametrize("guidance", [0.0, 2.0], ids=["turbo", "cfg"])
def test_generate_equals_official(official, official_ours, guidance):
    runner, _ = official
    height, width, seed = 64, 48, 3
    with torch.no_grad():
        theirs = runner.generate_image(PROMPT, CONCEPTS, height, width, num_inference_steps=4,
                                       guidance_scale=guidance, seed=seed, return_pil_heatmaps=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        ours = official_ours.generate(PROMPT, CONCEPTS, height, width, 4, seed=seed, settings=PRESETS["official"],
                                      guidance=guidance, progress=False)  # fmt: skip
    compare(ours.maps, theirs.concept_heatmaps.float(), f"generate (guidance {guidance})")
    if guidance > 1:

        def run(settings):
            return official_ours.generate(PROMPT, CONCEPTS, height, width, 4, seed=seed, settings=settings,
                                          guidance=guidance, progress=False)  # fmt: skip

        differs(official_ours, run, theirs.concept_heatmaps, guided_half="conditional")
        differs(official_ours, run, theirs.concept_heatmaps, reduce="maps")
    pixels = np.abs(np.asarray(ours.image, dtype=np.int32) - np.asarray(theirs.image, dtype=np.int32)).max()
    assert pixels <= 1, f"the images differ by {pixels}"


def test_explain_equals_official_encode_image(official, official_ours, monkeypatch):
    """The official encode_image draws the posterior sample with the global RNG (unseeded): it is recorded and fed to
    ours as the encoded image; the noise (seeded) and everything else are each side's own."""
    runner, cap = official
    height, width, seed = 48, 64, 5
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    recorded = {}
    retrieve = cap.retrieve_latents

    def recording(encoder_output, generator=None, sample_mode="sample"):
        recorded["sample"] = retrieve(encoder_output, generator, sample_mode)
        return recorded["sample"]

    monkeypatch.setattr(cap, "retrieve_latents", recording)
    torch.manual_seed(0)
    with torch.no_grad():
        theirs = runner.encode_image(image, PROMPT, CONCEPTS, height, width, num_inference_steps=4,
                                     timestep_index=-2, seed=seed, return_pil_heatmaps=False)  # fmt: skip
    vae = runner.pipe.vae.config
    latents = (recorded["sample"] - vae.shift_factor) * vae.scaling_factor
    assert abs(float(runner.pipe.scheduler.sigmas[2]) - OFFICIAL_T) < 1e-7
    monkeypatch.setattr(official_ours, "_encode", lambda pil: latents.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        ours = official_ours.explain(image, CONCEPTS, PROMPT, t=OFFICIAL_T, seed=seed, settings=PRESETS["official"],
                                     size=(height, width), progress=False)  # fmt: skip
    compare(ours.maps, theirs.concept_heatmaps.float(), "explain / encode_image")

    def run(settings):
        return official_ours.explain(image, CONCEPTS, PROMPT, t=OFFICIAL_T, seed=seed, settings=settings,
                                     size=(height, width), progress=False)  # fmt: skip

    differs(official_ours, run, theirs.concept_heatmaps, image_vectors="prompt")
    differs(official_ours, run, theirs.concept_heatmaps, concept_encoder="t5")
    assert dataclasses.asdict(ours.settings) == dataclasses.asdict(PRESETS["official-sd3"])
