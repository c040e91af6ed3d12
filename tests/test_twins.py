"""Twin parity: the NumPy runtime's schedule, timesteps, guidance, dynamic thresholding, resize
and samplers against their PyTorch reference twins (docs/bundle.md, Twins), on the same inputs.
test_twins_independent.py checks both sides against what neither wrote."""

import json

import numpy as np
import pytest

from imagen.export.parity import relative_error
from imagen.runtime.guidance import apply_guidance, dynamic_threshold, threshold
from imagen.runtime.images import resize_image
from imagen.runtime.samplers import run_sampler, spaced_timesteps
from imagen.runtime.schedule import Schedule

# Schedule


@pytest.mark.parametrize("kind,timesteps", [("linear", 1000), ("linear", 30), ("cosine", 50)])
def test_schedule_matches_reference_buffers(kind, timesteps):
    from imagen.reference.diffusion import GaussianDiffusion

    reference = GaussianDiffusion(timesteps=timesteps, schedule=kind)
    from imagen.runtime.contract import ScheduleEntry

    written = ScheduleEntry(tuple(reference.betas_array.tolist()), kind, timesteps).to_json()
    schedule = Schedule(ScheduleEntry.from_json("unet_0", json.loads(json.dumps(written))).betas)
    for name in (
        "betas",
        "alphas_cumprod",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
    ):
        ours, theirs = getattr(schedule, name), getattr(reference, name).numpy()
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0, err_msg=name)


@pytest.mark.parametrize("steps", [1, 2, 5, 7, 29, 30])
def test_timesteps_match_reference(steps):
    from imagen.reference.samplers import spaced_timesteps as reference_timesteps

    ours = spaced_timesteps(30, steps)
    assert ours == reference_timesteps(30, steps)
    assert ours[0] == 29 and ours[-1] == (0 if steps > 1 else 29)


@pytest.mark.parametrize("steps,strength,kept", [(25, 0.6, 15), (30, 0.5, 15), (5, 0.01, 1), (7, 1.0, 7), (1, 0.5, 1)])
def test_sr_strength_keeps_the_last_steps(steps, strength, kept):
    from imagen.reference.samplers import spaced_timesteps as reference_timesteps

    ours = spaced_timesteps(30, steps, strength)
    assert ours == reference_timesteps(30, steps, strength)
    assert len(ours) == kept and ours == spaced_timesteps(30, steps)[steps - kept :]
    with pytest.raises(ValueError, match="strength"):
        spaced_timesteps(30, steps, 0.0)


# Guidance, dynamic thresholding, resize


@pytest.mark.parametrize("seed", range(3))
def test_guidance_and_dynamic_threshold_match_reference(seed):
    import torch

    from imagen.reference.guidance import apply_guidance as ref_guidance
    from imagen.reference.guidance import dynamic_threshold as ref_threshold
    from imagen.reference.guidance import threshold as ref_threshold_kind

    rng = np.random.default_rng(seed)
    cond, uncond = (rng.standard_normal((3, 3, 8, 8), dtype=np.float32) * 2 for _ in range(2))
    for scale in (0.0, 1.0, 5.0, 7.5):
        ours = apply_guidance(cond, uncond, scale)
        theirs = ref_guidance(torch.from_numpy(cond), torch.from_numpy(uncond), scale).numpy()
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    x0 = (
        rng.standard_normal((4, 3, 16, 16), dtype=np.float32)
        * np.array([0.3, 1.0, 2.0, 5.0], np.float32)[:, None, None, None]
    )
    for p in (0.5, 0.9, 0.995):
        ours = dynamic_threshold(x0, p)
        theirs = ref_threshold(torch.from_numpy(x0), p).numpy()
        assert ours.dtype == np.float32 and ours.shape == x0.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
        assert np.abs(ours).max() <= 1.0 + 1e-6
    np.testing.assert_array_equal(dynamic_threshold(x0[:1] * 0.1, 0.9), x0[:1] * 0.1)  # s = 1: unchanged
    for kind, maximum in (("dynamic", 1.5), ("dynamic", 1.0), ("clip", None), ("none", None)):
        ours = threshold(x0, kind, 0.95, maximum)
        theirs = ref_threshold_kind(torch.from_numpy(x0), kind, 0.95, maximum).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6, err_msg=kind)
        assert np.abs(ours).max() <= (1.0 + 1e-6 if kind != "none" else np.abs(x0).max())


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("n_in,n_out", [(16, 32), (8, 64), (5, 13), (32, 32), (3, 4), (64, 256)])
def test_resize_matches_reference(n_in, n_out, align_corners):
    import torch

    from imagen.reference.images import resize_image as ref_resize

    x = np.random.default_rng(n_in * n_out).standard_normal((2, 3, n_in, n_in), dtype=np.float32)
    ours = resize_image(x, n_out, align_corners=align_corners)
    theirs = ref_resize(torch.from_numpy(x), n_out, align_corners=align_corners).numpy()
    assert ours.shape == (2, 3, n_out, n_out) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


# Samplers against their reference twins


def _fake_denoise_np(x, t):
    return np.float32(0.9 - 0.002 * t) * x + np.float32(0.01 * t)


def _fake_denoise_torch(x, t):
    import torch

    return torch.tensor(0.9 - 0.002 * t, dtype=torch.float32) * x + torch.tensor(0.01 * t, dtype=torch.float32)


@pytest.mark.parametrize(
    "sampler,steps,eta",
    [
        ("ddpm", 30, 0.0),
        ("ddpm", 5, 0.0),
        ("ddim", 5, 0.0),
        ("ddim", 7, 0.5),
        ("ddim", 4, 1.0),
        ("dpmpp_2m", 5, 0.0),
        ("dpmpp_2m", 1, 0.0),
        ("dpmpp_2m", 12, 0.0),
        ("dpmpp_2m_sde", 1, 0.0),
        ("dpmpp_2m_sde", 6, 0.0),
        ("euler_a", 1, 0.0),
        ("euler_a", 7, 0.0),
    ],
)
def test_sampler_matches_reference_every_step(sampler, steps, eta):
    import torch

    from imagen.reference.diffusion import GaussianDiffusion
    from imagen.reference.imagen import make_noise_source
    from imagen.reference.samplers import run_sampler as ref_run_sampler

    reference = GaussianDiffusion(timesteps=30, schedule="linear")
    schedule = Schedule(reference.betas_array)
    timesteps = spaced_timesteps(schedule.num_timesteps, steps)
    start = np.random.default_rng(1).standard_normal((2, 3, 8, 8), dtype=np.float32)
    ours, theirs = [], []
    gen_a, gen_b = (np.random.Generator(np.random.PCG64(7)) for _ in range(2))
    out = run_sampler(
        sampler,
        _fake_denoise_np,
        start.copy(),
        schedule.alphas_cumprod,
        timesteps,
        lambda shape: gen_a.standard_normal(shape, dtype=np.float32),
        eta,
        lambda i, t, x: ours.append((i, t, x.copy())),
    )
    ref_out = ref_run_sampler(
        sampler,
        _fake_denoise_torch,
        torch.from_numpy(start.copy()),
        reference.alphas_cumprod.numpy(),
        timesteps,
        make_noise_source(gen_b),
        eta,
        lambda i, t, x: theirs.append((i, t, x.numpy().copy())),
    )
    assert len(ours) == len(theirs) == steps
    for (i, t, x), (j, u, y) in zip(ours, theirs, strict=False):
        assert (i, t) == (j, u) and x.dtype == np.float32
        assert relative_error(x, y) <= 1e-5, (sampler, i, t, relative_error(x, y))
    assert relative_error(out, ref_out.numpy()) <= 1e-5
    # both drew the same number of noise arrays
    assert gen_a.bit_generator.state == gen_b.bit_generator.state


def test_the_runtime_runs_every_sampler_the_contract_names():
    from imagen.runtime.continuous import TABLE_SAMPLERS
    from imagen.runtime.contract import SAMPLER_NAMES
    from imagen.runtime.samplers import SAMPLERS

    assert tuple(SAMPLERS) + tuple(TABLE_SAMPLERS) == SAMPLER_NAMES


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0)])
def test_diffusers_spacings_match_reference(spacing, offset):
    from imagen.reference.samplers import spaced_timesteps as reference_timesteps

    for steps in (1, 3, 50, 100, 1000):
        ours = spaced_timesteps(1000, steps, 1.0, spacing, offset)
        assert ours == reference_timesteps(1000, steps, 1.0, spacing, offset)
        assert len(ours) == steps and ours == sorted(ours, reverse=True)


class _LearnedVariance:
    """A denoiser with a learned variance (DeepFloyd IF's Unets) for either namespace: x0 as the fake
    denoisers above, variance v = tanh(x) in [-1, 1]."""

    def __init__(self, torch_side: bool):
        self.torch_side, self.variance = torch_side, None

    def __call__(self, x, t):
        if self.torch_side:
            import torch

            self.variance = torch.tanh(x)
            return _fake_denoise_torch(x, t)
        self.variance = np.tanh(x)
        return _fake_denoise_np(x, t)


@pytest.mark.parametrize("steps", [1, 4, 30])
def test_learned_variance_ddpm_matches_reference(steps):
    import torch

    from imagen.reference.diffusion import GaussianDiffusion
    from imagen.reference.imagen import make_noise_source
    from imagen.reference.samplers import sample_ddpm as ref_sample_ddpm
    from imagen.runtime.samplers import sample_ddpm

    reference = GaussianDiffusion(timesteps=30, schedule="cosine")
    schedule = Schedule(reference.betas_array)
    timesteps = spaced_timesteps(30, steps, spacing="leading")
    start = np.random.default_rng(2).standard_normal((2, 3, 8, 8), dtype=np.float32)
    gen_a, gen_b = (np.random.Generator(np.random.PCG64(5)) for _ in range(2))
    ours = sample_ddpm(
        _LearnedVariance(False), start.copy(), schedule.alphas_cumprod, timesteps,
        lambda shape: gen_a.standard_normal(shape, dtype=np.float32),
    )  # fmt: skip
    theirs = ref_sample_ddpm(
        _LearnedVariance(True), torch.from_numpy(start.copy()), reference.alphas_cumprod.numpy(), timesteps,
        make_noise_source(gen_b),
    )  # fmt: skip
    assert relative_error(ours, theirs.numpy()) <= 1e-5
    assert gen_a.bit_generator.state == gen_b.bit_generator.state
    fixed = sample_ddpm(
        _fake_denoise_np, start.copy(), schedule.alphas_cumprod, timesteps,
        lambda shape: np.random.Generator(np.random.PCG64(5)).standard_normal(shape, dtype=np.float32),
    )  # fmt: skip
    if steps > 1:  # the learned variance changes the noise it adds
        assert relative_error(ours, fixed) > 1e-3


# imagen-pytorch's stages: the table samplers, remove-parallel guidance, nearest resize


def _tables():
    from imagen.export.imagen_pytorch_tables import continuous_table, karras_table, lowres_scalars

    karras = karras_table(6, 0.002, 80.0, 0.5, 7.0, 40.0, 0.05, 50.0, 1.003)
    return {
        "ddpm_continuous": continuous_table("cosine", 12),
        "heun_edm": {**karras, **lowres_scalars("linear", 0.2, False)},
    }


@pytest.mark.parametrize(
    "sampler,prediction",
    [("ddpm_continuous", "noise"), ("ddpm_continuous", "x_start"), ("ddpm_continuous", "v"), ("heun_edm", "edm")],
)
def test_table_samplers_match_reference(sampler, prediction):
    """Both twins walk the same table with the same draws and the same toy Unet (x0 a smooth function of
    x, the step's scalars and the self-conditioning), step for step."""
    import torch

    from imagen.reference.continuous import TABLE_SAMPLERS as REFERENCE
    from imagen.runtime.continuous import TABLE_SAMPLERS, data_prediction

    table = _tables()[sampler]
    draws = np.random.default_rng(0).standard_normal((40, 2, 3, 8, 8), dtype=np.float32)
    sides = {}
    for side, xp in (("runtime", np), ("reference", torch)):
        taken, steps = iter(draws), []

        def denoise(x, row, self_cond, xp=xp):
            scaled = row["c_in"] * x if "c_in" in row else x
            out = xp.tanh(scaled * 0.5 + row["time"] * 0.01) + (0 if self_cond is None else 0.1 * self_cond)
            x0 = (
                data_prediction(x, out, row, prediction) if xp is np else _reference_prediction(x, out, row, prediction)
            )
            return xp.clip(x0, -1.0, 1.0)

        def noise(shape, xp=xp, taken=taken):
            value = next(taken)
            assert value.shape == tuple(shape)
            return value if xp is np else torch.from_numpy(value.copy())

        start = draws[-1] if xp is np else torch.from_numpy(draws[-1].copy())
        loop = TABLE_SAMPLERS[sampler] if xp is np else REFERENCE[sampler]
        out = loop(denoise, start, table, noise, lambda i, t, x, steps=steps: steps.append(np.asarray(x)))
        sides[side] = (np.asarray(out), steps)
    (ours, our_steps), (theirs, their_steps) = sides["runtime"], sides["reference"]
    assert len(our_steps) == len(their_steps) == len(table["sigma" if sampler == "heun_edm" else "time"])
    # the toy Unet's tanh differs between NumPy and torch in the last bit; the loops add nothing to that
    worst = max(relative_error(mine, reference) for mine, reference in zip(our_steps, their_steps, strict=True))
    assert worst <= 1e-6 and relative_error(ours, theirs) <= 1e-6, worst


def _reference_prediction(x, out, row, prediction):
    """The runtime's `data_prediction` formulas on torch tensors (the reference holds the same function)."""
    from imagen.reference.continuous import data_prediction

    return data_prediction(x, out, row, prediction)


def test_remove_parallel_guidance_and_nearest_resize_match_reference():
    import torch

    from imagen.reference.guidance import remove_parallel_guidance as reference_guidance
    from imagen.reference.images import resize_nearest as reference_resize
    from imagen.runtime.guidance import remove_parallel_guidance
    from imagen.runtime.images import resize_nearest

    rng = np.random.default_rng(3)
    cond, uncond = (rng.standard_normal((3, 3, 8, 8), dtype=np.float32) for _ in range(2))
    ours = remove_parallel_guidance(cond, uncond, 4.0)
    theirs = reference_guidance(torch.from_numpy(cond), torch.from_numpy(uncond), 4.0).numpy()
    np.testing.assert_array_equal(ours, theirs)
    update = (ours - cond).reshape(3, -1).astype(np.float64)  # what is added is orthogonal to cond
    cosine = (
        (update * cond.reshape(3, -1)).sum(-1)
        / np.linalg.norm(update, axis=-1)
        / np.linalg.norm(cond.reshape(3, -1), axis=-1)
    )
    assert np.abs(cosine).max() < 1e-6
    image = np.clip(rng.standard_normal((2, 3, 8, 8), dtype=np.float32), -1, 1)
    for size in (16, 24, 8):
        np.testing.assert_array_equal(
            resize_nearest(image, size), reference_resize(torch.from_numpy(image), size).numpy()
        )
