"""The reference model: schedule math, guidance, thresholding, presets, overfitting."""

import math

import numpy as np
import pytest
import torch

from imagen.reference.diffusion import GaussianDiffusion, make_betas
from imagen.reference.guidance import GuidedDenoiser, apply_guidance, dynamic_threshold
from imagen.reference.imagen import Imagen, ImagenConfig, make_noise_source
from imagen.reference.unet import PRESETS, Base, BaseTest, Super, SuperTest, Unet, preset_config

TEXT_DIM, TEXT_LEN = 16, 8


def test_linear_schedule_matches_closed_form():
    T = 50
    betas = make_betas("linear", T)
    scale = 1000 / T
    expected = scale * 1e-4 + np.arange(T) * (scale * 0.02 - scale * 1e-4) / (T - 1)
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    d = GaussianDiffusion(timesteps=T)
    assert d.alphas_cumprod.dtype == torch.float64
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), np.cumprod(1 - expected), rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_prev.numpy()[1:], d.alphas_cumprod.numpy()[:-1])
    assert d.alphas_cumprod_prev[0] == 1.0


def test_cosine_schedule_matches_closed_form():
    T = 100
    betas = make_betas("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    for t in (0, 10, 50, 98):  # away from the 0.999 clip at the very end
        assert alphas_cumprod[t] == pytest.approx(f(t + 1) / f(0), rel=1e-10)


@pytest.mark.parametrize("T", [0, 20])
def test_schedule_rejects_degenerate_lengths(T):
    with pytest.raises(ValueError, match="timesteps"):
        make_betas("linear", T)


def test_q_posterior_matches_ddpm_equations():
    """DDPM eq. 6-7, computed here directly from the betas in float64."""
    T = 40
    d = GaussianDiffusion(timesteps=T)
    betas = make_betas("linear", T)
    ac = np.cumprod(1 - betas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    xt = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 17, 39])
    mean, var, log_var = d.q_posterior(x0, xt, t)
    for row, ti in enumerate(t.tolist()):
        coef1 = np.sqrt(ac_prev[ti]) * betas[ti] / (1 - ac[ti])
        coef2 = np.sqrt(1 - betas[ti]) * (1 - ac_prev[ti]) / (1 - ac[ti])
        np.testing.assert_allclose(mean[row].numpy(), coef1 * x0[row].numpy() + coef2 * xt[row].numpy(), rtol=1e-12)
        beta_tilde = (1 - ac_prev[ti]) / (1 - ac[ti]) * betas[ti]
        assert var[row].item() == pytest.approx(beta_tilde, rel=1e-12)
        assert log_var[row].item() == pytest.approx(math.log(max(beta_tilde, 1e-20)), rel=1e-12)


def test_predict_start_inverts_q_sample():
    d = GaussianDiffusion(timesteps=100)
    x0 = torch.rand(3, 3, 4, 4, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 50, 99])
    xt = d.q_sample(x0, t, noise)
    torch.testing.assert_close(d.predict_start_from_noise(xt, t, noise), x0, rtol=1e-9, atol=1e-9)


def test_dynamic_threshold_keeps_x0_in_range_and_matches_definition():
    torch.manual_seed(0)
    x0 = torch.randn(6, 3, 8, 8) * torch.tensor([0.3, 1.0, 2.0, 5.0, 10.0, 0.9]).reshape(-1, 1, 1, 1)
    out = dynamic_threshold(x0, 0.9)
    assert out.abs().max() <= 1.0 + 1e-6
    for row in range(6):
        s = max(np.quantile(np.abs(x0[row].numpy()).ravel(), 0.9), 1.0)
        np.testing.assert_allclose(out[row].numpy(), np.clip(x0[row].numpy(), -s, s) / s, rtol=1e-5, atol=1e-6)
    # Samples already inside [-1, 1] with a small quantile are left alone (s = 1).
    torch.testing.assert_close(out[0], x0[0].clamp(-1, 1))


def small_unet(lowres=False, **kw):
    config = preset_config(
        "BaseTest",
        text_embed_dim=TEXT_DIM,
        max_text_len=TEXT_LEN,
        lowres_cond=lowres,
        layer_cross_attns=(False, True),
        **kw,
    )
    torch.manual_seed(0)
    return Unet(config).eval()


def unet_inputs(batch=3, size=16, lowres=False):
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        x=torch.randn(batch, 3, size, size, generator=gen),
        time=torch.tensor([5.0, 200.0, 999.0])[:batch],
        text_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        text_mask=torch.arange(TEXT_LEN)[None].repeat(batch, 1) < torch.tensor([3, 8, 1])[:batch, None],
    )
    if lowres:
        inputs["lowres_cond_img"] = torch.randn(batch, 3, size, size, generator=gen)
        inputs["lowres_noise_times"] = torch.full((batch,), 200.0)
    return inputs


@pytest.mark.parametrize("lowres", [False, True])
def test_text_keep_false_equals_null_conditioning(lowres):
    unet = small_unet(lowres)
    inputs = unet_inputs(lowres=lowres)
    x = inputs.pop("x")
    with torch.no_grad():
        dropped = unet(x, text_keep=torch.zeros(3, dtype=torch.bool), **inputs)
        dropped_prob = unet(x, cond_drop_prob=1.0, **inputs)
        # Null conditioning does not depend on the text at all.
        other = dict(inputs, text_embeds=torch.randn_like(inputs["text_embeds"]))
        dropped_other = unet(x, text_keep=torch.zeros(3, dtype=torch.bool), **other)
        kept = unet(x, text_keep=torch.ones(3, dtype=torch.bool), **inputs)
        kept_default = unet(x, **inputs)
        mixed = unet(x, text_keep=torch.tensor([True, False, True]), **inputs)
    torch.testing.assert_close(dropped, dropped_prob, rtol=0, atol=0)
    torch.testing.assert_close(dropped, dropped_other, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kept, kept_default, rtol=0, atol=0)
    assert (kept - dropped).abs().max() > 1e-3
    torch.testing.assert_close(mixed[[0, 2]], kept[[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], dropped[1], rtol=1e-5, atol=1e-6)


def test_guidance_scale_one_equals_conditional_prediction():
    unet = small_unet()
    inputs = unet_inputs()
    x = inputs.pop("x")
    with torch.no_grad():
        cond = unet(x, text_keep=torch.ones(3, dtype=torch.bool), **inputs)
        uncond = unet(x, text_keep=torch.zeros(3, dtype=torch.bool), **inputs)
    torch.testing.assert_close(apply_guidance(cond, uncond, 1.0), cond, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_guidance(cond, uncond, 0.0), uncond, rtol=0, atol=0)
    # The cascade's batched [cond; uncond] call gives the same guided prediction.
    imagen = Imagen([unet.config], ImagenConfig(image_sizes=(16,), timesteps=25), TEXT_DIM)
    inputs["time"] = torch.full((3,), 5.0)
    with torch.no_grad():
        cond = unet(x, text_keep=torch.ones(3, dtype=torch.bool), **inputs)
        uncond = unet(x, text_keep=torch.zeros(3, dtype=torch.bool), **inputs)

    def guided_noise(scale):
        denoiser = GuidedDenoiser(
            unet,
            imagen.noise_schedulers[0],
            inputs["text_embeds"],
            inputs["text_mask"],
            guidance_scale=scale,
            percentile=0.9,
        )
        return denoiser.predict_noise(x, 5)

    guided = guided_noise(3.0)
    # Batch 6 and batch 3 may take different float32 kernels (~1e-6 apart), which a scale of 3
    # amplifies; a wrong combination would be off by O(1).
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-4)
    unguided = guided_noise(1.0)
    torch.testing.assert_close(
        unguided,
        unet(x, torch.full((3,), 5.0), text_embeds=inputs["text_embeds"], text_mask=inputs["text_mask"]),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_its_own_numbers(name):
    cls = {"Base": Base, "Super": Super, "BaseTest": BaseTest, "SuperTest": SuperTest}[name]
    if name in ("Base", "Super"):
        with torch.device("meta"):  # full-size networks: shapes only, no memory
            unet = cls(text_embed_dim=TEXT_DIM)
    else:
        unet = cls(text_embed_dim=TEXT_DIM)
    for key, value in PRESETS[name].items():
        assert getattr(unet.config, key) == value
    params = sum(p.numel() for p in unet.parameters())
    if name.endswith("Test"):
        # Upstream builds full-size networks for the test presets; ours stay tiny.
        assert params < 200_000, params
    else:
        assert params > 10_000_000, params


@pytest.mark.parametrize("name,lowres", [("BaseTest", False), ("SuperTest", True)])
def test_test_presets_shapes(name, lowres):
    unet = cls_unet = {"BaseTest": BaseTest, "SuperTest": SuperTest}[name](
        text_embed_dim=TEXT_DIM, max_text_len=TEXT_LEN, lowres_cond=lowres
    )
    inputs = unet_inputs(batch=2, size=16, lowres=lowres)
    with torch.no_grad():
        out = cls_unet(inputs.pop("x"), **inputs)
    assert out.shape == (2, 3, 16, 16)
    assert torch.isfinite(out).all()
    assert unet.downs[0][0] is not None if name == "SuperTest" else unet.downs[0][0] is None


def test_unet_overfits_one_small_batch():
    """Loss on one fixed batch (fixed t and noise) falls by 10x or more."""
    torch.manual_seed(0)
    imagen = Imagen(
        [preset_config("BaseTest", dim=16, max_text_len=TEXT_LEN)],
        ImagenConfig(image_sizes=(16,), timesteps=100),
        TEXT_DIM,
    )
    unet, schedule = imagen.unets[0], imagen.noise_schedulers[0]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([10, 30, 60, 90])
    xt = schedule.q_sample(x0, t, noise)
    text = torch.randn(4, TEXT_LEN, TEXT_DIM, generator=gen)
    mask = torch.ones(4, TEXT_LEN, dtype=torch.bool)
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        pred = unet(xt, t.float(), text_embeds=text, text_mask=mask)
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"overfit: loss {losses[0]:.4f} -> {losses[-1]:.4f} ({losses[0] / losses[-1]:.1f}x)")
    assert losses[-1] * 10 <= losses[0]


def test_sampling_with_injected_noise_is_reproducible_and_in_range():
    torch.manual_seed(0)
    unets = [preset_config("BaseTest", max_text_len=TEXT_LEN), preset_config("SuperTest", max_text_len=TEXT_LEN)]
    imagen = Imagen(unets, ImagenConfig(image_sizes=(8, 16), timesteps=25), TEXT_DIM)
    text = torch.randn(2, TEXT_LEN, TEXT_DIM)
    mask = torch.ones(2, TEXT_LEN, dtype=torch.bool)
    a = imagen.sample(text, mask, noise=np.random.default_rng(3))
    b = imagen.sample(text, mask, noise=np.random.default_rng(3))
    c = imagen.sample(text, mask, noise=np.random.default_rng(4))
    assert a.shape == (2, 3, 16, 16)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    assert a.min() >= 0 and a.max() <= 1


def test_noise_source_checks_injected_shapes():
    source = make_noise_source([np.zeros((2, 3), np.float32)])
    assert source((2, 3)).shape == (2, 3)
    with pytest.raises(ValueError, match="shape"):
        make_noise_source([np.zeros((2, 3), np.float32)])((3, 3))


def test_lowres_augmentation_in_training_stays_below_its_limit():
    schedule = GaussianDiffusion(timesteps=250)
    times = schedule.sample_random_times(20_000, generator=torch.Generator().manual_seed(0), max_level=0.3)
    assert int(times.min()) == 0 and int(times.max()) == 74  # uniform over [0, int(0.3 * 250))
    assert int(schedule.sample_random_times(1000, max_level=1e-6).max()) == 0

    torch.manual_seed(0)
    unets = [preset_config("BaseTest", max_text_len=TEXT_LEN), preset_config("SuperTest", max_text_len=TEXT_LEN)]
    imagen = Imagen(unets, ImagenConfig(image_sizes=(8, 16), timesteps=25), TEXT_DIM)
    seen = []
    draw = imagen.lowres_noise_schedule.sample_random_times
    imagen.lowres_noise_schedule.sample_random_times = lambda *a, **k: seen.append(draw(*a, **k)) or seen[-1]
    images, embeds = torch.rand(2, 3, 16, 16), torch.randn(2, TEXT_LEN, TEXT_DIM)
    mask = torch.ones(2, TEXT_LEN, dtype=torch.bool)
    for seed in range(20):
        imagen.loss(images, embeds, mask, 1, torch.Generator().manual_seed(seed), lowres_max_noise_level=0.2)
    assert max(int(t.max()) for t in seen) < 5 and len(seen) == 20
