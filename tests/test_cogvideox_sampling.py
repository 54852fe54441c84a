"""CogVideoX's samplers against diffusers' CogVideoXDDIMScheduler and CogVideoXDPMScheduler, stepped side by side on
the same model outputs (and, for the stochastic DPM sampler, generators with the same seed), as CogVideoXPipeline
drives them: 50 trailing steps of v-prediction with the real scheduler configs."""

import json
import re

import pytest
import torch

from cogvideox.sampling import NoiseSchedule, ddim_step, dpm_step

diffusers = pytest.importorskip("diffusers")

# scheduler/scheduler_config.json of THUDM/CogVideoX-2b (DDIM, SNR shift 3) and -5b (DPM, SNR shift 1)
REAL = {
    "2b": {"_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
           "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
           "rescale_betas_zero_snr": True, "set_alpha_to_one": True, "snr_shift_scale": 3.0, "steps_offset": 0,
           "timestep_spacing": "trailing"},
    "5b": {"_class_name": "CogVideoXDPMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
           "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
           "rescale_betas_zero_snr": True, "set_alpha_to_one": True, "snr_shift_scale": 1.0, "steps_offset": 0,
           "timestep_spacing": "trailing"},
}  # fmt: skip


def reference(config: dict):
    cls = getattr(diffusers, config["_class_name"])
    return cls(**{k: v for k, v in config.items() if not k.startswith("_")})


@pytest.mark.parametrize("model", ["2b", "5b"])
@pytest.mark.parametrize("num_steps", [50, 7])
def test_steps_equal_diffusers(model, num_steps, tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(REAL[model]))
    schedule = NoiseSchedule.from_file(tmp_path / "scheduler_config.json")
    assert schedule.sampler == ("ddim" if model == "2b" else "dpm")
    ref = reference(REAL[model])
    ref.set_timesteps(num_steps)
    timesteps = schedule.timesteps(num_steps)
    assert timesteps == ref.timesteps.tolist()
    alphas = schedule.alphas_cumprod()
    assert torch.equal(alphas, ref.alphas_cumprod)
    gen = torch.Generator().manual_seed(0)
    x_ours = x_ref = torch.randn(1, 3, 4, 6, 5, generator=gen)
    g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x0_ours = x0_ref = None
    worst = 0.0
    for i, t in enumerate(timesteps):
        v = torch.randn(x_ours.shape, generator=gen)  # stands in for the transformer's output, the same for both
        if schedule.sampler == "ddim":
            x_ours = ddim_step(schedule, alphas, v, t, x_ours, num_steps)
            x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        else:
            back = timesteps[i - 1] if i > 0 else None
            x_ours, x0_ours = dpm_step(schedule, alphas, v, x0_ours, t, back, x_ours, num_steps, g_ours)
            x_ref, x0_ref = ref.step(v, x0_ref, t, back, x_ref, generator=g_ref, return_dict=False)
        worst = max(worst, (x_ours - x_ref).abs().max().item())
    print(f"{model}, {num_steps} steps: max abs difference over the run {worst:.3g}")
    assert worst == 0.0


def test_bad_schedules(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**REAL["2b"], "_class_name": "DDIMScheduler"}))
    with pytest.raises(ValueError, match="not a CogVideoX scheduler"):
        NoiseSchedule.from_file(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not a readable JSON"):
        NoiseSchedule.from_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="is a JSON list"):
        NoiseSchedule.from_file(path)
    for key, value in (("num_train_timesteps", "1000"), ("snr_shift_scale", None), ("beta_start", [0.1])):
        path.write_text(json.dumps({**REAL["2b"], key: value}))
        with pytest.raises(ValueError, match=re.escape(f"scheduler_config.json: {key} = {value!r} is not")):
            NoiseSchedule.from_file(path)
    with pytest.raises(ValueError, match="v_prediction"):
        NoiseSchedule(prediction_type="epsilon")
    with pytest.raises(ValueError, match="num_steps"):
        NoiseSchedule().timesteps(0)
