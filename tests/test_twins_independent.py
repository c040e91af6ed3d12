"""Samplers and guidance math against things this project did not write.

The twin parity tests hold the torch reference and the NumPy runtime together, so a mistake
made in both passes them. Here both sides are checked against diffusers' schedulers (DDPM,
DDIM, DPM-Solver++) on the same model function and noise, against Imagen's dynamic
thresholding worked out by hand, and against properties any correct sampler has: with a
perfect denoiser x_t stays on its forward path and lands on x0; Gaussian data comes out
with its variance; DDIM converges at first order, DPM-Solver++(2M) at second.

The model function is the optimal denoiser of Gaussian data, x0 ~ N(mean, std^2) per element:
E[x0 | x_t] = mean + sqrt(a) std^2 / (a std^2 + 1 - a) (x_t - sqrt(a) mean), a = alphas_cumprod[t],
given to diffusers as a data prediction (prediction_type="sample"), without thresholding.
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from imagen.reference import guidance as reference_guidance
from imagen.reference import images as reference_images
from imagen.reference import samplers as reference_samplers
from imagen.runtime import guidance as runtime_guidance
from imagen.runtime import images as runtime_images
from imagen.runtime import samplers as runtime_samplers

from sampler_checks import (
    ALPHAS_CUMPROD,
    BETAS,
    SHAPE,
    SIDES,
    TOLERANCE,
    T,
    gaussian_case,
    in_float64,
    optimal_denoiser,
    run_diffusers,
    run_ours,
    worst_step_error,
)


@pytest.fixture
def gaussian():
    return gaussian_case()


# Against diffusers, on float64 images


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("steps", [1000, 50, 7])
def test_ddpm_matches_diffusers(side, steps, gaussian):
    """DDPMScheduler with our spaced timesteps as its custom `timesteps` (its step then takes
    beta = 1 - a_t / a_prev, our respacing) and fixed_small variance; noise from the same draws."""
    denoise, x = gaussian
    timesteps = runtime_samplers.spaced_timesteps(T, steps)
    scheduler = DDPMScheduler(
        num_train_timesteps=T,
        trained_betas=BETAS,
        prediction_type="sample",
        variance_type="fixed_small",
        clip_sample=False,
        thresholding=False,
    )
    scheduler.set_timesteps(timesteps=timesteps)
    in_float64(scheduler)
    generator = torch.Generator().manual_seed(steps)
    theirs = run_diffusers(scheduler, denoise, x, lambda i: {"generator": generator})
    # diffusers draws with randn_tensor at every t > 0, which is every step but the last (t = 0).
    replay = torch.Generator().manual_seed(steps)
    noise = [randn_tensor(SHAPE, generator=replay, dtype=torch.float64).numpy() for _ in timesteps[:-1]]
    ours = run_ours(side, "ddpm", denoise, x, timesteps, noise)
    error = worst_step_error(ours, theirs)
    print(f"ddpm {side} steps={steps}: worst relative error over the steps {error:.2e}")
    assert error <= TOLERANCE


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("steps,eta", [(10, 0.0), (25, 0.0), (10, 0.7), (50, 1.0)])
def test_ddim_matches_diffusers(side, steps, eta, gaussian):
    """DDIMScheduler with "trailing" spacing (999, 899, ..., 99 for 10 steps): its previous
    timestep, t - T // steps, is then our next timestep, and -1 (alpha = 1) after the last.
    Ours runs on the same list. The eta noise is injected as `variance_noise`."""
    denoise, x = gaussian
    scheduler = DDIMScheduler(
        num_train_timesteps=T,
        trained_betas=BETAS,
        prediction_type="sample",
        clip_sample=False,
        thresholding=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(steps)
    in_float64(scheduler)
    timesteps = [int(t) for t in scheduler.timesteps]
    assert timesteps[0] == T - 1 and timesteps[1] == T - 1 - T // steps
    noise = list(np.random.default_rng(steps).standard_normal((steps, *SHAPE)))
    theirs = run_diffusers(scheduler, denoise, x, lambda i: {"eta": eta, "variance_noise": torch.from_numpy(noise[i])})
    # Ours draws no noise on the step to alpha = 1, where diffusers multiplies its draw by 0.
    ours = run_ours(side, "ddim", denoise, x, timesteps, noise[:-1], eta)
    error = worst_step_error(ours, theirs)
    print(f"ddim {side} steps={steps} eta={eta}: worst relative error over the steps {error:.2e}")
    assert error <= TOLERANCE


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("steps", [1, 2, 5, 20, 50])
def test_dpmpp_2m_matches_diffusers(side, steps, gaussian):
    """DPMSolverMultistepScheduler as DPM-Solver++(2M): dpmsolver++, order 2, midpoint, on our
    spaced timesteps, final_sigmas_type "zero" (the last step goes to alpha = 1 and, first
    order, lands on the data prediction), first order on the first step (no history)."""
    denoise, x = gaussian
    timesteps = runtime_samplers.spaced_timesteps(T, steps)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        trained_betas=BETAS,
        prediction_type="sample",
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        final_sigmas_type="zero",
        thresholding=False,
        use_karras_sigmas=False,
    )
    scheduler.set_timesteps(timesteps=timesteps)
    # set_timesteps stores the sigmas in float32: give it them in float64. Its step still casts
    # the sample to float32 (diffusers' own choice), which costs ~1e-7 here.
    a = ALPHAS_CUMPROD[timesteps]
    scheduler.sigmas = torch.from_numpy(np.append(np.sqrt((1 - a) / a), 0.0))
    theirs = run_diffusers(scheduler, denoise, x)
    ours = run_ours(side, "dpmpp_2m", denoise, x, timesteps)
    error = worst_step_error(ours, theirs)
    print(f"dpmpp_2m {side} steps={steps}: worst relative error over the steps {error:.2e}")
    assert error <= TOLERANCE


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_runtime_float32_images_stay_close_to_diffusers_float64(sampler, gaussian):
    """The runtime as it runs (float32 images and model outputs) against diffusers in float64."""
    denoise64, x = gaussian

    def denoise(x, t):
        return denoise64(x.astype(np.float64), t).astype(np.float32)

    timesteps = runtime_samplers.spaced_timesteps(T, 50)
    if sampler == "ddpm":
        scheduler = DDPMScheduler(
            num_train_timesteps=T, trained_betas=BETAS, prediction_type="sample", clip_sample=False
        )
        scheduler.set_timesteps(timesteps=timesteps)
        generator, replay = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        theirs = run_diffusers(in_float64(scheduler), denoise64, x, lambda i: {"generator": generator})
        noise = [
            randn_tensor(SHAPE, generator=replay, dtype=torch.float64).numpy().astype(np.float32)
            for _ in timesteps[:-1]
        ]
    elif sampler == "ddim":
        scheduler = DDIMScheduler(
            num_train_timesteps=T,
            trained_betas=BETAS,
            prediction_type="sample",
            clip_sample=False,
            timestep_spacing="trailing",
        )
        scheduler.set_timesteps(50)
        timesteps, noise = [int(t) for t in scheduler.timesteps], []
        theirs = run_diffusers(in_float64(scheduler), denoise64, x)
    else:
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=BETAS, prediction_type="sample")
        scheduler.set_timesteps(timesteps=timesteps)
        a = ALPHAS_CUMPROD[timesteps]
        scheduler.sigmas = torch.from_numpy(np.append(np.sqrt((1 - a) / a), 0.0))
        theirs, noise = run_diffusers(scheduler, denoise64, x), []
    ours = run_ours("runtime", sampler, denoise, x.astype(np.float32), timesteps, noise)
    assert ours[-1].dtype == np.float32
    error = worst_step_error(ours, theirs)
    print(f"{sampler} runtime float32, 50 steps: worst relative error over the steps {error:.2e}")
    assert error <= TOLERANCE


@pytest.mark.parametrize("steps", [2, 4, 10, 25, 50, 100, 1000])
def test_spaced_timesteps_are_diffusers_linspace_spacing(steps):
    """round(linspace(T - 1, 0, steps)) is diffusers' "linspace" spacing. (At exact half-integer
    ties, e.g. 499.5 for 27 steps, the two linspace directions may round either way.)"""
    scheduler = DDPMScheduler(num_train_timesteps=T, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    theirs = [int(t) for t in scheduler.timesteps]
    assert runtime_samplers.spaced_timesteps(T, steps) == theirs
    assert reference_samplers.spaced_timesteps(T, steps) == theirs


# Guidance and dynamic thresholding worked out by hand


def _guidance(side, function, *arrays, **kwargs) -> np.ndarray:
    """imagen.{side}.guidance.function on NumPy float32 arrays."""
    if side == "reference":
        return getattr(reference_guidance, function)(*(torch.from_numpy(a) for a in arrays), **kwargs).numpy()
    return getattr(runtime_guidance, function)(*arrays, **kwargs)


@pytest.mark.parametrize("side", SIDES)
def test_dynamic_threshold_by_hand(side):
    """Imagen sec. 2.3 on two samples of 10 values. Sample 0: sorted |x0| ends 0.9, 0.95, so the
    0.9 quantile (position 0.9 * 9 = 8.1) is 0.9 + 0.1 * 0.05 = 0.905 < 1: s = 1, unchanged.
    Sample 1: sorted |x0| = 0.25, 0.5, 1, 1.25, 1.5, 1.75, 2, 2, 2, 12, quantile 2 + 0.1 * 10 = 3:
    clipped to [-3, 3] and divided by 3. (torch takes the quantile's position 8.1 in float32,
    which moves its s by 2e-6 relative; NumPy's is 3 to float32 rounding.)"""
    unchanged = [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -0.95]
    clipped = [0.25, -0.5, 1.0, -1.25, 1.5, -1.75, 2.0, -2.0, 2.0, -12.0]
    x0 = np.array([unchanged, clipped], np.float32).reshape(2, 1, 2, 5)
    out = _guidance(side, "dynamic_threshold", x0, percentile=0.9)
    expected_clipped = np.array([1 / 12, -1 / 6, 1 / 3, -5 / 12, 1 / 2, -7 / 12, 2 / 3, -2 / 3, 2 / 3, -1], np.float32)
    assert out.dtype == np.float32 and out.shape == x0.shape
    np.testing.assert_array_equal(out[0], x0[0])
    np.testing.assert_allclose(out[1].ravel(), expected_clipped, rtol=5e-6, atol=0)
    assert out[1].ravel()[-1] == -1.0  # clipped to -s, then divided by s
    # p = 1: s is the largest |x0| of each sample (0.95 < 1 leaves sample 0 alone).
    out = _guidance(side, "dynamic_threshold", x0, percentile=1.0)
    np.testing.assert_array_equal(out[0], x0[0])
    np.testing.assert_allclose(out[1].ravel(), np.array(clipped, np.float32) / 12, rtol=5e-6, atol=0)


@pytest.mark.parametrize("side", SIDES)
def test_classifier_free_guidance_by_hand(side):
    """uncond + s (cond - uncond): cond 2, uncond 1 gives 1 + s."""
    cond, uncond = np.full((1, 1, 2, 2), 2.0, np.float32), np.ones((1, 1, 2, 2), np.float32)
    for scale, value in [(0.0, 1.0), (1.0, 2.0), (3.0, 4.0), (7.5, 8.5)]:
        out = _guidance(side, "apply_guidance", cond, uncond, scale=scale)
        np.testing.assert_array_equal(out, np.full((1, 1, 2, 2), value, np.float32))


@pytest.mark.parametrize("side", SIDES)
def test_to_uint8_by_hand(side):
    """floor(clip(image, 0, 1) * 255 + 0.5), channels last: (1, 3, 1, 2) -> (1, 1, 2, 3)."""

    def to_uint8(image):
        if side == "reference":
            return reference_images.to_uint8(torch.from_numpy(image)).numpy()
        return runtime_images.to_uint8(image)

    levels = [-0.5, 0.3, 0.7, 51.0, 254.4, 254.6]  # in units of 1/255
    out = to_uint8((np.array(levels, np.float32) / np.float32(255)).reshape(1, 3, 1, 2))
    assert out.dtype == np.uint8 and out.shape == (1, 1, 2, 3)
    np.testing.assert_array_equal(out[0, 0].T.ravel(), [0, 0, 1, 51, 254, 255])
    assert to_uint8(np.array([[[[-3.0, 7.0]]]], np.float32)).ravel().tolist() == [0, 255]


# Properties of any correct sampler


def _forward_path(x0, x_start, timesteps):
    """With a perfect denoiser the deterministic samplers keep the noise of x_start,
    eps = (x_T - sqrt(a_T) x0) / sqrt(1 - a_T), and pass through sqrt(a_s) x0 + sqrt(1 - a_s) eps
    at every next timestep s (alpha = 1, x0 itself, after the last)."""
    a_start = ALPHAS_CUMPROD[timesteps[0]]
    eps = (x_start.astype(np.float64) - np.sqrt(a_start) * x0) / np.sqrt(1 - a_start)
    return [np.sqrt(a) * x0 + np.sqrt(1 - a) * eps for a in [*ALPHAS_CUMPROD[timesteps[1:]], 1.0]]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("steps", [1, 2, 10, 50, 1000])
def test_perfect_denoiser_lands_on_x0(side, sampler, steps):
    """DDIM (eta 0, DDIM eq. 12) and DPM-Solver++ from pure noise with a denoiser that returns
    the true x0: every step lies on the forward path of x0 and the last one is x0, to float32
    rounding."""
    rng = np.random.default_rng(steps)
    x0 = rng.uniform(-1, 1, SHAPE).astype(np.float32)
    x_start = rng.standard_normal(SHAPE, dtype=np.float32)
    timesteps = runtime_samplers.spaced_timesteps(T, steps)
    states = run_ours(side, sampler, lambda x, t: x0.copy(), x_start, timesteps)
    path_error = max(
        float(np.abs(s - p).max()) for s, p in zip(states, _forward_path(x0, x_start, timesteps), strict=True)
    )
    final_error = float(np.abs(states[-1] - x0).max())
    print(f"{sampler} {side} steps={steps}: max |x - path| {path_error:.1e}, max |x_final - x0| {final_error:.1e}")
    assert states[-1].dtype == np.float32
    assert path_error <= 1e-5
    assert final_error <= 1e-6


# The Gaussian data's optimal denoiser: the variance comes out right (many samples)
MEAN, STD = 0.3, 0.5


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("sampler,steps,bias", [("ddim", 1000, 0.006), ("dpmpp_2m", 250, 0.004)])
def test_gaussian_data_variance_is_reproduced(side, sampler, steps, bias):
    """2048 samples of (3, 4, 4) from N(0.3, 0.5^2): the sample variance is within 2% of 0.25 and
    the mean within 0.01 of 0.3. The samplers' own discretization bias at these step counts is
    `bias` (from the exact linear map, test below); the sampling error of the variance is
    sqrt(2 / 98304) = 0.45% (one sigma), of the mean 0.5 / sqrt(98304) = 0.0016."""
    x_start = np.random.default_rng(0).standard_normal((2048, 3, 4, 4), dtype=np.float32)
    denoise = optimal_denoiser(MEAN, STD, np.float32)
    timesteps = runtime_samplers.spaced_timesteps(T, steps)
    out = run_ours(side, sampler, denoise, x_start, timesteps)[-1]
    ratio = float(out.astype(np.float64).var()) / STD**2
    mean = float(out.astype(np.float64).mean())
    print(f"{sampler} {side} steps={steps}: variance / data variance {ratio:.4f} (bias {bias}), mean {mean:.4f}")
    assert abs(ratio - 1) <= 0.02
    assert abs(mean - MEAN) <= 0.01


def _variance_error(side, sampler, steps) -> float:
    """Deterministic: the denoiser is affine per element, so the sampler is x_T -> g x_T + b;
    from x_T ~ N(0, 1) the output variance is g^2 (exactly, up to alpha_T ~ 4e-5)."""
    denoise = optimal_denoiser(MEAN, STD)
    out = run_ours(side, sampler, denoise, np.array([0.0, 1.0]), runtime_samplers.spaced_timesteps(T, steps))[-1]
    return (out[1] - out[0]) ** 2 / STD**2 - 1


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("sampler,order", [("ddim", 1), ("dpmpp_2m", 2)])
def test_convergence_order(side, sampler, order):
    """Doubling the steps divides the variance error by about 2 for DDIM (first order) and 4
    for DPM-Solver++(2M) (second order, Lu et al. 2022): a wrong coefficient loses the order."""
    errors = [_variance_error(side, sampler, steps) for steps in (50, 100, 200)]
    ratios = [float(errors[1] / errors[0]), float(errors[2] / errors[1])]
    print(
        f"{sampler} {side}: variance error at 50/100/200 steps {[f'{e:.2e}' for e in errors]}, "
        f"ratios {[f'{r:.3f}' for r in ratios]}"
    )
    for ratio in ratios:
        assert 0.5**order * 0.6 <= ratio <= 0.5**order * 1.4
