"""CogVideoX's samplers: v-prediction DDIM (2B) and the stochastic DPM-Solver++ (2M) (5B), on a noise schedule with
the SNR shift and a zero terminal SNR, over "trailing" timesteps.

Follows diffusers' `CogVideoXDDIMScheduler` and `CogVideoXDPMScheduler` (which the tests step side by side with these
functions) as `CogVideoXPipeline` drives them; differs in:
- the schedule is a small frozen dataclass (`NoiseSchedule`) read from `scheduler/scheduler_config.json`, and a step is
  a free function of (model output, timestep, sample): no hidden step counter;
- the DPM sampler's noise comes from the caller's generator in exactly diffusers' order (one draw per step, and a
  second one, which replaces the first, on every second-order step), so that a seed gives diffusers' video.

Notable features: the cumulative alphas are float64 like diffusers' (its scaled-linear betas are built in float64) and
enter each step as 0-dim tensors, so the update rounds as diffusers' does.

Shape letters: B batch, F latent frames, Z latent channels (16), h, w latent height and width.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SAMPLERS = ("ddim", "dpm")


@dataclass(frozen=True)
class NoiseSchedule:
    """scheduler_config.json's fields that the sampling uses (the real files: scaled-linear betas 0.00085..0.012 over
    1000 steps, v-prediction, zero terminal SNR, trailing spacing; SNR shift 3.0 for 2B, 1.0 for 5B)."""

    sampler: str = "ddim"  # "ddim" (CogVideoXDDIMScheduler) or "dpm" (CogVideoXDPMScheduler)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_shift_scale: float = 3.0
    rescale_betas_zero_snr: bool = True
    set_alpha_to_one: bool = True
    prediction_type: str = "v_prediction"
    timestep_spacing: str = "trailing"

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r}: choose one of {SAMPLERS}")
        if self.prediction_type != "v_prediction" or self.timestep_spacing != "trailing":
            raise ValueError(
                f"prediction_type {self.prediction_type!r} and timestep_spacing {self.timestep_spacing!r}: CogVideoX "
                "uses v_prediction and trailing"
            )
        if not (0 < self.beta_start < self.beta_end < 1) or self.num_train_timesteps < 2 or self.snr_shift_scale <= 0:
            raise ValueError(f"an impossible noise schedule: {self}")

    @classmethod
    def from_file(cls, path: str | Path) -> NoiseSchedule:
        """From a snapshot's scheduler/scheduler_config.json; the class name picks the sampler."""
        from weights.configs import config_from_json  # its values checked against the fields' types, by name

        path = Path(path)
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{path} is not a readable JSON file ({error}); replace it with an intact copy") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} is a JSON {type(config).__name__}, not an object of settings; replace it")
        sampler = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}.get(config.get("_class_name"))
        if sampler is None:
            raise ValueError(f"{path}: scheduler {config.get('_class_name')!r} is not a CogVideoX scheduler")
        if config.get("beta_schedule", "scaled_linear") != "scaled_linear":
            raise ValueError(f"{path}: beta_schedule {config['beta_schedule']!r}; CogVideoX uses scaled_linear")
        return config_from_json(cls, {**config, "sampler": sampler}, str(path))

    def alphas_cumprod(self) -> Tensor:
        """(num_train_timesteps,) float64: scaled-linear betas, SNR shifted by snr_shift_scale (as SD3 shifts), then
        rescaled to a zero terminal SNR (Lin et al. 2023, Algorithm 1) when asked."""
        n = self.num_train_timesteps
        betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod = alphas_cumprod / (self.snr_shift_scale + (1 - self.snr_shift_scale) * alphas_cumprod)
        if self.rescale_betas_zero_snr:
            root = alphas_cumprod.sqrt()
            first, last = root[0].clone(), root[-1].clone()
            root = (root - last) * (first / (first - last))
            alphas_cumprod = root**2
        return alphas_cumprod

    def timesteps(self, num_steps: int) -> list[int]:
        """ "trailing" spacing: round(arange(T, 0, -T/num_steps)) - 1, from T - 1 down."""
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_steps must lie in 1 .. {self.num_train_timesteps}, got {num_steps}")
        ratio = self.num_train_timesteps / num_steps
        return (np.round(np.arange(self.num_train_timesteps, 0, -ratio)).astype(np.int64) - 1).tolist()


def alphas_at(schedule: NoiseSchedule, alphas_cumprod: Tensor, t: int, num_steps: int) -> tuple[Tensor, Tensor]:
    """The cumulative alphas at t and at the step below it (1 past the end when set_alpha_to_one), 0-dim float64."""
    prev = t - schedule.num_train_timesteps // num_steps
    final = torch.tensor(1.0, dtype=torch.float64) if schedule.set_alpha_to_one else alphas_cumprod[0]
    return alphas_cumprod[t], alphas_cumprod[prev] if prev >= 0 else final


def predicted_x0(v: Tensor, x: Tensor, alpha: Tensor) -> Tensor:
    """v-prediction -> the clean sample: sqrt(a) x - sqrt(1 - a) v."""
    return alpha**0.5 * x - (1 - alpha) ** 0.5 * v


def ddim_step(schedule: NoiseSchedule, alphas_cumprod: Tensor, v: Tensor, t: int, x: Tensor, num_steps: int) -> Tensor:
    """One deterministic DDIM step (eta 0) from timestep t, as CogVideoXDDIMScheduler.step."""
    alpha, alpha_prev = alphas_at(schedule, alphas_cumprod, t, num_steps)
    x0 = predicted_x0(v, x, alpha)
    a = ((1 - alpha_prev) / (1 - alpha)) ** 0.5
    b = alpha_prev**0.5 - alpha**0.5 * a
    return a * x + b * x0


def dpm_step(schedule: NoiseSchedule, alphas_cumprod: Tensor, v: Tensor, previous_x0: Tensor | None, t: int,
             t_back: int | None, x: Tensor, num_steps: int,
             generator: torch.Generator | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One SDE-DPM-Solver++ step from timestep t, as CogVideoXDPMScheduler.step: first order on the first and the last
    step, else second order with the clean sample predicted one step before (`previous_x0`, at `t_back`).
    Returns (the next sample, this step's predicted clean sample)."""
    alpha, alpha_prev = alphas_at(schedule, alphas_cumprod, t, num_steps)
    x0 = predicted_x0(v, x, alpha)
    lam, lam_prev = (alpha / (1 - alpha)) ** 0.5, (alpha_prev / (1 - alpha_prev)) ** 0.5
    h = lam_prev.log() - lam.log()  # the step in log-SNR / 2
    keep = ((1 - alpha_prev) / (1 - alpha)) ** 0.5 * (-h).exp()
    toward = (-2 * h).expm1() * alpha_prev**0.5
    noise_scale = (1 - alpha_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    last = t - schedule.num_train_timesteps // num_steps < 0
    if previous_x0 is None or last or t_back is None:
        return keep * x - toward * x0 + noise_scale * noise, x0
    lam_back = (alphas_cumprod[t_back] / (1 - alphas_cumprod[t_back])) ** 0.5
    r = (lam.log() - lam_back.log()) / h
    d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous_x0
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)  # drawn again, as diffusers does
    return keep * x - toward * d + noise_scale * noise, x0
