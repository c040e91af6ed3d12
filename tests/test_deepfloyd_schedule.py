"""The runtime's scheduler pieces for DeepFloyd IF against diffusers' DDPMScheduler, configured as IF's
stages are (scripts/convert_if.py): squaredcos_cap_v2 betas with diffusers' float32 cumulative
product, `leading` spacing, learned-range variance, dynamic thresholding at ratio 0.95 with
sample_max_value 1.5 (stage I) and 1.0 (stage II), and `add_noise` for the low-res augmentation.

The model is a fixed smooth function of (x, t), so both loops see the same predictions; the noise is
the runtime's, handed to diffusers by replacing its `randn_tensor` in the scheduler's module.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
scheduling_ddpm = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")

from imagen.runtime.guidance import threshold  # noqa: E402
from imagen.runtime.samplers import sample_ddpm, spaced_timesteps  # noqa: E402
from imagen.runtime.schedule import Schedule  # noqa: E402

SHAPE = (2, 3, 8, 8)
# diffusers takes a step's beta = 1 - a_t / a_s in float32, which near t = 0 cancels: at t = 10 -> 0 it is
# 4.1e-5 off in relative terms, and so is the coefficient (about 1) of x0 in the posterior mean. The
# runtime takes its coefficients in float64 from the same float32 alphas_cumprod. Measured: 4.0e-5.
STEP_TOLERANCE = 5e-5
CHAIN_TOLERANCE = 2e-4


def if_scheduler(sample_max_value: float = 1.5, **changes):
    config = dict(
        variance_type="learned_range",
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=sample_max_value,
        timestep_spacing="leading",
    )
    return scheduling_ddpm.DDPMScheduler(**{**config, **changes})


def runtime_schedule(scheduler) -> Schedule:
    return Schedule(scheduler.betas.double().numpy(), scheduler.alphas_cumprod.double().numpy())


def model(x: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """(eps, v): a noise prediction large enough to need thresholding, and a variance in [-1, 1]."""
    eps = np.tanh(0.9 * x + np.float32(t / 1000.0)).astype(np.float32) * np.float32(1.3)
    v = np.sin(2.0 * x + np.float32(t / 250.0)).astype(np.float32)
    return eps, v


class Denoiser:
    """The runtime's denoise(x, t) -> x0 with IF's learned variance and thresholding."""

    def __init__(self, schedule: Schedule, maximum: float):
        self.schedule, self.maximum, self.variance = schedule, maximum, None

    def __call__(self, x, t):
        eps, self.variance = model(x, t)
        return threshold(self.schedule.predict_start_from_noise(x, t, eps), "dynamic", 0.95, self.maximum)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_spacing_matches_diffusers_for_every_step_count(spacing, offset):
    if spacing == "linspace" and offset:
        pytest.skip("diffusers adds steps_offset to leading spacing only")
    scheduler = if_scheduler(timestep_spacing=spacing, steps_offset=offset)
    for steps in range(1, 101):
        scheduler.set_timesteps(steps)
        expected = scheduler.timesteps.tolist()
        if spacing == "linspace":  # this project's rule, round(linspace(T - 1, 0, n)), is not diffusers':
            # one step starts from pure noise at T - 1 (diffusers: [0]) and x.5 ties may round the other way
            ours = spaced_timesteps(1000, steps)
            if steps == 1:
                assert (ours, expected) == ([999], [0])
            else:
                assert max(abs(a - b) for a, b in zip(ours, expected, strict=True)) <= 1, steps
        else:
            assert spaced_timesteps(1000, steps, spacing=spacing, offset=offset) == expected, steps


def test_alphas_cumprod_are_diffusers_float32_values():
    scheduler = if_scheduler()
    schedule = runtime_schedule(scheduler)
    assert np.array_equal(schedule.alphas_cumprod.astype(np.float32), scheduler.alphas_cumprod.numpy())
    # the runtime's own float64 product would differ: the manifest carries diffusers' values
    assert not np.array_equal(np.cumprod(1.0 - schedule.betas).astype(np.float32), scheduler.alphas_cumprod.numpy())


@pytest.mark.parametrize("maximum", [1.5, 1.0])
def test_learned_range_ddpm_matches_diffusers_step_for_step(maximum, monkeypatch):
    """Every step count 1..100: each DDPMScheduler.step, started from the runtime's previous sample,
    lands within STEP_TOLERANCE of the runtime's step; whole chains within CHAIN_TOLERANCE (the model
    here feeds every rounding difference back, so they grow along a chain)."""
    scheduler = if_scheduler(sample_max_value=maximum)
    schedule = runtime_schedule(scheduler)
    worst_step = worst_chain = 0.0
    for steps in range(1, 101):
        timesteps = spaced_timesteps(1000, steps, spacing="leading")
        rng = np.random.default_rng(steps)
        draws = []

        def noise(shape, rng=rng, draws=draws):
            draws.append(rng.standard_normal(shape, dtype=np.float32))
            return draws[-1]

        x_start = rng.standard_normal(SHAPE, dtype=np.float32)
        ours = [x_start]
        result = sample_ddpm(
            Denoiser(schedule, maximum), x_start.copy(), schedule.alphas_cumprod, timesteps, noise,
            callback=lambda i, t, x, ours=ours: ours.append(x.copy()),
        )  # fmt: skip
        replay = [iter(draws)]  # diffusers' draws, in the order the runtime drew them
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, r=replay, **k: torch.from_numpy(next(r[0])))
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == timesteps
        chain = torch.from_numpy(x_start.copy())
        for i, t in enumerate(scheduler.timesteps):
            eps, v = model(ours[i], int(t))
            step = scheduler.step(torch.from_numpy(np.concatenate([eps, v], axis=1)), t, torch.from_numpy(ours[i]))
            worst_step = max(worst_step, float(np.abs(step.prev_sample.numpy() - ours[i + 1]).max()))
        replay[0] = iter(draws)  # the whole chain in diffusers alone, from the same noise
        for t in scheduler.timesteps:
            eps, v = model(chain.numpy(), int(t))
            chain = scheduler.step(torch.from_numpy(np.concatenate([eps, v], axis=1)), t, chain).prev_sample
        assert next(replay[0], None) is None, "diffusers drew a different number of noise tensors"
        worst_chain = max(worst_chain, float(np.abs(result - chain.numpy()).max()))
    assert worst_step <= STEP_TOLERANCE, worst_step
    assert worst_chain <= CHAIN_TOLERANCE, worst_chain


def test_thresholding_matches_diffusers():
    rng = np.random.default_rng(3)
    x0 = (rng.standard_normal(SHAPE) * 2.0).astype(np.float32)
    for maximum in (1.0, 1.5, 3.0):
        scheduler = if_scheduler(sample_max_value=maximum)
        expected = scheduler._threshold_sample(torch.from_numpy(x0)).numpy()
        np.testing.assert_allclose(threshold(x0, "dynamic", 0.95, maximum), expected, rtol=0, atol=1e-6)


def test_add_noise_matches_diffusers():
    """The low-res augmentation (IF's image_noising_scheduler.add_noise) at every timestep."""
    scheduler = scheduling_ddpm.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    schedule = runtime_schedule(scheduler)
    rng = np.random.default_rng(4)
    x, noise = (rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(2))
    for t in range(0, 1000, 7):
        expected = scheduler.add_noise(torch.from_numpy(x), torch.from_numpy(noise), torch.tensor([t, t])).numpy()
        np.testing.assert_allclose(schedule.q_sample(x, t, noise), expected, rtol=0, atol=2e-6, err_msg=str(t))
