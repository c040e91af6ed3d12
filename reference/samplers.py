"""Few-step samplers over a discrete schedule, in the style of k-diffusion: each is a short
loop over `timesteps` that calls `denoise(x, t) -> x0` (the guided, thresholded data
prediction) and takes its noise from `noise(shape)`.

Coefficients are computed in float64 from `alphas_cumprod` and cast to float32 before
they touch an image, as the NumPy twins in `imagen.runtime.samplers` do
(docs/bundle.md). The step after the last timestep goes to alpha_cumprod = 1 (no noise),
so every sampler returns a clean image after `len(timesteps)` model calls.
"""

import math
from collections.abc import Callable

import numpy as np
import torch

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")


def spaced_timesteps(num_timesteps: int, steps: int, strength: float = 1.0) -> list[int]:
    """`steps` timesteps evenly spaced from T-1 down to 0 (all of them when steps == T); with
    `strength` < 1 only the last max(1, round(steps * strength)) of them."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if steps == 1:
        return [num_timesteps - 1]
    spaced = [int(t) for t in np.round(np.linspace(num_timesteps - 1, 0, steps)).astype(np.int64)]
    return spaced if strength == 1 else spaced[-max(1, round(steps * strength)):]


def _pairs(alphas_cumprod: np.ndarray, timesteps: list[int]):
    """(t, alpha_cumprod at t, alpha_cumprod at the next timestep, or 1 after the last)."""
    for i, t in enumerate(timesteps):
        a_next = float(alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        yield i, t, float(alphas_cumprod[t]), a_next


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64).to(torch.float32)


def sample_ddpm(denoise: Callable, x: torch.Tensor, alphas_cumprod: np.ndarray, timesteps: list[int],
                noise: Callable, callback: Callable | None = None) -> torch.Tensor:
    """Ancestral DDPM over any subset of the trained timesteps (DDPM eq. 6-7, with the
    step's beta = 1 - a_t / a_s, as in improved DDPM's respacing)."""
    for i, t, a_t, a_s in _pairs(alphas_cumprod, timesteps):
        x0 = denoise(x, t)
        beta = 1.0 - a_t / a_s
        coef1 = beta * math.sqrt(a_s) / (1.0 - a_t)
        coef2 = (1.0 - a_s) * math.sqrt(1.0 - beta) / (1.0 - a_t)
        x = _f32(coef1) * x0 + _f32(coef2) * x
        if i + 1 < len(timesteps):
            variance = beta * (1.0 - a_s) / (1.0 - a_t)
            x = x + _f32(math.exp(0.5 * math.log(max(variance, 1e-20)))) * noise(tuple(x.shape))
        if callback is not None:
            callback(i, t, x)
    return x


def sample_ddim(denoise: Callable, x: torch.Tensor, alphas_cumprod: np.ndarray, timesteps: list[int],
                noise: Callable, eta: float = 0.0, callback: Callable | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12). eps is re-derived from the thresholded x0."""
    for i, t, a_t, a_s in _pairs(alphas_cumprod, timesteps):
        x0 = denoise(x, t)
        eps = (x - _f32(math.sqrt(a_t)) * x0) / _f32(math.sqrt(1.0 - a_t))
        sigma = eta * math.sqrt((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s))
        x = _f32(math.sqrt(a_s)) * x0 + _f32(math.sqrt(max(1.0 - a_s - sigma**2, 0.0))) * eps
        if sigma > 0 and i + 1 < len(timesteps):
            x = x + _f32(sigma) * noise(tuple(x.shape))
        if callback is not None:
            callback(i, t, x)
    return x


def sample_dpmpp_2m(denoise: Callable, x: torch.Tensor, alphas_cumprod: np.ndarray, timesteps: list[int],
                    noise: Callable | None = None, callback: Callable | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) with thresholded data prediction (Lu et al. 2022, alg. 2), first
    order on the first and the last step. No noise is drawn."""
    def lam(a):  # lambda = log(alpha / sigma), half the log-SNR
        return 0.5 * math.log(a / (1.0 - a))

    x0_prev, h_prev = None, None
    for i, t, a_t, a_s in _pairs(alphas_cumprod, timesteps):
        x0 = denoise(x, t)
        if i + 1 == len(timesteps):
            x = x0  # the step to alpha_cumprod = 1 (lambda = inf) lands on the data prediction
        else:
            h = lam(a_s) - lam(a_t)
            ratio = math.sqrt((1.0 - a_s) / (1.0 - a_t))  # sigma_s / sigma_t
            phi = -math.sqrt(a_s) * math.expm1(-h)  # -alpha_s (e^{-h} - 1)
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = _f32(1.0 + 1.0 / (2.0 * r)) * x0 - _f32(1.0 / (2.0 * r)) * x0_prev
            x = _f32(ratio) * x + _f32(phi) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, t, x)
    return x


def run_sampler(name: str, denoise: Callable, x: torch.Tensor, alphas_cumprod: np.ndarray,
                timesteps: list[int], noise: Callable, eta: float = 0.0, callback: Callable | None = None):
    if name == "ddpm":
        return sample_ddpm(denoise, x, alphas_cumprod, timesteps, noise, callback)
    if name == "ddim":
        return sample_ddim(denoise, x, alphas_cumprod, timesteps, noise, eta, callback)
    if name == "dpmpp_2m":
        return sample_dpmpp_2m(denoise, x, alphas_cumprod, timesteps, noise, callback)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
