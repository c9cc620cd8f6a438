"""Tests for models.scheduler: the PixArt-LCM scheduler configuration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler

from models.scheduler import (
    ORIGINAL_REPO_4_STEP_TIMESTEPS,
    PIXART_LCM_SCHEDULER_CONFIG,
    is_pixart_lcm_scheduler,
    pixart_lcm_scheduler,
)

# Values from PixArt-alpha/PixArt-LCM-XL-2-1024-MS scheduler/scheduler_config.json.
EXPECTED_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "original_inference_steps": 50,
    "timestep_spacing": "leading",
    "set_alpha_to_one": True,
    "clip_sample": False,
    "timestep_scaling": 10.0,
    "steps_offset": 0,
}


def test_constant_matches_release() -> None:
    """The constant carries exactly the released scheduler configuration."""
    assert EXPECTED_CONFIG == PIXART_LCM_SCHEDULER_CONFIG


@pytest.mark.parametrize(("key", "value"), sorted(EXPECTED_CONFIG.items()))
def test_scheduler_config_values(key: str, value: object) -> None:
    """Every released setting reaches the scheduler's config."""
    scheduler = pixart_lcm_scheduler()
    assert isinstance(scheduler, LCMScheduler)
    assert scheduler.config[key] == value


def test_default_4_step_timesteps_use_diffusers_leading_spacing() -> None:
    """diffusers' leading spacing over the 50-step skeleton gives 999, 759, 499, 259."""
    scheduler = pixart_lcm_scheduler()
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]


def test_original_repo_timesteps_can_be_passed() -> None:
    """The original repository's timesteps are accepted verbatim and a step runs on them."""
    assert ORIGINAL_REPO_4_STEP_TIMESTEPS == (999, 759, 519, 279)
    scheduler = pixart_lcm_scheduler()
    scheduler.set_timesteps(timesteps=list(ORIGINAL_REPO_4_STEP_TIMESTEPS))
    assert scheduler.timesteps.tolist() == list(ORIGINAL_REPO_4_STEP_TIMESTEPS)
    sample = torch.zeros(1, 4, 2, 2)
    out = scheduler.step(torch.zeros_like(sample), scheduler.timesteps[0], sample)
    assert out.prev_sample.shape == sample.shape


def test_betas_are_pixart_linear_not_sd_default() -> None:
    """Betas are PixArt's linear 1e-4..0.02, unlike a default LCMScheduler's SD schedule."""
    pixart = pixart_lcm_scheduler()
    default = LCMScheduler()
    expected = np.linspace(0.0001, 0.02, 1000, dtype=np.float32)
    np.testing.assert_allclose(pixart.betas.numpy(), expected, rtol=1e-6)
    assert not torch.allclose(pixart.betas, default.betas)
    assert default.config.beta_schedule == "scaled_linear"


def test_is_pixart_lcm_scheduler() -> None:
    """The checker accepts our scheduler and rejects a default LCMScheduler."""
    assert is_pixart_lcm_scheduler(pixart_lcm_scheduler())
    assert not is_pixart_lcm_scheduler(LCMScheduler())
    assert not is_pixart_lcm_scheduler(object())


def test_each_call_returns_a_fresh_scheduler() -> None:
    """Schedulers hold per-run state, so pipelines must not share one instance."""
    first = pixart_lcm_scheduler()
    second = pixart_lcm_scheduler()
    first.set_timesteps(2)
    assert first is not second
    assert second.num_inference_steps is None
