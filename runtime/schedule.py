"""The noise schedule, from the manifest's float64 betas (docs/bundle.md, Schedule).

Everything is float64; `coef(name, t)` casts one coefficient to float32, which is how a
coefficient meets an image.
"""

import numpy as np

from .errors import BundleError


class Schedule:
    def __init__(self, betas, kind: str = "linear"):
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
            raise BundleError(
                "schedule betas must be a non-empty list of numbers in (0, 1); re-export the bundle"
            )
        self.kind = kind
        self.betas = betas
        self.num_timesteps = int(betas.size)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.concatenate([[1.0], self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # DDPM eq. 7
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.maximum(self.posterior_variance, 1e-20))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

    @classmethod
    def from_manifest(cls, entry: dict) -> "Schedule":
        betas = entry["betas"]
        if not isinstance(betas, list) or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas
        ):
            raise BundleError("schedule betas must be a list of JSON numbers; re-export the bundle")
        return cls(betas, entry.get("kind", "linear"))

    def coef(self, name: str, t: int) -> np.float32:
        """One coefficient at t, taken in float64 and cast to float32."""
        return np.float32(getattr(self, name)[t])

    def q_sample(self, x0: np.ndarray, t: int, noise: np.ndarray) -> np.ndarray:
        """DDPM eq. 4 at one timestep: sqrt(a_t) x0 + sqrt(1 - a_t) noise, in float32."""
        return self.coef("sqrt_alphas_cumprod", t) * x0 + self.coef("sqrt_one_minus_alphas_cumprod", t) * noise

    def timesteps(self, steps: int | None = None, strength: float = 1.0) -> list[int]:
        """`steps` timesteps from T-1 down to 0: round(linspace(T - 1, 0, steps)); all T when None.

        With `strength` < 1 only the last max(1, round(steps * strength)) of them are kept
        (a super-resolution Unet that starts from its noised low-res image)."""
        total = self.num_timesteps
        steps = total if steps is None else steps
        if not 1 <= steps <= total:
            raise ValueError(f"steps must be in [1, {total}], got {steps}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if steps == 1:
            return [total - 1]
        spaced = [int(t) for t in np.round(np.linspace(total - 1, 0, steps)).astype(np.int64)]
        return spaced if strength == 1 else spaced[-max(1, round(steps * strength)):]

    def noise_level_timestep(self, level: float) -> int:
        """int(level * T): the augmentation timestep for a noise level in [0, 1]."""
        return int(self.num_timesteps * level)
