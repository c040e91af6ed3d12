"""What the samplers' checks against diffusers share: the schedule, the model function (the
optimal denoiser of Gaussian data) and the loops that run our samplers and diffusers' schedulers
on it, recording x after every step.

The model function is the optimal denoiser of Gaussian data, x0 ~ N(mean, std^2) per element:
E[x0 | x_t] = mean + sqrt(a) std^2 / (a std^2 + 1 - a) (x_t - sqrt(a) mean), a = alphas_cumprod[t],
given to diffusers as a data prediction (prediction_type="sample"), without thresholding.
"""

import numpy as np
import pytest
import torch

from imagen.export.parity import relative_error
from imagen.reference import samplers as reference_samplers
from imagen.reference.diffusion import make_betas
from imagen.runtime import samplers as runtime_samplers

T = 1000
BETAS = make_betas("linear", T)
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)
SHAPE = (2, 3, 4, 4)
SIDES = ("reference", "runtime")
# Ours casts every coefficient to float32 (docs/bundle.md); on float64 images that costs ~1e-7.
TOLERANCE = 1e-5
# diffusers' DPM-Solver set_timesteps turns a torch tensor into a NumPy array the NumPy 2 way it warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


def optimal_denoiser(mean, std, dtype=np.float64):
    """E[x0 | x_t] for x0 ~ N(mean, std^2) per element, as a NumPy `denoise(x, t) -> x0`."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)

    def denoise(x, t):
        a = ALPHAS_CUMPROD[t]
        gain = np.sqrt(a) * std**2 / (a * std**2 + 1 - a)
        return (mean + gain * (x - np.sqrt(a) * mean)).astype(dtype)

    return denoise


def run_ours(side, sampler, denoise, x, timesteps, noise=(), eta=0.0):
    """Our sampler on NumPy inputs, through the torch twin or the NumPy twin: x after every step."""
    draws = iter(noise)
    states = []
    if side == "runtime":
        runtime_samplers.run_sampler(
            sampler,
            denoise,
            x.copy(),
            ALPHAS_CUMPROD,
            timesteps,
            lambda shape: next(draws),
            eta,
            lambda i, t, x: states.append(x.copy()),
        )
    else:
        reference_samplers.run_sampler(
            sampler,
            lambda x, t: torch.from_numpy(denoise(x.numpy(), t)),
            torch.from_numpy(x.copy()),
            ALPHAS_CUMPROD,
            timesteps,
            lambda shape: torch.from_numpy(next(draws)),
            eta,
            lambda i, t, x: states.append(x.numpy().copy()),
        )
    return states


def run_diffusers(scheduler, denoise, x, step_kwargs=lambda i: {}):
    """diffusers' sampling loop over scheduler.timesteps: x after every step."""
    states = []
    sample = torch.from_numpy(x.copy())
    for i, t in enumerate(scheduler.timesteps):
        data_prediction = torch.from_numpy(denoise(sample.numpy(), int(t)))
        sample = scheduler.step(data_prediction, t, sample, **step_kwargs(i)).prev_sample
        states.append(sample.numpy().copy())
    return states


def in_float64(scheduler):
    """diffusers keeps `trained_betas` in float32; give it our float64 alphas_cumprod, so the
    comparison measures the sampler steps, not float32 rounding of the schedule (up to 5e-6)."""
    scheduler.alphas_cumprod = torch.from_numpy(ALPHAS_CUMPROD.copy())
    return scheduler


def worst_step_error(ours, theirs) -> float:
    assert len(ours) == len(theirs)
    return max(relative_error(a, b) for a, b in zip(ours, theirs, strict=True))


def gaussian_case():
    """A Gaussian data set's optimal denoiser (per-element means and stds) and a start x_T."""
    rng = np.random.default_rng(0)
    denoise = optimal_denoiser(rng.uniform(-0.5, 0.5, SHAPE[1:]), rng.uniform(0.2, 0.8, SHAPE[1:]))
    return denoise, rng.standard_normal(SHAPE)
