"""The autoencoder against diffusers' AutoencoderKL (an independent implementation of the same network) and the
checkpoint manifest. Weights go from our BFL names to diffusers names through manifests/ae.bfl-to-diffusers.tsv.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from autoencoder import CONFIGS, AutoEncoder, AutoEncoderConfig
from manifests import manifest_rows

ROOT = Path(__file__).resolve().parents[1]


# fp32 tolerance: both sides run the same torch kernels (conv, group_norm, SDPA) in the same order, so only
# summation-order noise remains; 1e-5 is about 100 float32 ulps at the O(1) magnitudes seen here.
ATOL = 1e-5

# A second 4-level layout: two resnets per encoder level (three per decoder level) and a different width ladder.
WIDER = replace(CONFIGS["tiny"], ch_mult=(1, 1, 2, 4), num_res_blocks=2)


def read_rules() -> list[tuple[str, str, str]]:
    return [(bfl, diffusers, op) for bfl, diffusers, op in manifest_rows("ae.bfl-to-diffusers.tsv")]


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename our BFL state dict to diffusers' AutoencoderKL names with the manifest's prefix rules and operations."""
    rules = read_rules()
    out = {}
    for key, value in state.items():
        matches = [r for r in rules if key.startswith(r[0] + ".")]
        assert len(matches) == 1, f"{key}: {len(matches)} rules match"
        bfl, diffusers, op = matches[0]
        rest = key[len(bfl) :]
        if op == "nin_shortcut->conv_shortcut":
            rest = rest.replace("nin_shortcut", "conv_shortcut")
        elif op.startswith("squeeze") and rest == ".weight":
            value = value[:, :, 0, 0]  # 1x1 conv [C, C, 1, 1] -> linear [C, C]
        else:
            assert op in ("", "squeeze [C,C,1,1]->[C,C]"), f"unknown operation {op!r}"
        out[diffusers + rest] = value
    return out


def reference_for(config: AutoEncoderConfig):
    from diffusers import AutoencoderKL

    levels = len(config.ch_mult)
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_ch,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.ch * m for m in config.ch_mult),
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        norm_num_groups=32,
        scaling_factor=config.scale_factor,
        shift_factor=config.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    ).eval()


def random_pair(config: AutoEncoderConfig):
    """Our model with random weights (GroupNorm affines perturbed away from 1/0) and diffusers' model holding them."""
    torch.manual_seed(0)
    ours = AutoEncoder(config).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
        ours.decoder.conv_out.weight.mul_(0.3)  # outputs then span about [-1, 1], the range of a trained decoder
    reference = reference_for(config)
    reference.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    return ours, reference


def report(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    err = (a - b).abs().max().item()
    print(f"{name}: max abs error {err:.3e} (|reference| max {b.abs().max().item():.3f})")
    return err


def test_flux_config_matches_manifest_rows():
    with torch.device("meta"):
        model = AutoEncoder(CONFIGS["flux"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {name: [int(d) for d in shape.strip("[]").split(",")] for name, shape in manifest_rows("ae.bfl.tsv")}
    assert sorted(ours) == sorted(expected)
    assert ours == expected
    assert sum(v.numel() for v in model.state_dict().values()) == 83_819_683  # checkpoints.md §8


def test_manifest_rules_cover_flux_names():
    with torch.device("meta"):
        model = AutoEncoder(CONFIGS["flux"])
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        reference = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    converted = {k: list(v.shape) for k, v in to_diffusers(model.state_dict()).items()}
    assert converted == {k: list(v.shape) for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("config", [CONFIGS["tiny"], WIDER], ids=["tiny", "wider"])
def test_encode_decode_match_diffusers(config):
    ours, reference = random_pair(config)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    z = torch.randn(2, config.z_channels, 4, 6)
    with torch.no_grad():
        ours_latents = ours.encode(x)
        mean = reference.encode(x).latent_dist.mean
        reference_latents = (mean - config.shift_factor) * config.scale_factor
        ours_images = ours.decode(z)
        reference_images = reference.decode(z / config.scale_factor + config.shift_factor).sample
    assert ours_latents.shape == (2, config.z_channels, 4, 6)
    assert ours_images.shape == (2, 3, 32, 48)
    assert report("encode (mean)", ours_latents, reference_latents) <= ATOL
    assert report("decode", ours_images, reference_images) <= ATOL


def test_float64_maths_identical_to_diffusers():
    # In float64 rounding noise is ~1e-15, so any difference in the maths (padding, scale, norm eps) would show.
    config = CONFIGS["tiny"]
    ours, reference = random_pair(config)
    ours.double()
    reference.double()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64) * 2 - 1
    z = torch.randn(1, config.z_channels, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        mean = reference.encode(x).latent_dist.mean
        encode_err = report("encode fp64", ours.encode(x), (mean - config.shift_factor) * config.scale_factor)
        images = reference.decode(z / config.scale_factor + config.shift_factor).sample
        decode_err = report("decode fp64", ours.decode(z), images)
    assert encode_err <= 1e-12 and decode_err <= 1e-12


def test_encode_sample_matches_diffusers_posterior():
    config = CONFIGS["tiny"]
    ours, reference = random_pair(config)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        sample = ours.encode(x, generator=torch.Generator().manual_seed(3))
        posterior = reference.encode(x).latent_dist
        reference_sample = (
            posterior.sample(torch.Generator().manual_seed(3)) - config.shift_factor
        ) * config.scale_factor
        mean = ours.encode(x)
    assert report("encode (sample)", sample, reference_sample) <= ATOL
    assert (sample - mean).abs().max() > 1e-3  # the sample is not the mean


def test_float16_is_refused():
    model = AutoEncoder(CONFIGS["tiny"]).eval()
    x = torch.zeros(1, 3, 32, 32)
    z = torch.zeros(1, 16, 4, 4)
    with pytest.raises(ValueError, match="float16"):
        model.decode(z.half())
    with pytest.raises(ValueError, match="float16"), torch.autocast("cpu", dtype=torch.float16):
        model.encode(x)
    model.half()
    with pytest.raises(ValueError, match="float16"):
        model.encode(x.half())
    with pytest.raises(ValueError, match="float16"):
        model.decode(z)


def test_bfloat16_runs_close_to_float32_reference():
    ours, reference = random_pair(CONFIGS["tiny"])
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        expected = reference.decode(z / 0.3611 + 0.1159).sample
        images = ours.to(torch.bfloat16).decode(z.bfloat16()).float()
    # bfloat16 keeps 8 mantissa bits (relative step 2^-8 ~ 4e-3); through ~20 layers a few percent of the range.
    assert torch.isfinite(images).all()
    assert report("decode bf16 vs fp32 reference", images, expected) <= 0.05 * expected.abs().max().item()


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by the 32 GroupNorm groups"):
        replace(CONFIGS["tiny"], ch=48)
    with pytest.raises(ValueError, match="ch_mult"):
        replace(CONFIGS["tiny"], ch_mult=())
    with pytest.raises(ValueError, match="num_res_blocks"):
        replace(CONFIGS["tiny"], num_res_blocks=0)
    with pytest.raises(ValueError, match="scale_factor"):
        replace(CONFIGS["tiny"], scale_factor=0.0)
    assert replace(CONFIGS["tiny"], ch_mult=[1, 2]).ch_mult == (1, 2)
    assert CONFIGS["flux"].downsample_factor == 8
    with pytest.raises(Exception, match="cannot assign"):
        CONFIGS["flux"].ch = 64  # frozen


def test_encode_refuses_sizes_not_multiple_of_factor():
    model = AutoEncoder(CONFIGS["tiny"])
    with pytest.raises(ValueError, match="multiple of the autoencoder's factor 8"):
        model.encode(torch.zeros(1, 3, 36, 32))
