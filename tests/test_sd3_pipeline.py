"""The SD3.5 pipeline end to end on tiny random weights: a diffusers `StableDiffusion3Pipeline` saved with
`save_pretrained` loads into ours (the family is read from model_index.json), and our `generate` gives diffusers'
image for the same seed, with and without classifier-free guidance, while collecting concept maps; `explain` and the
API checks work as on Flux."""

import shutil

import numpy as np
import pytest
import torch
from test_clip import reference_with_projection, write_clip_tokenizer
from test_sd3_text import CLIP_G, CLIP_L, MAX_LENGTH, T5_CONFIG, WIDTH, t5_reference

import clip
import t5
from concept_attention import ConceptAttentionPipeline
from saliency import Settings
from sd3.pipeline import SD3Pipeline
from tiny import diffusers_vae, pixel_difference, random_state, randomize_like_trained, train_spiece

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A tiny SD3 snapshot written by diffusers (turbo in its name: 4 steps, no guidance by default)."""
    source = tmp_path_factory.mktemp("tokenizers")
    write_clip_tokenizer(source / "tokenizer", "<|endoftext|>")
    write_clip_tokenizer(source / "tokenizer_2", "!")
    train_spiece(source / "tokenizer_3")
    eos = clip.CLIPTokenizer.from_folder(source / "tokenizer").eos_id
    encoders = {}
    for name, config, eos_id, seed in (("l", CLIP_L, 2, 0), ("g", CLIP_G, eos, 1)):
        encoders[name] = reference_with_projection(config, eos_id)
        encoders[name].load_state_dict(random_state(clip.CLIPTextEncoder(config), seed=seed))
    encoders["t5"] = t5_reference(T5_CONFIG)
    encoders["t5"].load_state_dict(random_state(t5.T5Encoder(T5_CONFIG), seed=2), strict=False)
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=WIDTH, caption_projection_dim=32,
        pooled_projection_dim=CLIP_L.projection_dim + CLIP_G.projection_dim, pos_embed_max_size=64,
        qk_norm="rms_norm",
    )  # fmt: skip
    randomize_like_trained(transformer)
    vae = diffusers_vae(scaling_factor=1.5305, shift_factor=0.0609)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=encoders["l"].eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(source / "tokenizer")),
        text_encoder_2=encoders["g"].eval(),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(source / "tokenizer_2")),
        text_encoder_3=encoders["t5"].eval(),
        tokenizer_3=transformers.T5TokenizerFast.from_pretrained(str(source / "tokenizer_3")),
    )
    folder = tmp_path_factory.mktemp("snap") / "tiny-sd3.5-turbo"
    pipe.save_pretrained(folder)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):  # our tokenizers read the original files
        shutil.copytree(source / name, folder / name, dirs_exist_ok=True)
    return folder, pipe


@pytest.fixture(scope="module")
def ours(snapshot):
    pipe = ConceptAttentionPipeline.from_pretrained(snapshot[0], device="cpu", dtype=torch.float32)
    pipe.max_length = pipe.text.max_length = MAX_LENGTH
    return pipe


@pytest.mark.parametrize("guidance", [0.0, 2.5], ids=["turbo", "cfg"])
def test_generate_gives_diffusers_image(snapshot, ours, guidance):
    _, reference = snapshot
    prompt, height, width, steps = "a red cat on the grass", 64, 48, 3
    result = ours.generate(prompt, ["cat", "grass"], height, width, steps, seed=7, guidance=guidance, progress=False)
    expected = reference(
        prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(7), output_type="np", max_sequence_length=MAX_LENGTH,
    ).images[0]  # fmt: skip
    diff, _ = pixel_difference(result.image, expected)
    print(f"guidance {guidance}: max pixel difference {diff} (of 255)")
    assert diff <= 1
    assert result.maps.shape == (2, height // 16, width // 16)
    assert torch.allclose(result.maps.sum(0), torch.ones(height // 16, width // 16))  # softmax over concepts
    assert result.record["family"] == "sd3" and result.record["guidance"] == guidance


def test_defaults_family_and_explain(snapshot, ours):
    assert isinstance(ours, SD3Pipeline)
    assert (ours.num_steps, ours.guidance, ours.shift) == (4, 0.0, 3.0)  # "turbo" in the folder's name
    image = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))
    result = ours.explain(image, ["cat", "sky", "grass"], "a cat", t=0.6, num_samples=2, progress=False,
                          settings=Settings(layers=(1, 2)))  # fmt: skip
    assert result.maps.shape == (3, 3, 4) and result.record["family"] == "sd3"
    with pytest.raises(ValueError, match="3 joint blocks"):
        ours.explain(image, ["cat", "sky"], settings=Settings(layers=(3,)), progress=False)
    with pytest.raises(ValueError, match="guidance"):
        ours.generate("x", ["a", "b"], 32, 32, 1, guidance=-1.0, progress=False)


def test_command_line(snapshot, tmp_path, capsys):
    """`generate` and `explain` on an SD3.5 snapshot write the result; a layer beyond the model's joint blocks is
    refused before any weights load, naming them."""
    import json

    from PIL import Image

    from concept_attention import main

    folder = snapshot[0]
    common = ["--model", str(folder), "--concepts", "cat", "grass", "--device", "cpu", "--size", "32"]
    assert main(["generate", "--prompt", "a cat", "--num-steps", "2", "--out", str(tmp_path / "g"), *common]) == 0
    settings = json.loads((tmp_path / "g" / "settings.json").read_text())
    assert settings["family"] == "sd3" and settings["num_steps"] == 2
    Image.new("RGB", (40, 24), "red").save(tmp_path / "in.png")
    explain = ["explain", "--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "e"), *common]
    assert main(explain) == 0 and (tmp_path / "e" / "overlay.png").is_file()
    official = [*explain[:4], str(tmp_path / "o"), *common, "--preset", "official"]  # SD3's own: every block
    assert main(official) == 0
    assert json.loads((tmp_path / "o" / "settings.json").read_text())["settings"]["concept_encoder"] == "clip-joined"
    assert main([*explain[:4], str(tmp_path / "f"), *common, "--layers", "3"]) == 2
    assert "3 joint blocks" in capsys.readouterr().err
    too_big = ["generate", "--prompt", "a cat", "--out", str(tmp_path / "h"), *common[:-1], "2048"]
    assert main(too_big) == 2 and "at most 1024 px a side" in capsys.readouterr().err  # its 64 x 64 position table


@pytest.mark.parametrize("memory", ["stream", "fp8", "offload"])
def test_memory_modes(snapshot, ours, memory):
    """Streamed joint blocks (SD3's last block and Medium's MMDiT-X blocks are slot kinds of their own) give the
    resident model's maps; offload only moves the text encoders; fp8 weights move the maps a little."""
    pipe = ConceptAttentionPipeline.from_pretrained(snapshot[0], device="cpu", dtype=torch.float32, memory=memory)
    pipe.max_length = pipe.text.max_length = MAX_LENGTH
    args = ("a red cat on the grass", ["cat", "grass"], 64, 48, 2)
    got = pipe.generate(*args, seed=3, guidance=2.0, progress=False)
    want = ours.generate(*args, seed=3, guidance=2.0, progress=False)
    err = (got.maps - want.maps).abs().max().item()
    print(f"{memory}: maps max abs difference {err:.3g}")
    if memory == "fp8":
        assert torch.corrcoef(torch.stack((got.maps.flatten(), want.maps.flatten())))[0, 1] > 0.9
    else:
        assert err <= 1e-5
        assert np.abs(np.asarray(got.image, dtype=int) - np.asarray(want.image, dtype=int)).max() <= 1


def test_segmentation_command(snapshot, tmp_path):
    """`python -m segmentation run --model <an SD3.5 snapshot>`: the real pipeline, its joint blocks as layers."""
    import json

    from test_segmentation import write_folder

    from segmentation.__main__ import main as segmentation

    write_folder(tmp_path / "data")
    argv = ["run", "--dataset", "folder", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
            "--model", str(snapshot[0]), "--device", "cpu", "--no-progress"]  # fmt: skip
    assert segmentation([*argv, "--layers", "3-4"]) == 2  # three joint blocks, refused before loading
    assert segmentation([*argv, "--layers", "1-2"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["methods"] and all(0 <= m["metrics"]["miou"] <= 1 for m in results["methods"])


def test_offline_hub_cache_and_damaged_files(snapshot, ours, tmp_path, monkeypatch, capsys):
    """The snapshot in a Hugging Face cache, loaded by repo id with HF_HUB_OFFLINE=1 (the family read from the cached
    model_index.json); a truncated transformer file is one line that names it and says how to fetch it again."""
    from test_weights import add_to_cache

    import weights
    from concept_attention import main

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    repo = "someone/tiny-sd3.5-large-turbo"
    cached = add_to_cache(cache, repo, snapshot[0])
    pipe = ConceptAttentionPipeline.from_pretrained(repo, device="cpu", dtype=torch.float32)
    assert isinstance(pipe, SD3Pipeline) and pipe.num_steps == 4  # "turbo" in the repo's name
    for a, b in zip(pipe.transformer.state_dict().values(), ours.transformer.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    shard = next((cached / "transformer").glob("*.safetensors"))
    data = shard.read_bytes()
    shard.unlink()  # the cache's symlink, replaced by a damaged copy
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.CheckpointError, match=shard.name):
        weights.load_sd3(repo, "cpu", torch.float32)
    args = ["generate", "--model", repo, "--prompt", "x", "--concepts", "a", "b", "--device", "cpu", "--size", "32",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and shard.name in err[0] and "--force-download" in err[0], err


def test_nan_weights_in_a_text_encoder_are_named(ours):
    """A NaN in CLIP-G (held by the text encoders, not by the pipeline itself) stops the run at its first step with the
    tensor and the file it came from."""
    clip_g = ours.text.clip_g
    name = next(n for n, _ in clip_g.named_parameters() if "final_layer_norm.weight" in n)
    weight = clip_g.get_parameter(name)
    kept = weight.detach().clone()
    with torch.no_grad():
        weight[3] = float("nan")
    try:
        with pytest.raises(ValueError, match=f"text_encoder_2.*{name} holds NaN"):
            ours.generate("a cat", ["cat", "sky"], 32, 32, 2, progress=False)
    finally:
        with torch.no_grad():
            weight.copy_(kept)


def test_float16_is_refused_naming_the_sd3_transformer(snapshot, tmp_path, capsys):
    from concept_attention import main

    args = ["generate", "--model", str(snapshot[0]), "--prompt", "x", "--concepts", "a", "b", "--dtype", "float16",
            "--device", "cpu", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 2
    assert "the SD3.5 transformer does not run safely in float16" in capsys.readouterr().err  # it named Flux's
