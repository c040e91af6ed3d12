"""Gaussian diffusion: the noise schedule and the closed forms of DDPM (Ho et al., 2020).

Buffers are float64; a coefficient taken at t is cast to the image dtype before it
touches an image, so the reference and the NumPy runtime compute the same float32 math
(docs/bundle.md).
"""

import math

import numpy as np
import torch
from torch import nn


def make_betas(kind: str, timesteps: int) -> np.ndarray:
    """float64 betas for `kind` 'linear' (MinImagen's, scaled by 1000/T) or 'cosine' (Nichol & Dhariwal)."""
    if not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")
    if kind == "linear":
        scale = 1000 / timesteps
        betas = np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)
        if betas[-1] >= 1:
            raise ValueError(
                f"the linear schedule needs timesteps > 20 (beta_T = {betas[-1]:.3f} >= 1 "
                f"at timesteps={timesteps}); use more timesteps or --schedule cosine"
            )
        return betas
    if kind == "cosine":
        s = 0.008
        steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
        f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return np.clip(1 - f[1:] / f[:-1], 0, 0.999)
    raise ValueError(f"unknown schedule {kind!r}; choose 'linear' or 'cosine'")


class GaussianDiffusion(nn.Module):
    """The schedule's float64 buffers and DDPM's closed forms. The torch twin of
    `imagen.runtime.schedule.Schedule` for `q_sample`, `predict_start_from_noise` and
    `noise_level_timestep`, where `t` is an int (one timestep for the batch, as in sampling) or
    a (b,) tensor (one per sample, as in training)."""

    def __init__(self, *, timesteps: int, schedule: str = "linear", betas: np.ndarray | None = None):
        super().__init__()
        self.num_timesteps = timesteps
        self.schedule = schedule
        betas = make_betas(schedule, timesteps) if betas is None else np.asarray(betas, dtype=np.float64)
        self.betas_array = betas
        betas = torch.from_numpy(betas)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = nn.functional.pad(alphas_cumprod[:-1], (1, 0), value=1.0)

        def register(name, value):
            self.register_buffer(name, value.to(torch.float64), persistent=False)

        register("betas", betas)
        register("alphas_cumprod", alphas_cumprod)
        register("alphas_cumprod_prev", alphas_cumprod_prev)
        register("sqrt_alphas_cumprod", alphas_cumprod.sqrt())
        register("sqrt_one_minus_alphas_cumprod", (1.0 - alphas_cumprod).sqrt())
        register("sqrt_recip_alphas_cumprod", (1.0 / alphas_cumprod).sqrt())
        register("sqrt_recipm1_alphas_cumprod", (1.0 / alphas_cumprod - 1).sqrt())
        # DDPM eq. 7: variance and mean coefficients of q(x_{t-1} | x_t, x_0). Sampling does not
        # use them (the samplers derive a respaced step's coefficients themselves); they stay so
        # that this module keeps MinImagen's GaussianDiffusion buffers and `q_posterior`, which
        # the tests check against DDPM's equations. The runtime has no copy of them.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        register("posterior_variance", posterior_variance)
        # Clipped because the posterior variance is 0 at t = 0.
        register("posterior_log_variance_clipped", posterior_variance.clamp(min=1e-20).log())
        register("posterior_mean_coef1", betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod))
        register("posterior_mean_coef2", (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod))

    @staticmethod
    def _extract(a: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """a[t] in x's dtype, shaped to broadcast over x: (b, 1, 1, 1) for a (b,) tensor t,
        (1, 1, 1, 1) for an int t."""
        value = a[t.long()] if isinstance(t, torch.Tensor) else a[int(t)]
        return value.to(x.dtype).reshape(-1, *((1,) * (x.ndim - 1)))

    def noise_level_timestep(self, level: float) -> int:
        """int(level * T): the timestep of a noise level in [0, 1] (the low-res augmentation's, as MinImagen)."""
        return int(level * self.num_timesteps)

    def sample_random_times(
        self, batch: int, generator: torch.Generator | None = None, device=None, max_level: float = 1.0
    ):
        """Uniform integer times in [0, max(1, int(max_level * T)))."""
        high = max(1, int(max_level * self.num_timesteps))
        return torch.randint(0, high, (batch,), generator=generator, device=device)

    def q_sample(self, x0, t, noise):
        """DDPM eq. 4: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_start_from_noise(self, x_t, t, noise):
        """Inverts q_sample for x0 given the predicted noise (DDPM eq. 15)."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * noise
        )

    def q_posterior(self, x0, x_t, t):
        """DDPM eqs. 6-7: mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x0
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return (
            mean,
            self._extract(self.posterior_variance, t, x_t),
            self._extract(self.posterior_log_variance_clipped, t, x_t),
        )
