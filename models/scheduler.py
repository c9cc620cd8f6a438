"""The LCM scheduler configured with PixArt's noise schedule, as PixArt-LCM-XL-2-1024-MS ships it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import LCMScheduler

# The scheduler_config.json of PixArt-alpha/PixArt-LCM-XL-2-1024-MS. These are spelled out rather than
# relying on LCMScheduler's defaults, which carry Stable Diffusion's scaled_linear 0.00085..0.012 schedule:
# a PixArt transformer sampled on that schedule sees the wrong noise level at every step.
PIXART_LCM_SCHEDULER_CONFIG: dict[str, Any] = {
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

# The original PixArt repository's 4-step LCM timesteps. diffusers' "leading" spacing over the 50-step
# skeleton gives (999, 759, 499, 259) instead; pass these as `timesteps=` when matching the original matters.
ORIGINAL_REPO_4_STEP_TIMESTEPS: tuple[int, ...] = (999, 759, 519, 279)


def pixart_lcm_scheduler() -> LCMScheduler:
    """Return a fresh LCMScheduler with PixArt-LCM's released configuration."""
    from diffusers import LCMScheduler

    # Copy so a caller mutating the constant after import cannot reach schedulers already built.
    return LCMScheduler(**dict(PIXART_LCM_SCHEDULER_CONFIG))


def is_pixart_lcm_scheduler(scheduler: Any) -> bool:
    """Return True when `scheduler` is an LCMScheduler whose config matches PixArt-LCM's."""
    from diffusers import LCMScheduler

    if not isinstance(scheduler, LCMScheduler):
        return False
    config = scheduler.config
    return all(config.get(key) == value for key, value in PIXART_LCM_SCHEDULER_CONFIG.items())
