"""A request's sampling settings, every range checked here and nowhere else.

`Settings` is what one request runs with: the bundle's defaults (`Bundle.default_settings`,
checked when the bundle loads) with the request's own values put in by `replace`, each
checked by the `check_*` functions below (ParameterError names the parameter, its limit
and the value). Export checks the defaults it writes with the same functions.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError

# the samplers a bundle may name as its default and a request may ask for (runtime/samplers.py runs them)
SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "euler_a")  # over a discrete schedule
SAMPLER_NAMES += ("ddpm_continuous", "heun_edm")  # over a stage's per-step table (contract/sampling.py)

MAX_SEED = 2**63


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """A finite int or float (NumPy scalars included; bools are not numbers here)."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def check_sampler(value) -> str:
    if not isinstance(value, str) or value not in SAMPLER_NAMES:
        raise ParameterError("sampler", f"one of {', '.join(SAMPLER_NAMES)}", value)
    return value


def check_steps(value, total: int) -> int:
    """Steps of one Unet: None means every one of its `total` timesteps."""
    if value is None:
        return total
    if not is_int(value) or not 1 <= value <= total:
        raise ParameterError("steps", f"None or an integer in [1, {total}] (the schedule's timesteps)", value)
    return int(value)


def check_sr_strength(value) -> float:
    if not is_number(value) or not 0 < value <= 1:
        raise ParameterError("sr_strength", "a number in (0, 1] (1: super-resolution from pure noise)", value)
    return float(value)


def check_guidance_scale(value) -> float:
    if not is_number(value) or value < 0:
        raise ParameterError("guidance_scale", "a finite number >= 0", value)
    return float(value)


def check_guidance_per_unet(value, unets: int) -> float | tuple[float, ...]:
    """A number for every Unet, or a list with one per Unet (a tuple; equal values become one number)."""
    if not isinstance(value, (list, tuple)):
        return check_guidance_scale(value)
    if len(value) != unets:
        raise ParameterError("guidance_scale", f"a number >= 0 or a list of {unets} (one per Unet)", value)
    values = tuple(check_guidance_scale(v) for v in value)
    return values[0] if len(set(values)) == 1 else values


def check_eta(value) -> float:
    if not is_number(value) or not 0 <= value <= 1:
        raise ParameterError("eta", "a number in [0, 1]", value)
    return float(value)


def check_seed(value) -> int | None:
    if value is not None and (not is_int(value) or not 0 <= value < MAX_SEED):
        raise ParameterError("seed", "None or an integer in [0, 2**63)", value)
    return None if value is None else int(value)


def check_steps_per_unet(steps, timesteps: Sequence[int]) -> tuple[int, ...]:
    """An int (or None) for every Unet, or a list with one per Unet."""
    per_unet = list(steps) if isinstance(steps, (list, tuple)) else [steps] * len(timesteps)
    if len(per_unet) != len(timesteps):
        raise ParameterError("steps", f"an integer or a list of {len(timesteps)} (one per Unet)", steps)
    return tuple(check_steps(value, total) for value, total in zip(per_unet, timesteps, strict=True))


@dataclass(frozen=True)
class Settings:
    """What one request samples with. `steps` has one entry per Unet; `guidance_scale` is one number
    for every Unet or a tuple of one per Unet; `seed` None draws one."""

    sampler: str
    steps: tuple[int, ...]
    guidance_scale: float | tuple[float, ...]
    eta: float = 0.0
    sr_strength: float = 1.0
    seed: int | None = None

    def replace(
        self,
        timesteps: Sequence[int],
        *,
        steps=None,
        sampler=None,
        guidance_scale=None,
        eta=None,
        sr_strength=None,
        seed=None,
    ) -> "Settings":
        """These settings with every value that is not None replaced, and checked; `timesteps`
        are the Unets' schedule lengths, the upper limit of their steps."""
        return Settings(
            sampler=self.sampler if sampler is None else check_sampler(sampler),
            steps=self.steps if steps is None else check_steps_per_unet(steps, timesteps),
            guidance_scale=self.guidance_scale
            if guidance_scale is None
            else check_guidance_per_unet(guidance_scale, len(timesteps)),
            eta=self.eta if eta is None else check_eta(eta),
            sr_strength=self.sr_strength if sr_strength is None else check_sr_strength(sr_strength),
            seed=self.seed if seed is None else check_seed(seed),
        )

    def guidance(self, unet: int) -> float:
        """The guidance scale of Unet `unet`."""
        scale = self.guidance_scale
        return scale[unet] if isinstance(scale, tuple) else scale

    def to_info(self) -> dict:
        """The settings as they go into a result's info and PNG metadata."""
        return {
            "sampler": self.sampler,
            "steps": list(self.steps),
            "guidance_scale": list(scale) if isinstance(scale := self.guidance_scale, tuple) else scale,
            "eta": self.eta,
            "sr_strength": self.sr_strength,
        }
