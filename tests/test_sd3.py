"""Tests of sd3: the MM-DiT equals diffusers' `SD3Transformer2DModel` on the same weights (Large-like and Medium-like
tiny configs, loaded from both checkpoint layouts), the concept stream equals diffusers' own joint block run with the
concepts as its text, the image is bitwise unchanged by concepts, and the full-size configs and loader plans match
the manifests of the real SD3.5 files. Tiny random models only."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import sd3
import weights
from manifests import manifest_rows
from mmdit import ConceptInput
from weights.convert import sources
from weights.sd3 import sd3_config_from_diffusers, sd3_config_from_shapes, sd3_from_diffusers

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

RTOL = 1e-5  # fp32, relative to the largest output value


def random_sd3(name: str, seed: int = 0, std: float = 0.2) -> sd3.SD3:
    """N(0, std^2) weights, q/k RMSNorm weights around 1 (as trained ones are), a random position table."""
    model = sd3.SD3(sd3.CONFIGS[name])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.state_dict().items():
            near_one = key.endswith(("ln_q.weight", "ln_k.weight"))
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if near_one else 0.0))
    return model.eval()


def reference(config: sd3.SD3Config):
    """diffusers' SD3 transformer with our config."""
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=config.patch_size, in_channels=config.in_channels, out_channels=config.out_channels,
        num_layers=config.depth, attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
        joint_attention_dim=config.joint_attention_dim, caption_projection_dim=config.hidden_size,
        pooled_projection_dim=config.pooled_projection_dim, pos_embed_max_size=config.pos_embed_max_size,
        dual_attention_layers=config.dual_attention_layers, qk_norm="rms_norm",
    ).eval()  # fmt: skip


def inputs(config: sd3.SD3Config, batch: int = 2, rows: int = 6, cols: int = 4, text: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, 2 * rows, 2 * cols, generator=gen)
    t = torch.rand(batch, generator=gen)
    context = torch.randn(batch, text, config.joint_attention_dim, generator=gen)
    y = torch.randn(batch, config.pooled_projection_dim, generator=gen)
    return x, t, context, y


def run_reference(ref, x, t, context, y) -> torch.Tensor:
    with torch.no_grad():
        return ref(hidden_states=x, timestep=t * 1000, encoder_hidden_states=context, pooled_projections=y).sample


def close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    err = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    print(f"{what}: max abs error {err:.3g} (largest value {scale:.3g})")
    assert err <= RTOL * scale, f"{what}: {err} > {RTOL} x {scale}"


@pytest.mark.parametrize("name", ["tiny", "tiny-medium"])
def test_equals_diffusers_from_both_layouts(name, tmp_path):
    """diffusers' random model saved as a `transformer/` folder loads into ours (our rule table); our weights saved
    as SAI's single file load into diffusers through diffusers' own single-file converter. Both give its velocity."""
    config = sd3.CONFIGS[name]
    ref = reference(config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if key.endswith(("norm_q.weight",
                    "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")) else 0.0))  # fmt: skip
    ref.save_pretrained(tmp_path / "diffusers" / "transformer")
    x, t, context, y = inputs(config)
    ours = weights.load_sd3(tmp_path / "diffusers", "cpu", torch.float32)
    assert ours.config == config
    with torch.no_grad():
        close(ours(x, t, context, y), run_reference(ref, x, t, context, y), f"{name} from diffusers' folder")

    mine = random_sd3(name, seed=5)
    single = {"model.diffusion_model." + k: v.contiguous() for k, v in mine.state_dict().items()}
    save_file(single, tmp_path / "sd3.5_tiny.safetensors")
    loaded = weights.load_sd3(tmp_path / "sd3.5_tiny.safetensors", "cpu", torch.float32)
    assert loaded.config == config
    ref2 = reference(config)
    ref2.load_state_dict(single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(dict(single)))
    with torch.no_grad():
        close(loaded(x, t, context, y), run_reference(ref2, x, t, context, y), f"{name} from SAI's single file")


@pytest.mark.parametrize("name", ["tiny", "tiny-medium"])
def test_concepts_leave_the_image_bitwise_and_follow_diffusers_block(name):
    """The velocity is bitwise the same with concepts; block by block, the concept tokens evolve exactly as diffusers'
    JointTransformerBlock moves its text tokens when given the concepts as its text (text attends to [image; text]
    there, concepts to [image; concepts] here), with the prompt's conditioning vector."""
    config = sd3.CONFIGS[name]
    model = random_sd3(name)
    x, t, context, y = inputs(config)
    concept_tokens = torch.randn(2, 3, config.joint_attention_dim, generator=torch.Generator().manual_seed(9))
    images, concepts_seen = [], []
    with torch.no_grad():
        plain = model(x, t, context, y)

        def keep(module, args, out) -> None:  # the block's image input and its updated concepts
            images.append(args[0])
            concepts_seen.append(out[2])

        hooks = [block.register_forward_hook(keep) for block in model.joint_blocks]
        out = model(x, t, context, y, concepts=ConceptInput(concept_tokens, spaces=("output", "attention")))
    for hook in hooks:
        hook.remove()
    assert torch.equal(out.velocity, plain), "concepts changed the image"
    assert sorted(out.saliency) == list(range(config.depth))
    assert out.saliency[0].output.shape == (2, 3, x.shape[-2] * x.shape[-1] // 4)

    ref = reference(config)
    state = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(
        {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    )
    ref.load_state_dict(state)
    with torch.no_grad():
        temb = ref.time_text_embed(t * 1000, y)
        c = ref.context_embedder(concept_tokens)
        for i, block in enumerate(ref.transformer_blocks):
            c_ref, _ = block(hidden_states=images[i], encoder_hidden_states=c, temb=temb)
            if i == config.depth - 1:
                assert c_ref is None and concepts_seen[i] is None  # the last block ends the text stream
            else:
                close(concepts_seen[i], c_ref, f"{name} concepts after block {i}")
                c = concepts_seen[i]


def test_stop_after_concepts_and_layers():
    model = random_sd3("tiny")
    x, t, context, y = inputs(model.config)
    concept_tokens = torch.randn(2, 2, model.config.joint_attention_dim)
    with torch.no_grad():
        full = model(x, t, context, y, concepts=ConceptInput(concept_tokens, layers=(1,)))
        early = model(x, t, context, y, concepts=ConceptInput(concept_tokens, layers=(1,)), stop_after_concepts=True)
    assert early.velocity is None and list(early.saliency) == [1] == list(full.saliency)
    assert torch.equal(early.saliency[1].output, full.saliency[1].output)
    with pytest.raises(ValueError, match="joint-block indices"):
        model(x, t, context, y, concepts=ConceptInput(concept_tokens, layers=(3,)))
    with pytest.raises(ValueError, match="position table"):
        model(torch.zeros(1, 16, 34, 8), t[:1], context[:1], y[:1])


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        sd3.SD3Config(16, 16, 65, 2, 3, 16, 32, 32)
    with pytest.raises(ValueError, match="dual_attention_layers"):
        sd3.SD3Config(16, 16, 64, 2, 3, 16, 32, 32, dual_attention_layers=(2,))
    with pytest.raises(ValueError, match="positive int"):
        sd3.SD3Config(16, 16, "64", 2, 3, 16, 32, 32)


# ---- the real SD3.5 files, by their names and shapes (no data) -------------------------------------------------------


def shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {key: tuple(json.loads(shape)) for key, shape in manifest_rows(name)}


@pytest.mark.parametrize(
    "preset, stem, diffusers_config",
    [
        ("sd3.5-large", "sd3.5-large", {"num_layers": 38, "num_attention_heads": 38, "pos_embed_max_size": 192}),
        ("sd3.5-medium", "sd3.5-medium",
         {"num_layers": 24, "num_attention_heads": 24, "pos_embed_max_size": 384,
          "dual_attention_layers": list(range(13))}),
    ],
)  # fmt: skip
def test_full_size_configs_match_the_real_files(preset, stem, diffusers_config):
    """Our full-size model on the meta device has exactly the single file's names and shapes; the config read from
    those shapes and from diffusers' config.json is the preset; the rule table maps every one of our tensors onto the
    diffusers file's tensors (stacked rows fitting our shape) and uses each diffusers tensor exactly once."""
    config = sd3.CONFIGS[preset]
    with torch.device("meta"):
        model = sd3.SD3(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    single = shapes(f"{stem}.single.tsv")
    assert ours == single
    infos = {"model.diffusion_model." + k: SimpleNamespace(shape=v) for k, v in single.items()}
    assert sd3_config_from_shapes(infos, "real", "model.diffusion_model.") == config
    cfg = {"attention_head_dim": 64, "in_channels": 16, "out_channels": 16, "joint_attention_dim": 4096,
           "pooled_projection_dim": 2048, "patch_size": 2, "qk_norm": "rms_norm", **diffusers_config}  # fmt: skip
    assert sd3_config_from_diffusers(cfg, "real") == config
    theirs = shapes(f"{stem}.diffusers.tsv")
    used = []
    for key, shape in ours.items():
        pieces = sources(key, sd3_from_diffusers(config.depth, config.dual_attention_layers))
        rows = 0
        for file_key, _, parts in pieces:
            assert file_key in theirs, f"{key}: {file_key} is not in the diffusers file"
            assert theirs[file_key][1:] == shape[1:]
            rows += theirs[file_key][0] // parts
            used.append(file_key)
        assert rows == shape[0], key
    assert sorted(set(used)) == sorted(theirs)
    assert len(used) == len(theirs) + 2 * 2  # the two swapped (scale, shift) pairs read their tensor twice


def test_family_is_read_from_the_checkpoint(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (tmp_path / "b" / "transformer").mkdir(parents=True)
    (tmp_path / "b" / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    save_file(
        {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)}, tmp_path / "s.safetensors"
    )
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, tmp_path / "f.safetensors")
    assert weights.family(tmp_path / "a") == "sd3" and weights.family(tmp_path / "b") == "flux"
    assert weights.family(tmp_path / "s.safetensors") == "sd3" and weights.family(tmp_path / "f.safetensors") == "flux"
    assert weights.family(Path(__file__).resolve().parents[1] / "shapes" / "weights") == "flux"


def test_autoencoder_from_the_single_file_and_the_vae_folder(tmp_path):
    """SAI's single file holds the autoencoder under `first_stage_model.` (BFL/LDM names) with no config: the "sd3"
    preset's scale 1.5305 and shift 0.0609 apply. A diffusers vae/ folder with SD3's config gives the latents of
    diffusers' AutoencoderKL: (posterior mean - shift) * scale."""
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
    ).eval()  # fmt: skip
    vae.save_pretrained(tmp_path / "snap" / "vae")
    ours = weights.load_sd3_autoencoder(tmp_path / "snap", "cpu", torch.float32)
    assert (ours.config.scale_factor, ours.config.shift_factor) == (1.5305, 0.0609)
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = (vae.encode(image).latent_dist.mean - 0.0609) * 1.5305
        close(ours.encode(image), expected, "SD3 autoencoder encode")

    single = {"first_stage_model." + k: v.contiguous() for k, v in ours.state_dict().items()}
    single["model.diffusion_model.pos_embed"] = torch.zeros(1, 4, 8)
    save_file(single, tmp_path / "sd3.5_tiny.safetensors")
    again = weights.load_sd3_autoencoder(tmp_path / "sd3.5_tiny.safetensors", "cpu", torch.float32)
    assert again.config == ours.config
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


# SD3.0 Medium's transformer/config.json (stabilityai/stable-diffusion-3-medium-diffusers): no qk_norm
SD3_0 = {"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536,
         "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
         "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
         "sample_size": 128}  # fmt: skip


@pytest.mark.parametrize(
    "change, message",
    [({}, r"^transformer/config.json: qk_norm None; only SD3.5 \(qk_norm 'rms_norm'\) is supported, not SD3.0$"),
     ({"qk_norm": "rms_norm", "num_layers": "24"}, "wrong type"),
     ({"qk_norm": "rms_norm", "pos_embed_max_size": ...}, "has no 'pos_embed_max_size'")],
    ids=["SD3.0", "depth as a string", "no position table size"],
)  # fmt: skip
def test_configs_the_sd3_loader_refuses_say_why(change, message):
    cfg = {k: v for k, v in {**SD3_0, **change}.items() if v is not ...}
    with pytest.raises(weights.CheckpointError, match=message):
        sd3_config_from_diffusers(cfg, "transformer/config.json")
    fixed = sd3_config_from_diffusers({**SD3_0, "qk_norm": "rms_norm"}, "transformer/config.json")  # only qk_norm
    assert (fixed.depth, fixed.hidden_size, fixed.pos_embed_max_size) == (24, 1536, 192)


def test_family_of_a_hub_repo_not_yet_cached_is_read_from_its_model_index(tmp_path, monkeypatch):
    """Online, with nothing cached: only the repo's model_index.json is fetched (a fake hub here); a repo without one
    (BFL's) or no network gives "flux", whose loaders then say what is missing."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    indexes = {"stabilityai/stable-diffusion-3.5-large": "StableDiffusion3Pipeline", "THUDM/CogVideoX-5b":
               "CogVideoXPipeline"}  # fmt: skip
    fetched = []

    def fake_download(repo, filename, cache_dir=None, **kwargs):
        fetched.append((repo, filename))
        if repo not in indexes:
            raise huggingface_hub.errors.EntryNotFoundError(f"{repo} has no {filename}")
        path = tmp_path / repo.replace("/", "--") / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"_class_name": indexes[repo]}))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert weights.family("stabilityai/stable-diffusion-3.5-large") == "sd3"
    assert weights.family("THUDM/CogVideoX-5b") == "cogvideox"
    assert weights.family("black-forest-labs/FLUX.1-schnell") == "flux"
    assert {name for _, name in fetched} == {"model_index.json"} and len(fetched) == 3
