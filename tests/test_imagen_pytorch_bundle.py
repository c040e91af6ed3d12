"""imagen-pytorch checkpoints through the whole chain: tiny `Imagen` and `ElucidatedImagen` cascades that
imagen-pytorch 2.1.0 trained and saved itself (tests/imagen_pytorch_tiny.py), exported by imagen-export
and sampled by the runtime, held step for step against imagen-pytorch's own `sample()` fed the runtime's
draws (tests/imagen_pytorch_sample.py, in a child process).

Measured here, and asserted with margin:
- the per-step tables (log-SNR, alpha, sigma; Karras sigmas, gammas, preconditioning) equal
  imagen-pytorch's float32 values bit for bit, on its sampling times and on a grid holding t = 0 and 1;
- every Unet call's image and data prediction within `STEP_TOLERANCE` relative of imagen-pytorch's,
  with the same number of calls (continuous: T per Unet; Heun: 2N - 1), and the final images within one
  uint8 level;
- an FP16 bundle's steps within the FP16 tolerance of the FP32 bundle's;
- the bundle runs in imagen-run and imagen-serve like any other; wrong samplers and steps are refused.
"""

import json

import numpy as np
import pytest
from imagen_pytorch_sample import run_child
from imagen_pytorch_tiny import ELUCIDATED, IMAGEN, missing_packages

from imagen.export.parity import relative_error
from imagen.runtime.errors import ParameterError

from serving import URL, WAIT, decode_png, needs_web

pytestmark = pytest.mark.skipif(
    bool(missing_packages()), reason=f"imagen-pytorch 2.1.0 is not installed (missing: {missing_packages()})"
)

STEP_TOLERANCE = 1e-4  # relative, per Unet call (ONNX Runtime's Unet against torch's, through the steps)
FP16_TOLERANCE = 3e-2
GUIDANCE = 3.0
TEXT_LENGTH = 256  # imagen-pytorch's T5 length, the bundle's max_length
TOKENS = (10, 5)  # the two prompts' tokens


@pytest.fixture(scope="module")
def tiny(imagen_pytorch_files):
    return imagen_pytorch_files


@pytest.fixture(scope="module")
def bundles(imagen_pytorch_bundles):
    return imagen_pytorch_bundles


def text_inputs():
    rng = np.random.default_rng(5)
    mask = np.arange(TEXT_LENGTH)[None, :] < np.array(TOKENS)[:, None]
    embeds = rng.standard_normal((len(TOKENS), TEXT_LENGTH, 32), dtype=np.float32) * mask[..., None]
    return embeds.astype(np.float32), mask


def runtime_sample(bundle, monkeypatch, seed=0):
    """The runtime's cascade on `text_inputs()`: (final images in [0, 1], its draws, per call (x, x0))."""
    from imagen.runtime import Pipeline
    from imagen.runtime.continuous import TableDenoiser

    rng, draws, calls = np.random.default_rng(seed), [], []
    call = TableDenoiser.__call__

    def record(self, x, row, self_cond=None):
        x0 = call(self, x, row, self_cond)
        calls.append((np.array(x), np.array(x0)))
        return x0

    def noise(shape):
        draws.append(rng.standard_normal(shape, dtype=np.float32))
        return draws[-1]

    monkeypatch.setattr(TableDenoiser, "__call__", record)
    with Pipeline.load(bundle) as pipe:
        embeds, mask = text_inputs()
        x = pipe.sample(embeds, mask, noise, pipe.settings(guidance_scale=GUIDANCE))
    monkeypatch.undo()
    return (np.asarray(x) + 1.0) * 0.5, draws, calls


def upstream_sample(tiny, name, draws, tmp_path):
    """imagen-pytorch's sample() of the same checkpoint (EMA weights) fed the runtime's draws."""
    embeds, mask = text_inputs()
    inputs = tmp_path / f"inputs-{name}.npz"
    np.savez(
        inputs, text_embeds=embeds, text_masks=mask, draws=len(draws), **{f"draw_{i}": d for i, d in enumerate(draws)}
    )
    job = dict(mode="sample", checkpoint=str(tiny[name]), ema=True, cond_scale=GUIDANCE, inputs=str(inputs))
    return run_child(job, tmp_path / f"child-{name}")


def to_uint8(images):
    return np.floor(np.clip(images, 0, 1) * 255 + 0.5).astype(np.int16)


def test_tables_equal_imagen_pytorch_float32_bit_for_bit(tiny, tmp_path):
    import torch

    from imagen.export.imagen_pytorch_tables import continuous_table, karras_table, log_snr

    steps = [20, 10, 1000]
    karras = {
        "unet1": dict(
            steps=6, sigma_min=0.002, sigma_max=80, rho=7, sigma_data=0.5, S_churn=40, S_tmin=0.05, S_tmax=50
        ),
        "unet2": dict(steps=4, sigma_min=0.002, sigma_max=40, rho=7, sigma_data=0.5, S_churn=0, S_tmin=0.05, S_tmax=50),
        "defaults": dict(
            steps=32, sigma_min=0.002, sigma_max=80, rho=7, sigma_data=0.5, S_churn=80, S_tmin=0.05, S_tmax=50
        ),
    }
    upstream = run_child(dict(mode="tables", steps=steps, karras=karras, elucidated=str(tiny["elucidated"])), tmp_path)
    checked = 0
    for schedule in ("cosine", "linear"):
        for count in steps:
            table = continuous_table(schedule, count)
            for name, theirs in (("time", "log_snr"), ("alpha", "alpha"), ("sigma", "sigma")):
                ours = np.array(table[name], np.float32)
                np.testing.assert_array_equal(
                    ours, upstream[f"{schedule}_{count}_{theirs}"], err_msg=f"{schedule} {count} {name}"
                )
                checked += ours.size
        grid = torch.from_numpy(upstream["grid"])
        ours = np.array([log_snr(schedule, t.reshape(1)).item() for t in grid], np.float32)
        np.testing.assert_array_equal(ours, upstream[f"{schedule}_grid"], err_msg=f"{schedule} grid")
        assert upstream["grid"][0] == 0.0 and upstream["grid"][-1] == 1.0
    cosine_end = continuous_table("cosine", 1000)["time"][0]
    print(f"cosine log-SNR at t = 1 in float32: {cosine_end:.6f} (float64 gives about -75)")
    assert -34.0 < cosine_end < -33.8
    for name, hp in karras.items():
        hp = dict(hp)
        count = hp.pop("steps")
        table = karras_table(count, **hp, S_noise=1.003)
        np.testing.assert_array_equal(np.array(table["sigma"], np.float32), upstream[f"{name}_sigmas"][:-1])
        np.testing.assert_array_equal(np.array(table["gamma"], np.float32), upstream[f"{name}_gammas"][:-1])
        for ours, theirs in (("c_in", "c_in"), ("c_skip", "c_skip"), ("c_out", "c_out"), ("time", "c_noise")):
            upstream_first = upstream[f"{name}_{theirs}"][0::2]  # at sigma_hat; [1::2] at sigma_next
            np.testing.assert_array_equal(np.array(table[ours], np.float32), upstream_first, err_msg=f"{name} {ours}")
            last = count - 1  # no second call on the last step (sigma_next = 0): the table holds 0 there
            upstream_next = upstream[f"{name}_{theirs}"][1::2][:last]
            np.testing.assert_array_equal(np.array(table[f"{ours}_next"][:last], np.float32), upstream_next)
        checked += count * 10
    print(f"{checked} float32 values equal imagen-pytorch's bit for bit")


@pytest.mark.parametrize("name", ["imagen", "elucidated"])
def test_runtime_samples_step_for_step_as_imagen_pytorch(tiny, bundles, name, tmp_path, monkeypatch):
    manifest = json.loads((bundles[name] / "manifest.json").read_text())
    images, draws, calls = runtime_sample(bundles[name], monkeypatch)
    upstream = upstream_sample(tiny, name, draws, tmp_path)
    config = IMAGEN if name == "imagen" else ELUCIDATED
    expected_calls = (
        sum(config["timesteps"]) if name == "imagen" else sum(2 * n - 1 for n in config["num_sample_steps"])
    )
    assert len(calls) == int(upstream["calls"]) == expected_calls
    worst = {"x": 0.0, "x0": 0.0}
    for i, (x, x0) in enumerate(calls):
        worst["x"] = max(worst["x"], relative_error(x, upstream[f"x_{i}"]))
        worst["x0"] = max(worst["x0"], relative_error(x0, upstream[f"x0_{i}"]))
    levels = np.abs(to_uint8(images) - to_uint8(upstream["images"])).max()
    print(
        f"{name}: {len(calls)} Unet calls, worst relative error x {worst['x']:.1e}, x0 {worst['x0']:.1e}; "
        f"final images within {levels} uint8 level(s)"
    )
    assert worst["x"] <= STEP_TOLERANCE and worst["x0"] <= STEP_TOLERANCE
    assert levels <= 1
    sampling = manifest["stages"]["unet_1"]["sampling"]
    assert sampling["resize"] == "nearest" and sampling["guidance"] == "remove_parallel"
    assert manifest["defaults"]["sampler"] == ("ddpm_continuous" if name == "imagen" else "heun_edm")


def test_fp16_bundle_steps_within_the_fp16_tolerance(tiny, bundles, tmp_path, monkeypatch):
    from imagen.export.bundle import export_bundle

    fp16 = tmp_path / "fp16"
    export_bundle(tiny["imagen"], fp16, text_encoder=tiny["t5"], ema=True, max_batch=2, fp16=True, force=True)
    precisions = {
        s["precision"]
        for n, s in json.loads((fp16 / "manifest.json").read_text())["stages"].items()
        if n != "text_encoder"
    }
    assert precisions == {"fp16"}
    _, _, half = runtime_sample(fp16, monkeypatch)
    _, _, full = runtime_sample(bundles["imagen"], monkeypatch)
    worst = max(relative_error(a[1], b[1]) for a, b in zip(half, full, strict=True))
    print(f"FP16 against FP32: worst data prediction relative error {worst:.1e}")
    assert worst <= FP16_TOLERANCE


def test_the_bundle_runs_in_imagen_run_and_refuses_other_samplers(bundles, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from imagen.runtime import Pipeline
    from imagen.runtime.cli import main

    out = tmp_path / "image.png"
    result = CliRunner().invoke(
        main, ["a red circle", "--bundle", str(bundles["elucidated"]), "--seed", "3", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (16, 16)
    with Pipeline.load(bundles["imagen"]) as pipe:
        assert pipe.model_calls(pipe.settings()) == [20, 10]
        again = pipe("a red circle", seed=3)
        np.testing.assert_array_equal(again.array, pipe("a red circle", seed=3).array)
        with pytest.raises(ParameterError, match="ddpm_continuous"):
            pipe.settings(sampler="ddim")
        with pytest.raises(ParameterError, match="fixed by the bundle's per-step table"):
            pipe.settings(steps=5)
    with Pipeline.load(bundles["elucidated"]) as pipe:
        assert pipe.model_calls(pipe.settings()) == [11, 7]
        with pytest.raises(ParameterError, match="heun_edm"):
            pipe.settings(sampler="ddpm")


@needs_web
def test_imagen_serve_serves_the_bundle(bundles):
    from fastapi.testclient import TestClient

    from imagen.runtime import Pipeline
    from imagen.runtime.serve import ServeConfig, create_app

    with Pipeline.load(bundles["elucidated"]) as pipe:
        app = create_app(pipe, ServeConfig(max_wait_ms=0))
        with TestClient(app) as client:
            assert app.state.service.ready.wait(WAIT)
            reply = client.post(URL, json={"prompt": "a blue square", "seed": 4})
            assert reply.status_code == 200, reply.text
            (item,) = reply.json()["data"]
            served = np.asarray(decode_png(item["b64_json"]))
            refused = client.post(URL, json={"prompt": "a blue square", "seed": 4, "steps": 3})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "steps", refused.text
        np.testing.assert_array_equal(served, pipe("a blue square", seed=4).array[0])
        assert item["imagen"]["sampler"] == "heun_edm"
