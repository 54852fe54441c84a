"""Tests of cogvideox's transformer: it equals diffusers' `CogVideoXTransformer3DModel` on the same weights (a 2B-like
sin-cos and a 5B-like RoPE tiny config, loaded from diffusers' saved folder), the concept stream equals diffusers'
own block run with the concepts as its text, the video is bitwise unchanged by concepts, and the full-size presets
have exactly the names and shapes of the real `transformer/` folders (manifests). Tiny random models only."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import cogvideox
from manifests import manifest_shapes
from mmdit import ConceptInput
from weights import CheckpointError
from weights.cogvideox import cogvideox_config_from_diffusers, load_cogvideox_transformer

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline  # noqa: E402

RTOL = 1e-5  # fp32, relative to the largest output value

# transformer/config.json of THUDM/CogVideoX-2b and -5b (the same values appear in several public copies: diffusers'
# conversion script configs, third-party loaders' default configs)
REAL = {
    "cogvideox-2b": {"activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 64,
                     "dropout": 0.0, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 16,
                     "max_text_seq_length": 226, "norm_elementwise_affine": True, "norm_eps": 1e-05,
                     "num_attention_heads": 30, "num_layers": 30, "out_channels": 16, "patch_size": 2,
                     "sample_frames": 49, "sample_height": 60, "sample_width": 90, "spatial_interpolation_scale": 1.875,
                     "temporal_compression_ratio": 4, "temporal_interpolation_scale": 1.0, "text_embed_dim": 4096,
                     "time_embed_dim": 512, "timestep_activation_fn": "silu",
                     "use_rotary_positional_embeddings": False},
    "cogvideox-5b": {"activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 64,
                     "dropout": 0.0, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 16,
                     "max_text_seq_length": 226, "norm_elementwise_affine": True, "norm_eps": 1e-05,
                     "num_attention_heads": 48, "num_layers": 42, "out_channels": 16, "patch_size": 2,
                     "sample_frames": 49, "sample_height": 60, "sample_width": 90, "spatial_interpolation_scale": 1.875,
                     "temporal_compression_ratio": 4, "temporal_interpolation_scale": 1.0, "text_embed_dim": 4096,
                     "time_embed_dim": 512, "timestep_activation_fn": "silu",
                     "use_rotary_positional_embeddings": True},
}  # fmt: skip

# (latent frames, latent height, latent width): the tiny configs' training grid (8 x 12 latents: base 4 x 6 tokens)
# and a taller one whose RoPE positions are fractional (crop region 4 x 3 tokens, left 2)
GRIDS = [(3, 8, 12), (2, 10, 8)]


def reference_kwargs(config: cogvideox.CogVideoXConfig) -> dict:
    names = set(config.__dataclass_fields__) - {"rope_theta", "manual_attention"}
    return {name: getattr(config, name) for name in names}


def reference(config: cogvideox.CogVideoXConfig):
    """diffusers' CogVideoX transformer with our config."""
    return diffusers.CogVideoXTransformer3DModel(**reference_kwargs(config)).eval()


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """N(0, std^2) weights; LayerNorm weights around 1, as trained ones are."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            near_one = key.endswith(("norm.weight", "norm_q.weight", "norm_k.weight", "norm_final.weight"))
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if near_one else 0.0))


def inputs(config: cogvideox.CogVideoXConfig, grid: tuple[int, int, int], batch: int = 2, seed: int = 1):
    frames, height, width = grid
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, config.in_channels, height, width, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    context = torch.randn(batch, config.max_text_seq_length, config.text_embed_dim, generator=gen)
    return x, t, context


def rotary(ref, x: torch.Tensor):
    """The 5B's rotations as diffusers' CogVideoXPipeline computes them (pixel size = latent size x 8)."""
    if not ref.config.use_rotary_positional_embeddings:
        return None
    pipe = SimpleNamespace(vae_scale_factor_spatial=8, transformer=ref)
    height, width = x.shape[-2] * 8, x.shape[-1] * 8
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, height, width, x.shape[1], torch.device("cpu"))


def run_reference(ref, x, t, context) -> torch.Tensor:
    with torch.no_grad():
        return ref(hidden_states=x, encoder_hidden_states=context, timestep=t, image_rotary_emb=rotary(ref, x)).sample


def close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    err = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    print(f"{what}: max abs error {err:.3g} (largest value {scale:.3g}, relative {err / scale:.3g})")
    assert err <= RTOL * scale, f"{what}: {err} > {RTOL} x {scale}"
    return err / scale


@pytest.mark.parametrize("name", ["tiny-2b", "tiny-5b"])
def test_equals_diffusers_from_its_folder(name, tmp_path):
    """diffusers' random model saved as a `transformer/` folder loads into ours by name and gives its prediction, on
    the training grid and on a grid of another shape (the 2B's table and the 5B's crop-region RoPE recomputed)."""
    config = cogvideox.CONFIGS[name]
    ref = reference(config)
    randomize(ref, seed=3)
    ref.save_pretrained(tmp_path / "transformer")
    ours = load_cogvideox_transformer(tmp_path, "cpu", torch.float32)
    assert ours.config == config
    assert set(ours.state_dict()) == set(ref.state_dict())
    for grid in GRIDS:
        x, t, context = inputs(config, grid)
        with torch.no_grad():
            close(ours(x, t, context), run_reference(ref, x, t, context), f"{name} on latent grid {grid}")
    manual = cogvideox.CogVideoX(replace(config, manual_attention=True)).eval()
    manual.load_state_dict(ours.state_dict())
    with torch.no_grad():
        close(manual(x, t, context), run_reference(ref, x, t, context), f"{name}, manual attention")


@pytest.mark.parametrize("name", ["tiny-2b", "tiny-5b"])
def test_concepts_leave_the_video_bitwise_and_follow_diffusers_block(name):
    """The prediction is bitwise the same with concepts; block by block, the concept tokens evolve exactly as diffusers'
    CogVideoXBlock moves its text tokens when given the concepts as its text (text attends to [text; video] there,
    concepts to [concepts; video] here; video keys rotated in the 5B, concept keys not)."""
    config = cogvideox.CONFIGS[name]
    ref = reference(config)
    randomize(ref, seed=5)
    model = cogvideox.CogVideoX(config).eval()
    model.load_state_dict(ref.state_dict())
    x, t, context = inputs(config, GRIDS[1])
    concept_tokens = torch.randn(2, 3, config.text_embed_dim, generator=torch.Generator().manual_seed(9))
    videos, concepts_in, concepts_out = [], [], []
    with torch.no_grad():
        plain = model(x, t, context)

        def keep(module, args, out) -> None:  # the block's video input, its concepts before and after
            videos.append(args[0])
            concepts_in.append(args[4])
            concepts_out.append(out[2])

        hooks = [block.register_forward_hook(keep) for block in model.transformer_blocks]
        out = model(x, t, context, concepts=ConceptInput(concept_tokens, spaces=("output", "attention", "value",
                                                                               "cross_attention")))  # fmt: skip
    for hook in hooks:
        hook.remove()
    assert torch.equal(out.prediction, plain), "concepts changed the video"
    N = x.shape[1] * x.shape[-2] * x.shape[-1] // 4
    assert sorted(out.saliency) == list(range(config.num_layers))
    assert out.saliency[0].output.shape == (2, 3, N)
    assert out.saliency[0].attention.shape == (2, config.num_attention_heads, 3, N)

    rotations = rotary(ref, x)
    with torch.no_grad():
        temb = ref.time_embedding(ref.time_proj(t).to(x.dtype))
        close(concepts_in[0], ref.patch_embed.text_proj(concept_tokens), f"{name} concepts into block 0")
        for i, block in enumerate(ref.transformer_blocks):
            _, c_ref = block(videos[i], concepts_in[i], temb, image_rotary_emb=rotations)
            close(concepts_out[i], c_ref, f"{name} concepts after block {i}")


def test_stop_after_concepts_layers_and_errors():
    model = cogvideox.CogVideoX(cogvideox.CONFIGS["tiny-5b"]).eval()
    randomize(model, seed=2)
    x, t, context = inputs(model.config, GRIDS[0])
    tokens = torch.randn(2, 2, model.config.text_embed_dim)
    with torch.no_grad():
        full = model(x, t, context, concepts=ConceptInput(tokens, layers=(1,)))
        early = model(x, t, context, concepts=ConceptInput(tokens, layers=(1,)), stop_after_concepts=True)
        assert early.prediction is None and list(early.saliency) == [1] == list(full.saliency)
        assert torch.equal(early.saliency[1].output, full.saliency[1].output)
        with pytest.raises(ValueError, match="block indices"):
            model(x, t, context, concepts=ConceptInput(tokens, layers=(3,)))
        with pytest.raises(ValueError, match="no pooled vector"):
            model(x, t, context, concepts=ConceptInput(tokens, y=torch.zeros(2, 4)))
        with pytest.raises(ValueError, match="multiple of the patch size"):
            model(x[..., :7], t, context)


def test_config_validation():
    with pytest.raises(ValueError, match="positive int"):
        cogvideox.CogVideoXConfig(num_attention_heads=0, num_layers=2, use_rotary_positional_embeddings=False)
    with pytest.raises(ValueError, match="divisible by 16"):
        cogvideox.CogVideoXConfig(2, 2, True, attention_head_dim=24)
    with pytest.raises(ValueError, match="divisible by 16"):
        cogvideox.CogVideoXConfig(1, 2, False, attention_head_dim=24)
    with pytest.raises(CheckpointError, match="1.5"):
        cogvideox_config_from_diffusers({**REAL["cogvideox-5b"], "patch_size_t": 2}, "real")


# configs a user may point the loader at by mistake, each refused in one line that says what it is
OTHER_CONFIGS = {
    "image-to-video 5B": ({"ofs_embed_dim": 512}, "image-to-video"),
    "learned positions (I2V)": ({"use_learned_positional_embeddings": True}, "use_learned_positional_embeddings"),
    "another transformer": ({"_class_name": "SD3Transformer2DModel"}, "describes a SD3Transformer2DModel"),
    "another activation": ({"activation_fn": "gelu"}, "activation or norm"),
    "no affine norms": ({"norm_elementwise_affine": False}, "activation or norm"),
    "no in_channels": ({"in_channels": ..., "out_channels": None}, "has no 'in_channels'"),  # ...: key removed
    "depth as a string": ({"num_layers": "30"}, "wrong type"),
}


@pytest.mark.parametrize("case", list(OTHER_CONFIGS))
def test_other_transformers_configs_are_refused_by_name(case):
    change, message = OTHER_CONFIGS[case]
    cfg = {k: v for k, v in {**REAL["cogvideox-5b"], **change}.items() if v is not ...}
    with pytest.raises(CheckpointError, match=message):
        cogvideox_config_from_diffusers(cfg, "transformer/config.json")


def test_out_channels_null_means_in_channels():  # as the Flux and SD3 configs read it
    config = cogvideox_config_from_diffusers({**REAL["cogvideox-5b"], "out_channels": None}, "transformer/config.json")
    assert config.out_channels == config.in_channels == 16


# ---- the real CogVideoX-2b and -5b transformers, by their names and shapes (no data) --------------------------------


@pytest.mark.parametrize("preset", ["cogvideox-2b", "cogvideox-5b"])
def test_full_size_presets_match_the_real_files(preset):
    """Our full-size model on the meta device has exactly the names and shapes of diffusers' model built with the
    real config.json, and of the committed manifest; that config.json reads back as the preset."""
    config = cogvideox.CONFIGS[preset]
    assert cogvideox_config_from_diffusers(json.loads(json.dumps(REAL[preset])), "real") == config
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in cogvideox.CogVideoX(config).state_dict().items()}
        reference = diffusers.CogVideoXTransformer3DModel(**REAL[preset])
        theirs = {k: list(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs
    assert ours == manifest_shapes(f"{preset}.tsv")
