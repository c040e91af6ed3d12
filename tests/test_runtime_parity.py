"""The NumPy runtime against the PyTorch reference on the tiny trained run: every sampler
step, the final images (FP32 and FP16 bundles), and thread safety.

The reference loads the weights the bundle was exported from (export_bundle's default
--weights latest), encodes the prompts with its own text encoder and samples with
`Imagen.sample(noise=Generator(PCG64(seed)))`, drawing the same numbers in the same
order as the runtime (docs/bundle.md)."""

import json
import threading

import numpy as np
import pytest

from imagen.export.parity import relative_error
from imagen.runtime import Pipeline
from imagen.runtime.samplers import spaced_timesteps

PROMPTS = ["a red circle", "two blue squares on a grün background"]
SEED = 1234


def to_uint8(images: np.ndarray) -> np.ndarray:
    """The reference's uint8 conversion of its (N, C, s, s) images in [0, 1]."""
    import torch

    from imagen.reference.images import to_uint8 as reference_to_uint8

    return reference_to_uint8(torch.from_numpy(images)).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def reference(tiny_run, bundle_fp32):
    import torch

    from imagen.reference.checkpoint import load_run

    torch.set_num_threads(2)
    manifest = json.loads((bundle_fp32 / "manifest.json").read_text())
    run = load_run(tiny_run, manifest["source"]["weights"])
    return run


def reference_sample(run, prompts, seed, **kwargs):
    steps_seen = []
    embeds, mask = run.text_encoder.encode(prompts)
    images = run.imagen.sample(
        embeds,
        mask,
        noise=np.random.Generator(np.random.PCG64(seed)),
        callback=lambda u, i, t, x: steps_seen.append((u, i, t, x.numpy().copy())),
        **kwargs,
    )
    return images.numpy(), steps_seen


def runtime_sample(pipe, prompts, seed, **kwargs):
    steps_seen = []
    result = pipe(prompts, seed=seed, callback=lambda u, i, t, x: steps_seen.append((u, i, t, x.copy())), **kwargs)
    return result, steps_seen


@pytest.fixture(scope="module")
def pipe_fp32(bundle_fp32):
    return Pipeline.load(bundle_fp32, backend="onnxruntime", threads=1)


def compare_steps(ours, theirs, tolerance, label):
    assert len(ours) == len(theirs) and ours, label
    worst = 0.0
    for (u, i, t, x), (v, j, s, y) in zip(ours, theirs, strict=False):
        assert (u, i, t) == (v, j, s), label
        error = relative_error(x, y)
        worst = max(worst, error)
        assert error <= tolerance, f"{label}: unet {u} step {i} (t={t}) relative error {error:.2e} > {tolerance:.0e}"
    return worst


def test_fp32_ddpm_all_steps_and_final_images(reference, pipe_fp32):
    images, ref_steps = reference_sample(reference, PROMPTS, SEED)
    result, steps = runtime_sample(pipe_fp32, PROMPTS, SEED)
    base = [s for s in steps if s[0] == 0]
    assert len(base) == pipe_fp32.bundle.schedules["unet_0"].num_timesteps
    worst = compare_steps(steps, ref_steps, 1e-4, "ddpm fp32")
    ours, theirs = result.array, to_uint8(images)
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    over_one = float(np.mean(diff > 1))
    value = psnr(ours, theirs)
    print(
        f"\nfp32 ddpm: worst per-step rel error {worst:.2e}; uint8 max diff {diff.max()}, "
        f"fraction > 1 level {over_one:.4%}, PSNR {value:.1f} dB"
    )
    assert over_one <= 0.001 and value >= 45.0


def test_fp16_bundle_against_fp32_reference(reference, bundle_fp16):
    pipe = Pipeline.load(bundle_fp16, backend="onnxruntime", threads=1)
    assert pipe.bundle.stages["unet_0"].precision == "fp16"
    images, _ = reference_sample(reference, PROMPTS, SEED)
    result, steps = runtime_sample(pipe, PROMPTS, SEED)
    assert all(np.isfinite(x).all() for _, _, _, x in steps)
    value = psnr(result.array, to_uint8(images))
    diff = np.abs(result.array.astype(np.int16) - to_uint8(images).astype(np.int16))
    print(f"\nfp16 bundle vs fp32 reference: PSNR {value:.1f} dB, uint8 max diff {diff.max()}")
    assert value >= 30.0


@pytest.mark.parametrize(
    "sampler,steps,eta",
    [
        ("ddpm", 5, 0.0),
        ("ddim", 5, 0.0),
        ("ddim", 5, 0.5),
        ("dpmpp_2m", 5, 0.0),
        ("dpmpp_2m_sde", 5, 0.0),
        ("euler_a", 5, 0.0),
    ],
)
def test_each_sampler_every_step_fp32(sampler, steps, eta, reference, pipe_fp32):
    images, ref_steps = reference_sample(reference, PROMPTS, SEED + 1, sampler=sampler, steps=steps, eta=eta)
    result, ours = runtime_sample(pipe_fp32, PROMPTS, SEED + 1, sampler=sampler, steps=steps, eta=eta)
    assert len(ours) == 2 * steps
    worst = compare_steps(ours, ref_steps, 1e-4, f"{sampler} eta={eta}")
    value = psnr(result.array, to_uint8(images))
    print(f"\n{sampler} steps={steps} eta={eta}: worst per-step rel error {worst:.2e}, final PSNR {value:.1f} dB")
    assert value >= 45.0


@pytest.mark.parametrize("sampler,steps,sr_strength", [("ddpm", 8, 0.5), ("dpmpp_2m", 5, 0.6)])
def test_sr_strength_every_step_fp32(sampler, steps, sr_strength, reference, pipe_fp32):
    images, ref_steps = reference_sample(
        reference, PROMPTS, SEED + 2, sampler=sampler, steps=steps, sr_strength=sr_strength
    )
    result, ours = runtime_sample(pipe_fp32, PROMPTS, SEED + 2, sampler=sampler, steps=steps, sr_strength=sr_strength)
    kept = round(steps * sr_strength)
    assert len(ours) == steps + kept
    assert [t for u, _, t, _ in ours if u == 1] == spaced_timesteps(pipe_fp32.bundle.timesteps[1], steps)[-kept:]
    worst = compare_steps(ours, ref_steps, 1e-4, f"{sampler} sr_strength={sr_strength}")
    value = psnr(result.array, to_uint8(images))
    print(
        f"\n{sampler} steps={steps} sr_strength={sr_strength}: worst per-step rel error {worst:.2e}, "
        f"final PSNR {value:.1f} dB"
    )
    assert value >= 45.0
    assert result.info[0]["sr_strength"] == sr_strength


def test_small_sr_strength_keeps_the_upsampled_base_image(pipe_fp32):
    """One super-resolution step at t = 0 starts from the upsampled base image plus noise of
    std sqrt(beta_0) = 0.058 (T = 30), so the output stays within about that of it (0.067
    measured); from pure noise it does not (0.55)."""
    from imagen.runtime.images import resize_image

    size = pipe_fp32.bundle.manifest.image_sizes[1]
    errors = {}
    for strength in (0.01, 1.0):
        result, seen = runtime_sample(pipe_fp32, PROMPTS, SEED, sampler="ddim", steps=[4, 30], sr_strength=strength)
        base = np.clip([x for u, _, _, x in seen if u == 0][-1], -1, 1)
        up = (resize_image(base, size) + 1) / 2
        errors[strength] = relative_error(result.array.transpose(0, 3, 1, 2) / 255.0, up)
    print(f"\nrel. distance of the output from the upsampled base image: {errors}")
    assert errors[0.01] < 0.1 and errors[1.0] > 0.3


def test_guidance_scale_one_and_images_per_prompt_match_reference(reference, pipe_fp32):
    import torch

    embeds, mask = reference.text_encoder.encode(PROMPTS[:1])
    embeds, mask = embeds.repeat(2, 1, 1), mask.repeat(2, 1)
    ref_steps = []
    reference.imagen.sample(
        embeds,
        mask,
        noise=np.random.Generator(np.random.PCG64(5)),
        guidance_scale=1.0,
        sampler="ddim",
        steps=4,
        callback=lambda u, i, t, x: ref_steps.append((u, i, t, x.numpy())),
    )
    _, ours = runtime_sample(
        pipe_fp32, PROMPTS[:1], 5, guidance_scale=1.0, sampler="ddim", steps=4, num_images_per_prompt=2
    )
    assert isinstance(embeds, torch.Tensor)
    compare_steps(ours, ref_steps, 1e-4, "guidance 1, 2 images per prompt")


def test_threads_share_one_pipeline(pipe_fp32):
    seeds = [11, 12, 13, 14]
    serial = {seed: pipe_fp32(PROMPTS[:1], seed=seed, steps=4, sampler="ddim").array for seed in seeds}
    results, failures = {}, []

    def work(seed):
        try:
            results[seed] = pipe_fp32(PROMPTS[:1], seed=seed, steps=4, sampler="ddim").array
        except Exception as error:  # reported below
            failures.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    for seed in seeds:
        np.testing.assert_array_equal(results[seed], serial[seed])
    assert len({serial[s].tobytes() for s in seeds}) == len(seeds)
