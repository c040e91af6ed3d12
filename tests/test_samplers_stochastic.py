"""The stochastic few-step samplers (DPM-Solver++(2M) SDE, Euler ancestral) against diffusers'
schedulers of the same name, with the same noise, on both twins; and, as any correct sampler,
Gaussian data comes out with its mean and variance."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_module

from imagen.runtime import samplers as runtime_samplers

from sampler_checks import (
    ALPHAS_CUMPROD,
    BETAS,
    SHAPE,
    SIDES,
    TOLERANCE,
    T,
    gaussian_case,
    optimal_denoiser,
    run_diffusers,
    run_ours,
    worst_step_error,
)

# diffusers' Euler casts its sample, x / alpha_t (up to 157 at t = 999), to float32 inside its step:
# up to ~2e-5 of rounding there. A wrong coefficient shows as 1e-2 or more.
EULER_TOLERANCE = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


@pytest.fixture
def gaussian():
    return gaussian_case()


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("steps", [1, 2, 5, 20, 50])
def test_dpmpp_2m_sde_matches_diffusers(side, steps, gaussian):
    """DPMSolverMultistepScheduler as DPM-Solver++(2M) SDE: sde-dpmsolver++, order 2, midpoint,
    final_sigmas_type "zero", with the same noise (its `variance_noise`). Ours draws none on the
    step to alpha = 1, where diffusers multiplies its draw by 0."""
    denoise, x = gaussian
    timesteps = runtime_samplers.spaced_timesteps(T, steps)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        trained_betas=BETAS,
        prediction_type="sample",
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        final_sigmas_type="zero",
        thresholding=False,
        use_karras_sigmas=False,
    )
    scheduler.set_timesteps(timesteps=timesteps)
    a = ALPHAS_CUMPROD[timesteps]
    scheduler.sigmas = torch.from_numpy(np.append(np.sqrt((1 - a) / a), 0.0))
    noise = np.random.default_rng(5).standard_normal((steps, *SHAPE))
    theirs = run_diffusers(scheduler, denoise, x, lambda i: {"variance_noise": torch.from_numpy(noise[i])})
    ours = run_ours(side, "dpmpp_2m_sde", denoise, x, timesteps, noise[:-1])
    error = worst_step_error(ours, theirs)
    print(f"dpmpp_2m_sde {side} steps={steps}: worst relative error over the steps {error:.2e}")
    assert error <= TOLERANCE


def run_euler_ancestral(denoise, x, timesteps, noise):
    """diffusers' EulerAncestralDiscreteScheduler on our timesteps, its states brought back from
    its variable x / alpha_t (k-diffusion's) to ours. It takes no data prediction: it is given
    the noise eps = (x_k - x0) / k_t that the data prediction implies, and its noise through a
    generator whose draws are replaced by ours."""
    scheduler = EulerAncestralDiscreteScheduler(num_train_timesteps=T, trained_betas=BETAS)
    scheduler.set_timesteps(len(timesteps))
    a = ALPHAS_CUMPROD[timesteps]
    k = np.append(np.sqrt((1 - a) / a), 0.0)
    scheduler.timesteps = torch.tensor(timesteps, dtype=torch.float64)
    scheduler.sigmas = torch.from_numpy(k)
    draws = iter([*noise, np.zeros(SHAPE)])  # diffusers draws on the last step too, times k_up = 0
    sample, states = torch.from_numpy(x.copy()) * float(np.sqrt(k[0] ** 2 + 1)), []
    original = euler_module.randn_tensor
    euler_module.randn_tensor = lambda shape, **kwargs: torch.from_numpy(next(draws))
    try:
        for i, t in enumerate(scheduler.timesteps):
            x_vp = scheduler.scale_model_input(sample, t)
            eps = (sample - torch.from_numpy(denoise(x_vp.numpy(), int(t)))) / k[i]
            sample = scheduler.step(eps, t, sample).prev_sample
            states.append(sample.numpy() / np.sqrt(k[i + 1] ** 2 + 1))
    finally:
        euler_module.randn_tensor = original
    return states


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("steps", [1, 2, 5, 20, 50])
def test_euler_a_matches_diffusers(side, steps, gaussian):
    """Euler ancestral against diffusers' EulerAncestralDiscreteScheduler with the same noise."""
    denoise, x = gaussian
    timesteps = runtime_samplers.spaced_timesteps(T, steps)
    noise = list(np.random.default_rng(6).standard_normal((steps - 1, *SHAPE)))
    theirs = run_euler_ancestral(denoise, x, timesteps, noise)
    ours = run_ours(side, "euler_a", denoise, x, timesteps, noise)
    error = worst_step_error(ours, theirs)
    print(f"euler_a {side} steps={steps}: worst relative error over the steps {error:.2e}")
    assert error <= EULER_TOLERANCE


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "euler_a"])
def test_gaussian_data_comes_out_with_its_variance(side, sampler):
    """2048 samples of (3, 4, 4) from N(0.3, 0.5^2) over all 1000 timesteps: the sample variance
    within 2% of 0.25 and the mean within 0.01 of 0.3 (sampling error of the variance 0.45%, one
    sigma). At few steps both are biased, in opposite directions (measured here: variance ratio
    2.03 for the SDE solver at 25 steps, its second-order term extrapolating noisy predictions;
    0.65 for Euler ancestral)."""
    mean, std = 0.3, 0.5
    rng = np.random.default_rng(1)
    x_start = rng.standard_normal((2048, 3, 4, 4), dtype=np.float32)
    timesteps = runtime_samplers.spaced_timesteps(T, 1000)
    noise = (rng.standard_normal((2048, 3, 4, 4), dtype=np.float32) for _ in timesteps[:-1])
    out = run_ours(side, sampler, optimal_denoiser(mean, std, np.float32), x_start, timesteps, noise)[-1]
    ratio = float(out.astype(np.float64).var()) / std**2
    found = float(out.astype(np.float64).mean())
    print(f"{sampler} {side}: variance / data variance {ratio:.4f}, mean {found:.4f}")
    assert abs(ratio - 1) <= 0.02
    assert abs(found - mean) <= 0.01


@pytest.mark.parametrize("steps", [1, 2, 10, 25])
def test_euler_ancestral_is_ddpm_on_a_variance_preserving_schedule(steps, gaussian):
    """Euler ancestral, written in k = sigma / alpha, and ancestral DDPM over the same respaced
    timesteps are one sampler: k_down = k_s^2 / k_t, so the coefficient of x_t,
    sqrt(a_s / a_t) k_down / k_t, is DDPM's (1 - a_s) / (1 - a_t) sqrt(a_t / a_s), and alpha_s k_up
    is DDPM's posterior std. With the same noise they agree to float32 rounding at every step."""
    denoise, x = gaussian
    timesteps = runtime_samplers.spaced_timesteps(T, steps)
    noise = list(np.random.default_rng(9).standard_normal((max(steps - 1, 0), *SHAPE)))
    euler = run_ours("runtime", "euler_a", denoise, x, timesteps, noise)
    ddpm = run_ours("runtime", "ddpm", denoise, x, timesteps, noise)
    assert worst_step_error(euler, ddpm) <= TOLERANCE
