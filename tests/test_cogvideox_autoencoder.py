"""CogVideoX's 3D causal VAE against diffusers' AutoencoderKLCogVideoX on the same weights (diffusers' save_pretrained
file loaded strictly into ours, no rename), with its frame chunking, and the real checkpoint's names and shapes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from cogvideox.autoencoder import (
    CONFIGS,
    VideoAutoEncoder,
    VideoAutoEncoderConfig,
    decoded_frames,
    frame_chunks,
)
from manifests import manifest_shapes

# fp32 tolerance on the relative error max|ours - reference| / max|reference|: both sides run the same torch kernels
# in the same order, so only summation-order noise remains.
RTOL = 1e-5


def reference_for(config: VideoAutoEncoderConfig):
    from diffusers import AutoencoderKLCogVideoX

    levels = len(config.block_out_channels)
    return AutoencoderKLCogVideoX(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("CogVideoXDownBlock3D",) * levels,
        up_block_types=("CogVideoXUpBlock3D",) * levels,
        block_out_channels=config.block_out_channels,
        latent_channels=config.latent_channels,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        temporal_compression_ratio=config.temporal_compression_ratio,
        scaling_factor=config.scaling_factor,
    ).eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """diffusers' model with random weights (norm affines moved away from 1/0, the output conv scaled so that frames
    span about [-1, 1]), saved with save_pretrained, and ours loaded strictly from that file."""
    config = CONFIGS["tiny"]
    torch.manual_seed(0)
    reference = reference_for(config)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
        reference.decoder.conv_out.conv.weight.mul_(0.3)
    folder = tmp_path_factory.mktemp("cogvideox-vae")
    reference.save_pretrained(folder)
    ours = VideoAutoEncoder(config).eval()
    ours.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True)
    return ours, reference


def relative_error(name: str, ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape, f"{name}: {tuple(ours.shape)} != {tuple(reference.shape)}"
    scale = reference.abs().max().item()
    err = (ours - reference).abs().max().item() / scale
    print(f"{name}: max relative error {err:.2e} (|reference| max {scale:.3f})")
    return err


@pytest.mark.parametrize("frames", [1, 9, 17])
def test_encode_matches_diffusers(pair, frames):
    ours, reference = pair
    torch.manual_seed(frames)
    video = torch.rand(2, 3, frames, 16, 24) * 2 - 1
    with torch.no_grad():
        latents = ours.encode(video)
        expected = reference.config.scaling_factor * reference.encode(video).latent_dist.mean
    assert latents.shape == (2, 16, 1 + (frames - 1) // 4, 2, 3)
    assert relative_error(f"encode {frames} frames", latents, expected) <= RTOL


@pytest.mark.parametrize("latent_frames", [1, 2, 3, 5])
def test_decode_matches_diffusers(pair, latent_frames):
    ours, reference = pair
    torch.manual_seed(latent_frames)
    latents = torch.randn(2, 16, latent_frames, 2, 3)
    with torch.no_grad():
        video = ours.decode(latents)
        expected = reference.decode(1 / reference.config.scaling_factor * latents).sample  # as CogVideoXPipeline
    assert video.shape[2] == decoded_frames(latent_frames, ours.config)
    assert relative_error(f"decode {latent_frames} latent frames", video, expected) <= RTOL


def test_encode_sample_matches_diffusers_posterior(pair):
    ours, reference = pair
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        sample = ours.encode(video, generator=torch.Generator().manual_seed(3))
        posterior = reference.encode(video).latent_dist
        expected = reference.config.scaling_factor * posterior.sample(torch.Generator().manual_seed(3))
        mean = ours.encode(video)
    assert relative_error("encode sample", sample, expected) <= RTOL
    assert (sample - mean).abs().max() > 1e-3  # the sample is not the mean


def test_float64_maths_identical_to_diffusers(pair):
    # In float64 rounding noise is ~1e-15, so any difference in the maths (padding, chunks, interpolation) would show.
    ours, reference = pair
    ours, reference = VideoAutoEncoder(ours.config).double(), reference_for(ours.config).double()
    ours.load_state_dict(reference.state_dict(), strict=True)
    scale = ours.config.scaling_factor
    video = torch.rand(1, 3, 17, 16, 16, dtype=torch.float64) * 2 - 1
    latents = torch.randn(1, 16, 5, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        encode_err = relative_error("encode fp64", ours.encode(video), scale * reference.encode(video).latent_dist.mean)
        decode_err = relative_error("decode fp64", ours.decode(latents), reference.decode(1 / scale * latents).sample)
    assert encode_err <= 1e-12 and decode_err <= 1e-12


def test_chunking_is_part_of_the_maths(pair):
    """One encoder call over all 17 frames is another function: GroupNorm statistics are per chunk of frames."""
    ours, reference = pair
    whole = VideoAutoEncoder(replace(ours.config, encode_chunk_frames=32)).eval()
    whole.load_state_dict(ours.state_dict())
    video = torch.rand(1, 3, 17, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = reference.encode(video).latent_dist.mean
        assert relative_error("encode without chunks", whole.encode_moments(video).chunk(2, 1)[0], expected) > 1e-3


def test_safe_conv_chunks_give_the_same_result(pair, monkeypatch):
    """diffusers' memory split (3D convs over overlapping chunks of frames past 2**30 elements), forced small."""
    import cogvideox.autoencoder as module

    ours, reference = pair
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    latents = torch.randn(1, 16, 3, 2, 2)
    with torch.no_grad():
        expected_latents, expected_video = ours.encode(video), ours.decode(latents)
        monkeypatch.setattr(module, "SAFE_CONV_ELEMENTS", 20_000)  # 2 or 3 parts for the largest convs
        assert relative_error("encode, split convs", ours.encode(video), expected_latents) <= RTOL
        assert relative_error("decode, split convs", ours.decode(latents), expected_video) <= RTOL


def test_frame_chunks():
    spans = lambda n, c: [(s.start, s.stop) for s in frame_chunks(n, c)]  # noqa: E731
    assert spans(17, 8) == [(0, 9), (9, 17)]
    assert spans(49, 8) == [(0, 9)] + [(i, i + 8) for i in range(9, 49, 8)]
    assert spans(5, 8) == [(0, 13)]  # one chunk: the slice stops past the end
    assert spans(13, 2) == [(0, 3)] + [(i, i + 2) for i in range(3, 13, 2)]
    assert [decoded_frames(n, CONFIGS["cogvideox"]) for n in (1, 2, 3, 5, 13)] == [1, 8, 9, 17, 49]


def test_real_config_matches_diffusers_names_and_shapes():
    """The 2B/5B network (vae/config.json) has exactly diffusers' tensor names and shapes, as in the manifest."""
    from diffusers import AutoencoderKLCogVideoX

    config = CONFIGS["cogvideox"]
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in VideoAutoEncoder(config).state_dict().items()}
        reference = AutoencoderKLCogVideoX(
            block_out_channels=(128, 256, 256, 512),
            latent_channels=16,
            layers_per_block=3,
            norm_num_groups=32,
            norm_eps=1e-6,
            temporal_compression_ratio=4,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    expected = {k: list(v.shape) for k, v in reference.state_dict().items()}
    assert ours == expected
    assert ours == manifest_shapes("cogvideox-vae.tsv")
    assert CONFIGS["cogvideox-2b"].scaling_factor == 1.15258426 and CONFIGS["cogvideox-5b"].scaling_factor == 0.7
    real = {"block_out_channels": [128, 256, 256, 512], "layers_per_block": 3, "scaling_factor": 0.7}
    assert VideoAutoEncoderConfig.from_diffusers(real) == CONFIGS["cogvideox-5b"]


def test_bad_inputs_are_refused_in_one_line():
    model = VideoAutoEncoder(CONFIGS["tiny"])
    cases = [
        ((1, 3, 10, 16, 16), "takes 1 \\+ 4k frames .*got 10: use 9 or 13"),
        ((1, 3, 0, 16, 16), "got 0: use 1"),
        ((1, 3, 9, 20, 16), "height 20 is not a multiple of the VAE's factor 8: use 16 or 24"),
        ((1, 3, 9, 16, 4), "width 4 .*: use 8"),
        ((3, 9, 16, 16), "takes videos"),
    ]
    for shape, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            model.encode(torch.zeros(shape))
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="latents \\(B, 16, T, h, w\\)"):
        model.decode(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        replace(CONFIGS["tiny"], norm_num_groups=12)
    with pytest.raises(ValueError, match="power of 2"):
        replace(CONFIGS["tiny"], temporal_compression_ratio=3)
    with pytest.raises(ValueError, match="use_quant_conv"):
        VideoAutoEncoderConfig.from_diffusers({"use_quant_conv": True})
