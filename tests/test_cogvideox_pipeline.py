"""The CogVideoX pipeline end to end on tiny random weights: a diffusers `CogVideoXPipeline` saved with
`save_pretrained` loads into ours (the family read from model_index.json), and our `generate` gives diffusers' frames
for the same seed (2B-like: sin-cos positions and DDIM; 5B-like: RoPE and the stochastic DPM sampler; with and without
guidance) while collecting concept maps [C, latent frames, h, w]; `explain` takes a clip."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_sd3_text import t5_reference

import t5
from concept_attention import ConceptAttentionPipeline
from tiny import random_state, train_spiece

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

T5_CONFIG = t5.CONFIGS["tiny"]
TEXT = 7  # T5 tokens of a prompt: the tiny transformer's max_text_seq_length


def snapshot(folder, rope: bool):
    """A tiny CogVideoX snapshot written by diffusers: 2B-like (sin-cos, DDIM, SNR shift 3) or 5B-like (RoPE, DPM)."""
    tokenizer = folder.parent / f"{folder.name}-tokenizer"
    train_spiece(tokenizer)
    encoder = t5_reference(T5_CONFIG)
    encoder.load_state_dict(random_state(t5.T5Encoder(T5_CONFIG), seed=2), strict=False)
    torch.manual_seed(0)
    transformer = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, time_embed_dim=32,
        text_embed_dim=T5_CONFIG.d_model, num_layers=3, sample_width=6, sample_height=4, sample_frames=5,
        max_text_seq_length=TEXT, use_rotary_positional_embeddings=rope,
    )  # fmt: skip
    with torch.no_grad():
        for key, p in transformer.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if "norm" in key and key.endswith("weight") else 0.0))
    vae = diffusers.AutoencoderKLCogVideoX(
        block_out_channels=(16, 32, 32, 64), layers_per_block=1, latent_channels=16, norm_num_groups=8,
        scaling_factor=0.7 if rope else 1.15258426,
    )  # fmt: skip
    cls = diffusers.CogVideoXDPMScheduler if rope else diffusers.CogVideoXDDIMScheduler
    scheduler = cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                    snr_shift_scale=1.0 if rope else 3.0, timestep_spacing="trailing")  # fmt: skip
    pipe = diffusers.CogVideoXPipeline(
        tokenizer=transformers.T5TokenizerFast.from_pretrained(str(tokenizer)), text_encoder=encoder.eval(),
        vae=vae.eval(), transformer=transformer.eval(), scheduler=scheduler,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    shutil.copytree(tokenizer, folder / "tokenizer", dirs_exist_ok=True)  # our tokenizer reads spiece.model
    return pipe


@pytest.fixture(scope="module", params=[False, True], ids=["2b-like", "5b-like"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cogvideox") / "tiny-cogvideox"
    reference = snapshot(folder, request.param)
    ours = ConceptAttentionPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    ours.max_length = TEXT
    return ours, reference


@pytest.mark.parametrize("guidance", [0.0, 3.0], ids=["plain", "cfg"])
def test_generate_gives_diffusers_frames(pair, guidance):
    ours, reference = pair
    prompt, height, width, frames, steps = "a red cat on the grass", 32, 48, 5, 3
    result = ours.generate(prompt, ["cat", "grass"], height, width, steps, seed=5, guidance=guidance, progress=False,
                           num_frames=frames)  # fmt: skip
    expected = reference(
        prompt, height=height, width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(5), output_type="np", max_sequence_length=TEXT,
    ).frames[0]  # fmt: skip  # (frames, H, W, 3) in [0, 1]
    ours_frames = np.stack([np.asarray(f, dtype=np.int32) for f in result.frames])
    theirs = np.round(expected * 255).astype(np.int32)
    diff = np.abs(ours_frames - theirs).max()
    print(f"{type(reference.scheduler).__name__}, guidance {guidance}: max pixel difference {diff} (of 255)")
    assert ours_frames.shape == theirs.shape and diff <= 1
    assert result.maps.shape == (2, 2, height // 16, width // 16)  # 5 frames -> 2 latent frames
    assert torch.allclose(result.maps.sum(0), torch.ones(2, height // 16, width // 16))


def test_explain_a_clip(pair, tmp_path):
    from PIL import Image

    ours, _ = pair
    clip = [Image.new("RGB", (48, 32), (30 * i, 80, 160)) for i in range(7)]  # cut to 5 frames (1 + 4k)
    result = ours.explain(clip, ["cat", "sky", "grass"], "a cat", t=0.4, num_samples=2, progress=False)
    assert result.maps.shape == (3, 2, 2, 3) and len(result.frames) == 5
    assert result.record["timestep"] == round(0.4 * 999)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        ours.generate("x", ["a", "b"], 32, 32, 1, num_frames=4, progress=False)


def test_command_line(pair, tmp_path, capsys):
    """generate --frames and explain --video on a CogVideoX snapshot; a frame count the VAE cannot take and an image
    given to a video model are refused in one line."""
    import json

    from PIL import Image

    from concept_attention import main

    ours, _ = pair
    common = ["--model", ours.source, "--concepts", "cat", "grass", "--device", "cpu", "--size", "32x48"]
    out = tmp_path / "g"
    argv = ["generate", "--prompt", "a cat", "--frames", "5", "--num-steps", "2", "--out", str(out), *common]
    assert main(argv) == 0
    assert (out / "video.webp").is_file() and (out / "contact_sheet.png").is_file()
    assert json.loads((out / "settings.json").read_text())["latent_frames"] == 2
    assert "video.webp, contact_sheet.png" in capsys.readouterr().out
    frames = [Image.new("RGB", (48, 32), (40 * i, 90, 120)) for i in range(5)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert main(["explain", "--video", str(tmp_path / "clip.gif"), "--out", str(tmp_path / "e"), *common]) == 0
    assert main(["generate", "--prompt", "x", "--frames", "6", "--out", str(tmp_path / "b"), *common]) == 2
    err = capsys.readouterr().err
    assert "1 + 4k" in err and "denoising" not in err  # refused before any weights load
    Image.new("RGB", (48, 32)).save(tmp_path / "one.png")
    assert main(["explain", "--image", str(tmp_path / "one.png"), "--out", str(tmp_path / "c"), *common]) == 2
    assert "--video" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("memory", ["stream", "fp8"])
def test_memory_modes(pair, memory):
    """Streamed blocks give the resident model's maps; fp8 block weights move them a little."""
    ours, _ = pair
    other = ConceptAttentionPipeline.from_pretrained(ours.source, device="cpu", dtype=torch.float32, memory=memory)
    other.max_length = TEXT
    args = ("a red cat", ["cat", "grass"], 32, 48, 2)
    got = other.generate(*args, seed=1, guidance=2.0, progress=False, num_frames=5)
    want = ours.generate(*args, seed=1, guidance=2.0, progress=False, num_frames=5)
    err = (got.maps - want.maps).abs().max().item()
    print(f"{memory}: maps max abs difference {err:.3g}")
    if memory == "stream":
        assert err <= 1e-6
    else:
        assert torch.corrcoef(torch.stack((got.maps.flatten(), want.maps.flatten())))[0, 1] > 0.9


def test_example_writes_a_result(tmp_path):
    """`python -m cogvideox.example`: the tiny random model's result folder, built from the shapes model's T5."""
    from cogvideox.example import main

    assert main(["--out", str(tmp_path / "ex")]) == 0
    assert (tmp_path / "ex" / "contact_sheet.png").is_file() and (tmp_path / "ex" / "video.webp").is_file()


def test_nan_weights_in_the_decoder_are_named(pair):
    """A NaN in the video autoencoder's decoder: the frames are checked before they become pictures, and the tensor
    and its file are named."""
    ours, _ = pair
    name, weight = [(n, p) for n, p in ours.autoencoder.named_parameters() if n.startswith("decoder.")][-1]
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")
    try:
        with pytest.raises(ValueError, match=f"vae.*{name} holds NaN"):
            ours.generate("a cat", ["cat", "sky"], 32, 48, 1, progress=False, num_frames=5)
    finally:
        with torch.no_grad():
            weight.copy_(kept)


def test_the_scheduler_comes_from_the_snapshot_or_the_hub_cache(pair, tmp_path, monkeypatch):
    """The sampler and its noise schedule are the snapshot's (DDIM for the 2B, DPM for the 5B), also when loaded by repo
    id from the Hugging Face cache; a snapshot without scheduler/ is refused with how to fetch it, never sampled with
    another model's schedule."""
    from test_weights import add_to_cache

    import weights

    ours, _ = pair
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    add_to_cache(tmp_path / "hub", "someone/tiny-cogvideox", Path(ours.source))
    cached = ConceptAttentionPipeline.from_pretrained("someone/tiny-cogvideox", device="cpu", dtype=torch.float32)
    rope = ours.transformer.config.use_rotary_positional_embeddings  # the 5B-like snapshot
    assert cached.schedule == ours.schedule and cached.schedule.sampler == ("dpm" if rope else "ddim")
    bare = tmp_path / "bare"
    shutil.copytree(ours.source, bare, ignore=shutil.ignore_patterns("scheduler"))
    with pytest.raises(weights.CheckpointNotFoundError, match="no CogVideoX scheduler .* scheduler/ with scheduler_"):
        ConceptAttentionPipeline.from_pretrained(bare, device="cpu", dtype=torch.float32)


def test_a_download_by_repo_id_fetches_the_scheduler(pair, tmp_path, monkeypatch):
    """Online (huggingface_hub replaced by a fake that serves the snapshot's files): every component's files are
    fetched, the scheduler's included, and the run samples with the snapshot's own schedule."""
    from types import SimpleNamespace

    import huggingface_hub
    from test_weights import add_to_cache

    ours, _ = pair
    staging, cache, repo = Path(ours.source), tmp_path / "hub", "someone/online-cogvideox"
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    requested = []

    def snapshot_download(repo_id, allow_patterns, cache_dir):
        requested.extend(allow_patterns)
        return str(add_to_cache(Path(cache_dir), repo_id, staging, list(allow_patterns)))

    def hf_hub_download(repo_id, filename, cache_dir=None, **kwargs):
        requested.append(filename)
        return str(add_to_cache(Path(cache_dir), repo_id, staging, [filename]) / filename)

    sizes = [SimpleNamespace(rfilename=f, size=(staging / f).stat().st_size) for f in files]
    info = SimpleNamespace(sha="main", siblings=sizes)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: SimpleNamespace(model_info=lambda repo, files_metadata: info))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    online = ConceptAttentionPipeline.from_pretrained(repo, device="cpu", dtype=torch.float32)
    assert "scheduler/scheduler_config.json" in requested and online.schedule == ours.schedule


def test_command_line_names_frames_and_the_clip(pair, tmp_path, capsys):
    """Too many frames are refused by the memory estimate before any weights load, naming the frames; a clip explained
    at another size is named in the note (it said `None`)."""
    from PIL import Image

    from concept_attention import main

    ours, _ = pair
    common = ["--model", ours.source, "--concepts", "cat", "grass", "--device", "cpu"]
    argv = ["generate", "--prompt", "a cat", "--frames", "4000001", "--out", str(tmp_path / "g"), *common]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "with 1000001 latent frames needs about" in err and "fewer --frames" in err and "denoising" not in err
    argv = ["generate", "--prompt", "a cat", "--frames", "5", "--grid", "--out", str(tmp_path / "g"), *common]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--grid: the layer x step grid is not available for videos" in err and "denoising" not in err
    frames = [Image.new("RGB", (50, 34), (40 * i, 90, 120)) for i in range(5)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert main(["explain", "--video", str(tmp_path / "clip.gif"), "--out", str(tmp_path / "e"), *common]) == 0
    assert f"note: {tmp_path / 'clip.gif'} is 34x50; explaining it at 32x48" in capsys.readouterr().err


def test_explain_checks_its_arguments_as_the_image_models_do(pair):
    """Wrong types and values are ValueErrors that name them, before anything runs (TypeErrors before, or silently
    accepted: a negative seed, progress="no", frames of mixed sizes that the resize would have distorted)."""
    from PIL import Image

    ours, _ = pair
    clip = [Image.new("RGB", (48, 32))] * 5
    cases = [
        (dict(video=None), "video must be a path or a non-empty list of PIL images, got NoneType"),
        (dict(video=5), "got int"),
        (dict(video=[Image.new("RGB", (48, 32)), Image.new("RGB", (32, 32))]), "the frames differ in size"),
        (dict(seed=-1), "seed = -1"),
        (dict(seed="1"), "seed = '1'"),
        (dict(progress="no"), "progress = 'no'"),
        (dict(size="32x48"), "size = '32x48': give \\(height, width\\)"),
        (dict(t=float("nan")), "t = nan"),
        (dict(keep_grid=True), "not available for videos"),  # before the forwards (it was refused after them)
        (dict(num_samples=10**10), "num_samples = 10000000000: give a number from 1 to 1000"),  # it ran for ever
    ]
    for change, message in cases:
        arguments = {"video": clip, "concepts": ["cat", "sky"], "progress": False, **change}
        with pytest.raises(ValueError, match=message):
            ours.explain(**arguments)


def test_the_segmentation_benchmark_refuses_a_video_model(pair, tmp_path, capsys):
    from PIL import Image

    from segmentation.__main__ import main

    ours, _ = pair
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    Image.new("RGB", (48, 32)).save(data / "images" / "a.png")
    Image.new("L", (48, 32), 1).save(data / "masks" / "a.png")
    (data / "concepts.json").write_text('{"a.png": ["cat"]}')
    argv = ["run", "--dataset", "folder", "--data", str(data), "--model", ours.source, "--out", str(tmp_path / "out"),
            "--device", "cpu", "--layers", "all", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "is a CogVideoX (video) model" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_missing_scheduler_is_said_before_any_weights_load(pair, tmp_path, capsys, monkeypatch):
    import weights
    from concept_attention import main

    ours, _ = pair
    bare = tmp_path / "bare"
    shutil.copytree(ours.source, bare, ignore=shutil.ignore_patterns("scheduler"))

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the snapshot was checked")

    monkeypatch.setattr(weights, "fill", refuse)
    argv = ["generate", "--model", str(bare), "--prompt", "a cat", "--concepts", "cat", "sky", "--frames", "5",
            "--device", "cpu", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    assert "no CogVideoX scheduler" in capsys.readouterr().err
