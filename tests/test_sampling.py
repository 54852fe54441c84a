"""Sampling against diffusers' FlowMatchEulerDiscreteScheduler and FluxPipeline helpers, and BFL's recipes as
written in checkpoints.md §2.6 and §3."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from sampling import (
    check_size,
    denoise,
    euler_step,
    get_noise,
    get_schedule,
    image_ids,
    pack,
    text_ids,
    unpack,
)

SIZES = [(256, 256), (512, 768), (1024, 1024), (768, 1360)]
STEPS = [1, 2, 4, 28]


def flux_pipeline():
    from diffusers import FluxPipeline

    return FluxPipeline


def reference_sigmas(num_steps: int, image_seq_len: int, dev: bool) -> torch.Tensor:
    """The sigmas diffusers' FluxPipeline feeds its scheduler, with the schnell or the dev scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if dev:  # black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:  # black-forest-labs/FLUX.1-schnell scheduler/scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler


@pytest.mark.parametrize("dev", [False, True], ids=["schnell", "dev"])
def test_schedule_matches_diffusers(dev):
    worst = 0.0
    for num_steps in STEPS:
        for height, width in SIZES:
            seq_len = (height // 16) * (width // 16)
            ours = torch.tensor(get_schedule(num_steps, seq_len, shift=dev), dtype=torch.float64)
            reference = reference_sigmas(num_steps, seq_len, dev).sigmas.double()
            assert ours.shape == reference.shape == (num_steps + 1,)
            worst = max(worst, (ours - reference).abs().max().item())
    print(f"{'dev' if dev else 'schnell'} schedule: max abs error {worst:.3e}")
    assert worst <= 1e-6  # diffusers computes in float32 (eps 1.2e-7); ours in float64


def test_schedule_known_values():
    assert get_schedule(4, 4096) == [1.0, 0.75, 0.5, 0.25, 0.0]  # checkpoints.md §3
    shifted = get_schedule(4, 4096, shift=True)
    # mu(4096 tokens) = 1.15: t' = e^1.15 / (e^1.15 + 1/t - 1); at t = 0.5 that is e^1.15 / (e^1.15 + 1).
    assert shifted[2] == pytest.approx(np.exp(1.15) / (np.exp(1.15) + 1.0), abs=1e-12)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert all(a > b for a, b in pairwise(shifted))
    with pytest.raises(ValueError, match="num_steps"):
        get_schedule(0, 256)


def velocity(img: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear stand-in for the transformer, depending on both the latents and the time."""
    return torch.sin(3 * img) * (1 + t.reshape(-1, 1, 1)) - img


def test_one_euler_step_matches_scheduler_step():
    scheduler = reference_sigmas(4, 1024, dev=True)
    img = torch.randn(2, 64, 64)
    sigma = scheduler.sigmas
    v = velocity(img, sigma[:1].expand(2))
    expected = scheduler.step(v, scheduler.timesteps[0], img).prev_sample
    ours = euler_step(img, v, sigma[0].item(), sigma[1].item())
    err = (ours - expected).abs().max().item()
    print(f"one Euler step: max abs error {err:.3e}")
    assert err <= 1e-6  # same float32 arithmetic; only the float64 -> float32 rounding of dt could differ


@pytest.mark.parametrize("dev", [False, True], ids=["schnell", "dev"])
def test_denoise_matches_scheduler_loop(dev):
    height, width, num_steps = 128, 192, 6
    seq_len = (height // 16) * (width // 16)
    img = pack(get_noise(2, height, width, seed=5))
    scheduler = reference_sigmas(num_steps, seq_len, dev)
    expected = img.clone()
    for timestep in scheduler.timesteps:
        t = (timestep / 1000).expand(2)  # the pipeline's `timestep / 1000`
        expected = scheduler.step(velocity(expected, t), timestep, expected).prev_sample
    seen = []

    def velocity_fn(x: torch.Tensor, t_vec: torch.Tensor) -> torch.Tensor:
        seen.append(t_vec.clone())  # callers collect side outputs in their own closure
        return velocity(x, t_vec)

    schedule = get_schedule(num_steps, seq_len, shift=dev)
    ours = denoise(velocity_fn, img, schedule)
    err = (ours - expected).abs().max().item()
    print(f"{num_steps}-step denoise ({'dev' if dev else 'schnell'}): max abs error {err:.3e}")
    assert err <= 1e-5  # float32 sigmas (diffusers) vs float64 times (ours) differ by ~1e-7 per step
    assert len(seen) == num_steps
    assert all(t.shape == (2,) and t.dtype == torch.float32 for t in seen)
    assert torch.allclose(torch.stack([t[0] for t in seen]).double(), torch.tensor(schedule[:-1], dtype=torch.float64))


def test_denoise_keeps_dtype_and_shows_progress(capsys):
    img = (torch.arange(256.0).reshape(1, 4, 64) / 8 - 16).bfloat16()  # multiples of 1/8: x - 0.5 is exact in bf16
    out = denoise(lambda x, t: torch.ones_like(x), img, [1.0, 0.5, 0.0], progress=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, img - 1)  # two steps of dt = -0.5 with a unit velocity
    assert "denoising" in capsys.readouterr().err


@pytest.mark.parametrize("height, width", [(32, 32), (64, 96), (1024, 768)])
def test_pack_matches_diffusers_and_unpack_inverts_it(height, width):
    pipeline = flux_pipeline()
    z = torch.randn(2, 16, height // 8, width // 8)
    tokens = pack(z)
    assert tokens.shape == (2, (height // 16) * (width // 16), 64)
    assert torch.equal(tokens, pipeline._pack_latents(z, 2, 16, height // 8, width // 8))
    assert torch.equal(unpack(tokens, height, width), z)
    assert torch.equal(unpack(tokens, height, width), pipeline._unpack_latents(tokens, height, width, 8))
    # checkpoints.md §2.6: token r * (w/2) + c holds channel c*4 + ph*2 + pw of latent pixel (2r + ph, 2c + pw).
    r, c, ch, ph, pw = 1, 0, 5, 1, 0
    assert tokens[0, r * (width // 16) + c, ch * 4 + ph * 2 + pw] == z[0, ch, 2 * r + ph, 2 * c + pw]


@pytest.mark.parametrize("height, width", [(32, 64), (512, 768)])
def test_ids_match_diffusers(height, width):
    reference = flux_pipeline()._prepare_latent_image_ids(3, height // 16, width // 16, "cpu", torch.float32)
    ids = image_ids(3, height, width)
    assert ids.shape == (3, (height // 16) * (width // 16), 3) and ids.dtype == torch.float32
    assert all(torch.equal(ids[b], reference) for b in range(3))
    assert ids[0, width // 16].tolist() == [0.0, 1.0, 0.0]  # the second row starts after one row of tokens
    txt = text_ids(2, 7)
    assert txt.shape == (2, 7, 3) and not txt.any()


def test_check_size():
    check_size(16, 16)
    check_size(1024, 768)
    with pytest.raises(ValueError, match="height 1000 is not a multiple of 16; nearest valid: 992 or 1008"):
        check_size(1000, 1024)
    with pytest.raises(ValueError, match="width 520 .* 512 or 528"):
        check_size(512, 520)
    for bad in (0, -16, 8):
        with pytest.raises(ValueError, match="smallest valid size is 16"):
            check_size(bad, 64)
    for bad in (64.0, True, "64"):
        with pytest.raises(ValueError, match="must be an int"):
            check_size(64, bad)
    for refusing in (lambda: get_noise(1, 1000, 1024, 0), lambda: image_ids(1, 1000, 1024)):
        with pytest.raises(ValueError, match="992 or 1008"):
            refusing()
    with pytest.raises(ValueError, match="multiple of 16"):
        unpack(torch.zeros(1, 4, 64), 40, 32)


def test_get_noise_is_seeded_and_shaped():
    noise = get_noise(2, 64, 96, seed=7)
    assert noise.shape == (2, 16, 8, 12) and noise.dtype == torch.float32
    assert torch.equal(noise, get_noise(2, 64, 96, seed=7))
    assert not torch.equal(noise, get_noise(2, 64, 96, seed=8))
    # diffusers' FluxPipeline with a seeded CPU generator draws the same latents.
    from diffusers.utils.torch_utils import randn_tensor

    reference = randn_tensor((2, 16, 8, 12), generator=torch.Generator("cpu").manual_seed(7), dtype=torch.float32)
    assert torch.equal(noise, reference)
    # BFL's recipe (checkpoints.md §3): randn in bfloat16 on a seeded CPU generator.
    bfl = torch.randn(2, 16, 8, 12, dtype=torch.bfloat16, generator=torch.Generator("cpu").manual_seed(7))
    ours_bf16 = get_noise(2, 64, 96, seed=7, dtype=torch.bfloat16)
    assert ours_bf16.dtype == torch.bfloat16 and torch.equal(ours_bf16, bfl)
    assert torch.equal(noise.bfloat16(), bfl)  # the float32 draw is the unrounded version of BFL's
    assert get_noise(1, 16, 16, seed=0, device="meta").device.type == "meta"
