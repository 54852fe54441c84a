"""The official Flux code, run from its source when CONCEPT_ATTENTION_OFFICIAL names a folder holding it (as for SD3.5
and CogVideoX: `git -C <mirror of helblazer811/ConceptAttention> archive HEAD | tar -x -C DIR`).

Its `ModifiedFluxDiT` holds our tiny model's weights (both use BFL's names) and samples with its own `denoise` over
schnell's 4 steps, the concepts fed as its `generate_image` feeds them (first T5 token of each, zero positions, a
zero pooled vector). Our model in our sampling loop gives the same latents, and our `MapCollector` (output space,
softmax over concepts, the mean over blocks and steps) the maps of its `compute_heatmaps_from_vectors`. The size is
1024 x 1024: that function hard-codes the 64 x 64 token grid. Tiny random models only.

Run: `CONCEPT_ATTENTION_OFFICIAL=/tmp/official .venv/bin/python -m pytest tests/test_flux_official.py -s`
"""

import ast
import os
import sys
import types
from pathlib import Path

import einops
import pytest
import torch
from test_mmdit import grid_ids, random_flux

import mmdit
from mmdit import ConceptInput
from saliency import MapCollector, Settings
from sampling import denoise, get_schedule

OFFICIAL = os.environ.get("CONCEPT_ATTENTION_OFFICIAL")
RTOL = 1e-5  # relative to the largest official value
SIDE = 64  # tokens per side: 1024 px


def import_official(root: str):
    """The official Flux modules, bypassing the packages' __init__ files (they import the whole pipeline, matplotlib
    and the segmentation baselines), and `compute_heatmaps_from_vectors` read from `flux/pipeline.py` as it is."""
    package = Path(root) / "concept_attention"
    if not (package / "flux" / "dit.py").is_file():
        pytest.fail(f"CONCEPT_ATTENTION_OFFICIAL={root}: no concept_attention/flux/dit.py there")
    saved = {name: sys.modules.get(name) for name in ("concept_attention", "concept_attention.flux")}
    for name, folder in (("concept_attention", package), ("concept_attention.flux", package / "flux")):
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        sys.modules[name] = module  # our own `concept_attention` is restored below
    try:
        from concept_attention.flux import dit, dit_block
        from concept_attention.flux.flux.src.flux import sampling
        from concept_attention.utils import linear_normalization
    finally:
        for name, module in saved.items():
            if module is not None:
                sys.modules[name] = module
            else:
                sys.modules.pop(name, None)
    source = (package / "flux" / "pipeline.py").read_text()
    function = next(
        node for node in ast.parse(source).body if getattr(node, "name", "") == "compute_heatmaps_from_vectors"
    )
    namespace = {"torch": torch, "einops": einops, "linear_normalization": linear_normalization}
    exec(compile(ast.Module([function], []), "official flux/pipeline.py", "exec"), namespace)  # noqa: S102
    return dit, dit_block, sampling, namespace["compute_heatmaps_from_vectors"]


@pytest.fixture(scope="module")
def official():
    if not OFFICIAL:
        pytest.skip("set CONCEPT_ATTENTION_OFFICIAL to the extracted official source to compare with it")
    return import_official(OFFICIAL)


def test_sampling_and_maps_equal_official(official):
    dit, dit_block, sampling, compute_heatmaps = official
    config = mmdit.CONFIGS["tiny"]
    # std 0.1 keeps the dot products in single digits: BFL's RoPE (and so the official code) rounds through float32,
    # which a softmax over logits in the thousands would magnify into map differences of 1e-4
    ours = random_flux(config, seed=3, std=0.1)
    fields = ("in_channels", "vec_in_dim", "context_in_dim", "hidden_size", "mlp_ratio", "num_heads", "depth",
              "depth_single_blocks", "theta", "qkv_bias", "guidance_embed")  # fmt: skip
    params = dit.FluxParams(**{f: getattr(config, f) for f in fields}, axes_dim=list(config.axes_dim))
    theirs = dit.ModifiedFluxDiT(params, attention_block_class=dit_block.ModifiedDoubleStreamBlock).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)

    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, SIDE * SIDE, config.in_channels, generator=g)
    img_ids, txt = grid_ids(1, SIDE, SIDE), torch.randn(1, 8, config.context_in_dim, generator=g)
    txt_ids, y = torch.zeros(1, 8, 3), torch.randn(1, config.vec_in_dim, generator=g)
    concepts = torch.randn(1, 3, config.context_in_dim, generator=g)  # one T5 token per concept
    timesteps = sampling.get_schedule(4, SIDE * SIDE, shift=False)
    assert timesteps == get_schedule(4, SIDE * SIDE, shift=False)

    with torch.no_grad():
        x_theirs, _, dicts = sampling.denoise(
            theirs, img=noise, img_ids=img_ids, txt=txt, txt_ids=txt_ids, vec=y, timesteps=timesteps, guidance=0.0,
            concepts=concepts, concept_ids=torch.zeros(1, 3, 3), concept_vec=torch.zeros(1, config.vec_in_dim),
        )  # fmt: skip
        settings = Settings()  # the official maps: output space, softmax over concepts, every block and step averaged
        assert (settings.space, settings.softmax, settings.layers, settings.steps) == ("output", True, None, None)
        layers = tuple(range(config.depth))
        collector = MapCollector(settings, layers, torch.arange(3), 3, keep_grid=False)

        def velocity(x, t):
            out = ours(x, img_ids, txt, txt_ids, t, y, concepts=ConceptInput(concepts))  # y None: zero pooled
            collector.add(out.saliency)
            return out.velocity

        x_ours = denoise(velocity, noise, timesteps)
    # as the official image_generator stacks them: (time, layers, batch, tokens, dim)
    vectors = {key: torch.stack([torch.stack([layer[key] for layer in step]) for step in dicts])
               for key in ("output_space_image_vectors", "output_space_concept_vectors")}  # fmt: skip
    expected = compute_heatmaps(vectors["output_space_image_vectors"], vectors["output_space_concept_vectors"],
                                layer_indices=list(layers), timesteps=list(range(4)), softmax=True)[0]  # fmt: skip
    maps = einops.rearrange(collector.total / collector.count, "c (h w) -> c h w", h=SIDE)
    for what, a, b in (("latents after 4 steps", x_ours, x_theirs), ("maps", maps, expected)):
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        print(f"{what}: max |ours - official| = {err:.3e} (official: max {scale:.3f}, spread {b.std().item():.3f})")
        assert a.shape == b.shape and err <= RTOL * scale, what
    assert expected.std() > 0.01  # the maps are not flat: a wrong concept routing would show
    shuffled = collector.total[[1, 2, 0]] / collector.count  # a negative control: concepts swapped
    assert (einops.rearrange(shuffled, "c (h w) -> c h w", h=SIDE) - expected).abs().max() > 1000 * RTOL
