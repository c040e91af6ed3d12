"""The noise schedule, from the manifest's float64 betas (docs/bundle.md, Schedule).

Everything is float64 (the cumulative product as the manifest gives it, where it does);
`coef(name, t)` casts one coefficient to float32, which is how a coefficient meets an image. The
array-API twin of `imagen.reference.diffusion.GaussianDiffusion` for what sampling needs:
`q_sample`, `predict_start_from_noise`, `noise_level_timestep` (the timesteps themselves come from
`samplers.spaced_timesteps`).
"""

import numpy as np

from .errors import BundleError


class Schedule:
    def __init__(self, betas, alphas_cumprod=None):
        try:
            betas = np.asarray(betas, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):  # strings, nested lists, ints too large for a float
            betas = np.asarray([np.nan])
        if (
            betas.ndim != 1
            or betas.size < 1
            or not np.all(np.isfinite(betas))
            or np.any(betas <= 0)
            or np.any(betas >= 1)
        ):
            raise BundleError("schedule betas must be a non-empty list of numbers in (0, 1); re-export the bundle")
        self.betas = betas
        self.num_timesteps = int(betas.size)
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        if alphas_cumprod is not None:  # as the model's library took them (diffusers: float32, torch's cumprod)
            given = np.asarray(alphas_cumprod, dtype=np.float64)
            if given.shape != betas.shape or not np.all((given > 0) & (given < 1)):
                raise BundleError("schedule alphas_cumprod must hold one number in (0, 1) per beta; re-export")
            self.alphas_cumprod = given
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

    def coef(self, name: str, t: int) -> np.float32:
        """One coefficient at t, taken in float64 and cast to float32."""
        return np.float32(getattr(self, name)[t])

    def _scalar(self, name: str, t: int) -> float:
        """coef(name, t) as a Python float, which arrays of any namespace take as a float32 scalar."""
        return float(self.coef(name, t))

    def q_sample(self, x0, t: int, noise):
        """DDPM eq. 4 at one timestep: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, in float32 (arrays of
        any array API namespace)."""
        return self._scalar("sqrt_alphas_cumprod", t) * x0 + self._scalar("sqrt_one_minus_alphas_cumprod", t) * noise

    def predict_start_from_noise(self, x_t, t: int, noise):
        """Inverts q_sample for x0 given the predicted noise (DDPM eq. 15), in float32."""
        recip, recipm1 = self._scalar("sqrt_recip_alphas_cumprod", t), self._scalar("sqrt_recipm1_alphas_cumprod", t)
        return recip * x_t - recipm1 * noise

    def noise_level_timestep(self, level: float) -> int:
        """int(level * T): the timestep of a noise level in [0, 1] (the low-res augmentation's)."""
        return int(level * self.num_timesteps)
