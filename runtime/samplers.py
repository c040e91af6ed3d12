"""Few-step samplers over a discrete schedule, in the style of k-diffusion: each is a short
loop over `timesteps` that calls `denoise(x, t) -> x0` (the guided, thresholded data
prediction) and takes its noise from `noise(shape)`.

Same formulas and noise draws as `imagen.reference.samplers` (docs/bundle.md, Sampling):
every coefficient is computed in float64 from `alphas_cumprod` and cast to float32 before
it multiplies an image; the step after the last timestep goes to alpha_cumprod = 1.
`callback(step_index, t, x)` sees x after every step.
"""

import math
from collections.abc import Callable

import numpy as np

Denoise = Callable[[np.ndarray, int], np.ndarray]
Noise = Callable[[tuple], np.ndarray]


def _f32(value: float) -> np.float32:
    return np.float32(value)


def _pairs(alphas_cumprod: np.ndarray, timesteps: list[int]):
    """(i, t, alpha_cumprod at t, alpha_cumprod at the next timestep, or 1 after the last)."""
    for i, t in enumerate(timesteps):
        a_next = float(alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        yield i, t, float(alphas_cumprod[t]), a_next


def sample_ddpm(
    denoise: Denoise,
    x: np.ndarray,
    alphas_cumprod: np.ndarray,
    timesteps: list[int],
    noise: Noise,
    eta: float = 0.0,
    callback: Callable | None = None,
) -> np.ndarray:
    """Ancestral DDPM over any subset of the timesteps (beta = 1 - a_t / a_s); `eta` is unused."""
    for i, t, a_t, a_s in _pairs(alphas_cumprod, timesteps):
        x0 = denoise(x, t)
        beta = 1.0 - a_t / a_s
        coef1 = beta * math.sqrt(a_s) / (1.0 - a_t)
        coef2 = (1.0 - a_s) * math.sqrt(1.0 - beta) / (1.0 - a_t)
        x = _f32(coef1) * x0 + _f32(coef2) * x
        if i + 1 < len(timesteps):
            variance = beta * (1.0 - a_s) / (1.0 - a_t)
            x = x + _f32(math.exp(0.5 * math.log(max(variance, 1e-20)))) * noise(x.shape)
        if callback is not None:
            callback(i, t, x)
    return x


def sample_ddim(
    denoise: Denoise,
    x: np.ndarray,
    alphas_cumprod: np.ndarray,
    timesteps: list[int],
    noise: Noise,
    eta: float = 0.0,
    callback: Callable | None = None,
) -> np.ndarray:
    """DDIM (Song et al. 2021, eq. 12); eps is re-derived from the thresholded x0."""
    for i, t, a_t, a_s in _pairs(alphas_cumprod, timesteps):
        x0 = denoise(x, t)
        eps = (x - _f32(math.sqrt(a_t)) * x0) / _f32(math.sqrt(1.0 - a_t))
        sigma = eta * math.sqrt((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s))
        x = _f32(math.sqrt(a_s)) * x0 + _f32(math.sqrt(max(1.0 - a_s - sigma**2, 0.0))) * eps
        if sigma > 0 and i + 1 < len(timesteps):
            x = x + _f32(sigma) * noise(x.shape)
        if callback is not None:
            callback(i, t, x)
    return x


def sample_dpmpp_2m(
    denoise: Denoise,
    x: np.ndarray,
    alphas_cumprod: np.ndarray,
    timesteps: list[int],
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callable | None = None,
) -> np.ndarray:
    """DPM-Solver++(2M), data prediction, first order on the first and last step; draws no noise."""

    def lam(a):
        return 0.5 * math.log(a / (1.0 - a))

    x0_prev, h_prev = None, None
    for i, t, a_t, a_s in _pairs(alphas_cumprod, timesteps):
        x0 = denoise(x, t)
        if i + 1 == len(timesteps):
            x = x0
        else:
            h = lam(a_s) - lam(a_t)
            ratio = math.sqrt((1.0 - a_s) / (1.0 - a_t))
            phi = -math.sqrt(a_s) * math.expm1(-h)
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


SAMPLERS: dict[str, Callable] = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}


def run_sampler(
    name: str,
    denoise: Denoise,
    x: np.ndarray,
    alphas_cumprod: np.ndarray,
    timesteps: list[int],
    noise: Noise,
    eta: float = 0.0,
    callback: Callable | None = None,
) -> np.ndarray:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](denoise, x, alphas_cumprod, timesteps, noise, eta, callback)
