"""Few-step samplers over a discrete schedule, in the style of k-diffusion: each is a short
loop over `timesteps` that calls `denoise(x, t) -> x0` (the guided, thresholded data
prediction), takes its noise from `noise(shape)` and lets `callback(i, t, x)` see x after step i.

Coefficients are computed in float64 from `alphas_cumprod` and cast to float32 once, at the top
of each step, before they touch an image (docs/bundle.md, Sampling). The step after the last
timestep goes to alpha_cumprod = 1 (no noise), so every sampler returns a clean image after
`len(timesteps)` model calls.

The array-API twin of `imagen.reference.samplers` (torch): same names, formulas, order of float32
operations and noise draws. Keep the two files line for line alike (docs/bundle.md, Twins). The
images may be arrays of any array API namespace (NumPy, CuPy, ...): the samplers add and multiply
them by Python floats, and take the exponential of a learned log-variance through the array's own
namespace, so they stay in their namespace and on their device.
"""

import math
from collections.abc import Callable

import numpy as np

from .arrays import namespace

Array = object  # an array of any array API namespace (numpy.ndarray, cupy.ndarray, ...)
Denoise = Callable[[Array, int], Array]  # (x, t) -> x0
Noise = Callable[[tuple], Array]  # shape -> standard normal float32 draws


def _f32(value: float) -> float:
    """A float64 coefficient rounded to float32: the only way a coefficient meets an image. It is
    returned as a Python float, which a float32 array of any namespace takes as a float32 scalar."""
    return float(np.float32(value))


def spaced_timesteps(
    num_timesteps: int, steps: int, strength: float = 1.0, spacing: str = "linspace", offset: int = 0
) -> list[int]:
    """`steps` timesteps from high to low. `linspace` (this project's rule): evenly spaced from T-1
    down to 0, round(linspace(T - 1, 0, steps)) (all T when steps == T). diffusers' rules: `leading`,
    k * (T // steps) for k = steps - 1 .. 0, plus `offset` (DeepFloyd IF: 100 steps of 1000 walk 990
    .. 0); `trailing`, round(arange(T, 0, -T / steps)) - 1. With `strength` < 1 only the last
    max(1, round(steps * strength)) are kept: a super-resolution Unet that starts from its noised
    upsampled input, like img2img's strength."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if spacing == "leading":
        spaced = [int(k * (num_timesteps // steps)) + offset for k in range(steps - 1, -1, -1)]
    elif spacing == "trailing":
        spaced = [int(t) - 1 for t in np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(np.int64)]
    elif spacing != "linspace":
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose linspace, leading or trailing")
    elif steps == 1:
        spaced = [num_timesteps - 1]
    else:
        spaced = [int(t) for t in np.round(np.linspace(num_timesteps - 1, 0, steps)).astype(np.int64)]
    return spaced if strength == 1 else spaced[-max(1, round(steps * strength)) :]


def _pairs(alphas_cumprod: np.ndarray, timesteps: list[int]):
    """(i, t, alpha_cumprod at t, alpha_cumprod at the next timestep, or 1 after the last), in float64."""
    for i, t in enumerate(timesteps):
        a_next = float(alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        yield i, t, float(alphas_cumprod[t]), a_next


def _half_log_snr(a: float) -> float:
    """lambda = log(alpha / sigma), half the log-SNR (DPM-Solver's time variable)."""
    return 0.5 * math.log(a / (1.0 - a))


def sample_ddpm(
    denoise: Denoise,
    x: Array,
    alphas_cumprod: np.ndarray,
    timesteps: list[int],
    noise: Noise,
    eta: float = 0.0,
    callback: Callable | None = None,
) -> Array:
    """Ancestral DDPM over any subset of the trained timesteps: DDPM eq. 6-7 with the step's
    beta = 1 - a_t / a_s, as in improved DDPM's respacing (exactly DDPM with all T timesteps).
    `eta` is ignored (the noise is always the posterior's). A denoiser whose Unet learns its variance
    (`denoise.variance`, set by each call: v in [-1, 1]) gets improved DDPM's learned range, the log
    variance frac log beta + (1 - frac) log beta_tilde with frac = (v + 1) / 2, per pixel."""
    for i, t, a_t, a_s in _pairs(alphas_cumprod, timesteps):
        beta = 1.0 - a_t / a_s
        variance = max(beta * (1.0 - a_s) / (1.0 - a_t), 1e-20)  # beta tilde, DDPM eq. 7, clipped for its log
        c1 = _f32(beta * math.sqrt(a_s) / (1.0 - a_t))  # the posterior mean is c1 * x0 + c2 * x_t (eq. 7)
        c2 = _f32((1.0 - a_s) * math.sqrt(1.0 - beta) / (1.0 - a_t))
        c3 = _f32(math.exp(0.5 * math.log(variance)))  # its std, from the clipped log variance
        x0 = denoise(x, t)
        x = c1 * x0 + c2 * x
        if i + 1 < len(timesteps):  # the last step goes to alpha_cumprod = 1 and adds no noise
            learned = getattr(denoise, "variance", None)
            if learned is None:
                x = x + c3 * noise(tuple(x.shape))
            else:
                frac = (learned + 1.0) / 2.0
                log_variance = frac * _f32(math.log(beta)) + (1.0 - frac) * _f32(math.log(variance))
                x = x + namespace(x).exp(0.5 * log_variance) * noise(tuple(x.shape))
        if callback is not None:
            callback(i, t, x)
    return x


def sample_ddim(
    denoise: Denoise,
    x: Array,
    alphas_cumprod: np.ndarray,
    timesteps: list[int],
    noise: Noise,
    eta: float = 0.0,
    callback: Callable | None = None,
) -> Array:
    """DDIM (Song et al. 2021, eq. 12), with sigma_t(eta) of eq. 16 (eta = 0: deterministic,
    eta = 1: DDPM's variance). eps is re-derived from the thresholded x0."""
    for i, t, a_t, a_s in _pairs(alphas_cumprod, timesteps):
        sigma = eta * math.sqrt((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s))  # eq. 16
        alpha_t, sigma_t = _f32(math.sqrt(a_t)), _f32(math.sqrt(1.0 - a_t))
        c1, c2, c3 = _f32(math.sqrt(a_s)), _f32(math.sqrt(max(1.0 - a_s - sigma**2, 0.0))), _f32(sigma)
        x0 = denoise(x, t)
        eps = (x - alpha_t * x0) / sigma_t
        x = c1 * x0 + c2 * eps  # eq. 12: predicted x0, then the direction pointing to x_t
        if sigma > 0 and i + 1 < len(timesteps):  # eq. 12's random noise; none on the step to x0
            x = x + c3 * noise(tuple(x.shape))
        if callback is not None:
            callback(i, t, x)
    return x


def sample_dpmpp_2m(
    denoise: Denoise,
    x: Array,
    alphas_cumprod: np.ndarray,
    timesteps: list[int],
    noise: Noise,
    eta: float = 0.0,
    callback: Callable | None = None,
) -> Array:
    """DPM-Solver++(2M) with thresholded data prediction (Lu et al. 2022, alg. 2), first order
    on the first and the last step. Draws no noise: `noise` and `eta` are ignored."""
    x0_prev, h_prev = None, None
    for i, t, a_t, a_s in _pairs(alphas_cumprod, timesteps):
        x0 = denoise(x, t)
        if i + 1 == len(timesteps):
            x = x0  # the step to alpha_cumprod = 1 (lambda = inf) lands on the data prediction
        else:
            h = _half_log_snr(a_s) - _half_log_snr(a_t)
            c1 = _f32(math.sqrt((1.0 - a_s) / (1.0 - a_t)))  # sigma_s / sigma_t
            c2 = _f32(-math.sqrt(a_s) * math.expm1(-h))  # -alpha_s (e^{-h} - 1)
            x = c1 * x + c2 * _second_order(x0, x0_prev, h_prev, h)
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, t, x)
    return x


def _second_order(x0, x0_prev, h_prev, h):
    """DPM-Solver++'s multistep data prediction: x0 alone on the first step, else x0 extrapolated
    with its previous value, r = h_prev / h (the midpoint form of Lu et al. 2022, alg. 2)."""
    if x0_prev is None:
        return x0
    r = h_prev / h
    return _f32(1.0 + 1.0 / (2.0 * r)) * x0 - _f32(1.0 / (2.0 * r)) * x0_prev


def sample_dpmpp_2m_sde(
    denoise: Denoise,
    x: Array,
    alphas_cumprod: np.ndarray,
    timesteps: list[int],
    noise: Noise,
    eta: float = 0.0,
    callback: Callable | None = None,
) -> Array:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, sec. 4 and appendix; diffusers' "sde-dpmsolver++",
    midpoint): the data-prediction SDE solved exactly in its linear part, which adds fresh noise
    of std sigma_s sqrt(1 - e^{-2h}) at every step, and so corrects the model's errors as it goes
    like ancestral sampling. First order on the first and the last step; the last lands on the data
    prediction and draws no noise. `eta` is ignored (the noise is always the SDE's)."""
    x0_prev, h_prev = None, None
    for i, t, a_t, a_s in _pairs(alphas_cumprod, timesteps):
        x0 = denoise(x, t)
        if i + 1 == len(timesteps):
            x = x0  # the step to alpha_cumprod = 1 (lambda = inf) lands on the data prediction
        else:
            h = _half_log_snr(a_s) - _half_log_snr(a_t)
            c1 = _f32(math.sqrt((1.0 - a_s) / (1.0 - a_t)) * math.exp(-h))  # sigma_s / sigma_t e^{-h}
            c2 = _f32(-math.sqrt(a_s) * math.expm1(-2.0 * h))  # alpha_s (1 - e^{-2h})
            c3 = _f32(math.sqrt((1.0 - a_s) * -math.expm1(-2.0 * h)))  # sigma_s sqrt(1 - e^{-2h})
            x = c1 * x + c2 * _second_order(x0, x0_prev, h_prev, h)
            x = x + c3 * noise(tuple(x.shape))
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, t, x)
    return x


def sample_euler_a(
    denoise: Denoise,
    x: Array,
    alphas_cumprod: np.ndarray,
    timesteps: list[int],
    noise: Noise,
    eta: float = 0.0,
    callback: Callable | None = None,
) -> Array:
    """Euler ancestral (k-diffusion's sample_euler_ancestral, diffusers' EulerAncestralDiscrete)
    written on x_t = alpha_t (x0 + k_t eps) with k_t = sigma_t / alpha_t: each step goes from k_t
    down to k_down by Euler, then up to k_s with fresh noise of std k_up, where
    k_up^2 = k_s^2 (k_t^2 - k_s^2) / k_t^2 and k_down^2 = k_s^2 - k_up^2. The last step (k_s = 0)
    lands on the data prediction and draws no noise. `eta` is ignored (always fully ancestral)."""
    for i, t, a_t, a_s in _pairs(alphas_cumprod, timesteps):
        k_t, k_s = math.sqrt((1.0 - a_t) / a_t), math.sqrt((1.0 - a_s) / a_s)
        k_up = math.sqrt(k_s**2 * (k_t**2 - k_s**2) / k_t**2)
        k_down = math.sqrt(max(k_s**2 - k_up**2, 0.0))
        c1 = _f32(math.sqrt(a_s / a_t) * k_down / k_t)  # x_t / alpha_t, moved to k_down, times alpha_s
        c2 = _f32(math.sqrt(a_s) * (1.0 - k_down / k_t))
        c3 = _f32(math.sqrt(a_s) * k_up)
        x0 = denoise(x, t)
        x = c1 * x + c2 * x0
        if i + 1 < len(timesteps):  # the last step goes to alpha_cumprod = 1 and adds no noise
            x = x + c3 * noise(tuple(x.shape))
        if callback is not None:
            callback(i, t, x)
    return x


# the contract names the samplers (SAMPLER_NAMES); this maps each name to its loop
SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "euler_a": sample_euler_a,
}


def run_sampler(
    name: str,
    denoise: Denoise,
    x: Array,
    alphas_cumprod: np.ndarray,
    timesteps: list[int],
    noise: Noise,
    eta: float = 0.0,
    callback: Callable | None = None,
) -> Array:
    """Runs the sampler `name` (a key of SAMPLERS)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](denoise, x, alphas_cumprod, timesteps, noise, eta, callback)
