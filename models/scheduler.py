"""Each PixArt release's sampler, as it ships: LCM for PixArt-LCM (δ), DPM-Solver++ for PixArt-XL-2 (α).

The sampler names here ("lcm", "dpm-solver++") are the ones farm/profiles.py gives each model without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

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


# The scheduler of PixArt-alpha/PixArt-XL-2-1024-MS and -512x512: diffusers' conversion script saved a default
# DPMSolverMultistepScheduler, which is PixArt's own schedule (linear betas 1e-4..0.02, epsilon) with
# DPM-Solver++ of order 2, the solver the original repository samples the base model (and its ControlNet) with.
PIXART_DPM_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "use_karras_sigmas": False,
}

# Sampler name → the diffusers scheduler class that implements it.
SAMPLER_CLASSES: dict[str, str] = {"lcm": "LCMScheduler", "dpm-solver++": "DPMSolverMultistepScheduler"}


def pixart_dpm_scheduler() -> DPMSolverMultistepScheduler:
    """Return a fresh DPMSolverMultistepScheduler with PixArt-XL-2's released configuration."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**dict(PIXART_DPM_SCHEDULER_CONFIG))


def release_scheduler(sampler: str) -> Any:
    """The released configuration of a named sampler ("lcm" or "dpm-solver++")."""
    if sampler == "lcm":
        return pixart_lcm_scheduler()
    if sampler == "dpm-solver++":
        return pixart_dpm_scheduler()
    raise ValueError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLER_CLASSES)}")


def sampler_of(scheduler: Any) -> str | None:
    """The farm's name for a loaded scheduler ("lcm", "dpm-solver++"), or None for any other kind."""
    name = type(scheduler).__name__
    if name == "DPMSolverMultistepScheduler" and scheduler.config.get("algorithm_type") != "dpmsolver++":
        return None
    return next((sampler for sampler, cls in SAMPLER_CLASSES.items() if cls == name), None)
