"""The pipeline over fake backends (the hand-made bundle) and over the tiny exported bundle:
determinism, parameters (also under `python -O`), non-finite outputs, typed errors, signature
errors at the backend, TensorRT unavailable; eight threads on one Pipeline, and failing requests
that leave it healthy (docs/reliability.md items 8-12)."""

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from imagen.runtime import Pipeline, errors, load_bundle
from imagen.runtime.backends import OnnxRuntimeBackend
from imagen.runtime.errors import BackendError, NonFiniteError, ParameterError, PromptError, SignatureError
from imagen.runtime.samplers import spaced_timesteps

from bundles import BAD_PARAMETERS, LENGTH, WIDTH, FakeBackend, T, edit_manifest, fake_pipeline, make_bundle

PYTHON = sys.executable


# The pipeline over fake backends: parameters, determinism, non-finite outputs


def test_fake_pipeline_runs_and_is_deterministic(fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    seen = []
    result = pipe(
        ["a red circle", "ü"],
        steps=3,
        seed=5,
        num_images_per_prompt=2,
        callback=lambda s, i, t, x: seen.append((s, i, t, x.shape)),
    )
    assert result.array.shape == (4, 16, 16, 3) and result.array.dtype == np.uint8
    assert len(result.images) == 4 and result.images[0].size == (16, 16)
    assert [i["prompt"] for i in result.info] == ["a red circle", "a red circle", "ü", "ü"]
    assert result.info[0]["steps"] == [3, 3] and result.info[0]["seed"] == 5
    assert result.info[0]["bundle_sha"] == load_bundle(fake_bundle).short_sha
    timings = result.info[0]["timings"]
    assert set(timings) == {
        "tokenize",
        "text",
        "engine",
        "engine_calls",
        "engine:text_encoder",
        "engine:unet_0",
        "engine:unet_1",
        "resize",
        "unet_0",
        "unet_1",
        "total",
    }
    assert timings["engine_calls"] == sum(backend.calls for backend in pipe.backends.values()) == 1 + 3 + 3
    assert 0 <= timings["engine:unet_0"] <= timings["unet_0"] and 0 <= timings["engine"] <= timings["total"]
    assert [(s, i, t) for s, i, t, _ in seen] == [
        (0, 0, 29),
        (0, 1, 14),
        (0, 2, 0),
        (1, 0, 29),
        (1, 1, 14),
        (1, 2, 0),
    ]
    again = pipe(["a red circle", "ü"], steps=3, seed=5, num_images_per_prompt=2)
    np.testing.assert_array_equal(result.array, again.array)
    other = pipe(["a red circle", "ü"], steps=3, seed=6, num_images_per_prompt=2)
    assert not np.array_equal(result.array, other.array)
    drawn = pipe("x", steps=1)
    assert isinstance(drawn.info[0]["seed"], int) and 0 <= drawn.info[0]["seed"] < 2**63


def test_guidance_scale_one_sends_only_cond_rows(fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    rows = []
    backend = pipe.backends["unet_0"]
    original = backend.run
    backend.run = lambda feeds: rows.append(feeds["text_keep"].copy()) or original(feeds)
    pipe(["a", "b"], steps=2, seed=0, guidance_scale=1.0)
    pipe(["a", "b"], steps=2, seed=0, guidance_scale=3.0)
    assert [r.tolist() for r in rows] == [[True, True]] * 2 + [[True, True, False, False]] * 2


@pytest.mark.parametrize("name,kwargs", BAD_PARAMETERS, ids=[f"{n}-{k}" for n, k in BAD_PARAMETERS])
def test_bad_parameters_raise_parameter_error_naming_them(name, kwargs, fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts", "a prompt")
    with pytest.raises(ParameterError, match=rf"^{name} must be") as info:
        pipe(prompts, **kwargs)
    assert info.value.parameter == name
    assert pipe.backends["text_encoder"].calls == 0  # rejected before any stage ran


def test_bundle_default_sr_strength_is_used_and_counted(fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    assert pipe.model_calls(pipe.settings(steps=10)) == [10, 10]
    full = pipe("a prompt", steps=10, seed=3)
    edit_manifest(fake_bundle, lambda m: m["defaults"].update(sr_strength=0.3))
    pipe = fake_pipeline(fake_bundle)
    assert pipe.model_calls(pipe.settings(steps=10)) == [10, 3]
    assert pipe.model_calls(pipe.settings(steps=10, sr_strength=1)) == [10, 10]
    calls = []
    short = pipe("a prompt", steps=10, seed=3, callback=lambda u, i, t, x: calls.append((u, t)))
    assert [t for u, t in calls if u == 1] == spaced_timesteps(T, 10)[-3:]
    assert short.info[0]["sr_strength"] == 0.3 and full.info[0]["sr_strength"] == 1.0
    assert not np.array_equal(short.array, full.array)
    np.testing.assert_array_equal(pipe("a prompt", steps=10, seed=3, sr_strength=1.0).array, full.array)


# Run with `python -O`: every check must be an `if ...: raise`, not an assert.
UNDER_O = """
import sys
from pathlib import Path
from bundles import BAD_PARAMETERS, fake_pipeline
from imagen.runtime.errors import ParameterError, PromptError
pipe = fake_pipeline(Path(sys.argv[1]))
caught = []
for name, kwargs in BAD_PARAMETERS:
    kwargs = dict(kwargs)
    try:
        pipe(kwargs.pop("prompts", "a"), **kwargs)
    except ParameterError as error:
        caught.append(error.parameter == name)
try:
    pipe("bell \\x07", steps=1)
except PromptError:
    caught.append(True)
print(sys.flags.optimize, len(caught), all(caught))
"""


def test_parameter_checks_hold_under_python_O(fake_bundle):
    tests = str(Path(__file__).parent)  # where bundles.py is
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([PYTHON, "-O", "-c", UNDER_O, str(fake_bundle)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", str(len(BAD_PARAMETERS) + 1), "True"], out.stdout


@pytest.mark.parametrize("stage,nan_at,step", [("unet_0", 1, 1), ("unet_1", 2, 2), ("unet_0", 0, 0)])
def test_non_finite_output_names_stage_and_step_and_pipeline_recovers(stage, nan_at, step, fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    good = pipe("a prompt", steps=3, seed=1).array
    healthy = pipe.backends[stage]
    pipe.backends[stage] = FakeBackend(healthy.stage, nan_at_call=nan_at)
    with pytest.raises(NonFiniteError, match=rf"{stage} at step {step}") as info:
        pipe("a prompt", steps=3, seed=1)
    assert info.value.stage == stage and info.value.step == step
    assert isinstance(info.value, FloatingPointError)
    pipe.backends[stage] = healthy
    np.testing.assert_array_equal(pipe("a prompt", steps=3, seed=1).array, good)


def test_non_finite_text_embeds(fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    pipe.backends["text_encoder"].run = lambda feeds: {"text_embeds": np.full((1, LENGTH, WIDTH), np.inf, np.float32)}
    with pytest.raises(NonFiniteError, match="text_encoder"):
        pipe("a", steps=1, seed=0)


def test_errors_are_typed():
    assert issubclass(errors.PromptError, ValueError) and issubclass(errors.ParameterError, ValueError)
    assert issubclass(errors.SignatureError, ValueError) and issubclass(errors.BackendError, RuntimeError)
    for name in (
        "BundleError",
        "PromptError",
        "ParameterError",
        "SignatureError",
        "NonFiniteError",
        "BackendError",
    ):
        assert issubclass(getattr(errors, name), errors.ImagenError)


def test_tensorrt_backend_reports_why_it_is_unavailable(fake_bundle):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here; this test covers machines without it")
    except ImportError:
        pass
    with pytest.raises(errors.BackendError, match="tensorrt"):
        Pipeline.load(fake_bundle, backend="tensorrt")


# Load-time parameters


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"threads": 0}, "threads"),
        ({"threads": -2}, "threads"),
        ({"threads": 1.5}, "threads"),
        ({"threads": True}, "threads"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_load_parameters_raise_parameter_error_naming_them(tmp_path, kwargs, name):
    root = make_bundle(tmp_path / "bundle")
    with pytest.raises(ParameterError, match=rf"^{name} must be .*got") as info:
        Pipeline.load(root, **kwargs)
    assert info.value.parameter == name and isinstance(info.value, ValueError)


# The tiny exported bundle: signatures at the backend, non-finite outputs


def _unet_feeds(batch=2, size=16, length=24, width=128):
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((batch, 3, size, size), dtype=np.float32),
        "time": np.full((batch,), 3.0, np.float32),
        "text_embeds": rng.standard_normal((batch, length, width), dtype=np.float32),
        "text_mask": np.ones((batch, length), bool),
        "text_keep": np.ones((batch,), bool),
    }


def test_backend_raises_signature_error(bundle_fp32):
    bundle = load_bundle(bundle_fp32)
    stage = bundle.stages["unet_0"]
    backend = OnnxRuntimeBackend(bundle.path(stage.file), stage.signature, threads=1)
    manifest = bundle.manifest
    width, length, size = manifest.embed_dim, manifest.max_length, manifest.image_sizes[0]
    good = _unet_feeds(2, size, length, width)
    assert backend.run(good)["noise_pred"].shape == (2, 3, size, size)
    cases = {
        "must be float32, got float64": {**good, "x": good["x"].astype(np.float64)},
        "text_mask must be bool": {**good, "text_mask": good["text_mask"].astype(np.int64)},
        "dimension 2 must be": {**good, "x": good["x"][:, :, :-1]},
        "rank": {**good, "time": good["time"][:, None]},
        "missing \\['text_keep'\\]": {k: v for k, v in good.items() if k != "text_keep"},
        "unexpected \\['extra'\\]": {**good, "extra": good["time"]},
        "has batch 1": {**good, "time": good["time"][:1]},
        "batch 9 is outside \\[1, 8\\]": _unet_feeds(9, size, length, width),
    }
    for pattern, feeds in cases.items():
        with pytest.raises(SignatureError, match=pattern):
            backend.run(feeds)


def test_real_bundle_nan_names_stage_and_step_then_recovers(bundle_fp32):
    pipe = Pipeline.load(bundle_fp32, backend="onnxruntime", threads=1)
    good = pipe("a red circle", steps=3, seed=3).array
    real = pipe.backends["unet_1"]

    class NanAtStep:
        def __init__(self):
            self.calls = 0

        def run(self, feeds):
            out = real.run(feeds)
            self.calls += 1
            if self.calls == 2:
                out = {"noise_pred": np.full_like(out["noise_pred"], np.nan)}
            return out

    pipe.backends["unet_1"] = NanAtStep()
    with pytest.raises(NonFiniteError, match=r"unet_1 at step 1"):
        pipe("a red circle", steps=3, seed=3)
    pipe.backends["unet_1"] = real
    np.testing.assert_array_equal(pipe("a red circle", steps=3, seed=3).array, good)


# Soak: 8 threads, 200 requests, one Pipeline

SOAK_PROMPTS = [
    ["a red circle"],
    ["a small blue square on the left"],
    ["two green triangles", "a yellow star"],
    ["Ünïcödé façade 🎨"],
    ["x" * 80],
    ["a big purple hexagon at the top", "a circle", "a square"],
]


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads resident memory from /proc")
def test_soak_eight_threads_two_hundred_requests_match_serial(bundle_fp32):
    pipe = Pipeline.load(bundle_fp32, backend="onnxruntime", threads=1)
    rng = random.Random(7)
    requests = []
    for index in range(200):
        if index % 25 == 24:  # a bad request now and then: it fails alone
            requests.append((("bell \x07",), 1, 0, 2))
            continue
        prompts = tuple(rng.choice(SOAK_PROMPTS))
        per_prompt = rng.randint(1, 4 // len(prompts))  # 1 to 4 images per request
        requests.append((prompts, per_prompt, rng.choice([0, 1, 2**40]), rng.choice([2, 3])))

    def call(key):
        prompts, per_prompt, seed, steps = key
        return pipe(list(prompts), num_images_per_prompt=per_prompt, seed=seed, steps=steps, sampler="ddim").array

    twins = {key: call(key) for key in dict.fromkeys(requests) if key[0] != ("bell \x07",)}  # serial
    assert len({t.tobytes() for t in twins.values()}) == len(twins)

    results, errors, lock = {}, [], threading.Lock()

    def worker(jobs):
        for index in jobs:
            try:
                array = call(requests[index])
            except PromptError:
                array = "PromptError"
            except BaseException as error:  # noqa: BLE001 - reported by the assertions below
                with lock:
                    errors.append((index, repr(error)))
                continue
            with lock:
                results[index] = array

    def run(indices, timeout):
        threads = [threading.Thread(target=worker, args=(indices[i::8],), daemon=True) for i in range(8)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.1, timeout - (time.monotonic() - start)))
        assert not any(t.is_alive() for t in threads), f"deadlock: threads still running after {timeout} s"

    run(list(range(40)), timeout=120)  # warm-up: every thread has run every stage
    rss_warm = _rss_bytes()
    results.clear()
    run(list(range(200)), timeout=300)
    rss_end = _rss_bytes()
    assert errors == []
    assert len(results) == 200
    for index, key in enumerate(requests):
        if key[0] == ("bell \x07",):
            assert isinstance(results[index], str) and results[index] == "PromptError"
        else:
            np.testing.assert_array_equal(results[index], twins[key], err_msg=f"request {index} {key}")
    assert rss_end <= 1.10 * rss_warm, f"resident memory grew from {rss_warm} to {rss_end} bytes"


# A failing request does not affect the next ones


class _FailingSession:
    """Wraps an onnxruntime session; its `run` raises like onnxruntime does, `failures` times."""

    def __init__(self, session, failures=1):
        self.session, self.failures = session, failures

    def run(self, *args, **kwargs):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : simulated failure")
        return self.session.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.mark.parametrize("stage", ["text_encoder", "unet_0", "unet_1"])
def test_injected_backend_error_is_typed_and_the_next_request_is_unaffected(bundle_fp32, stage):
    fresh = Pipeline.load(bundle_fp32, backend="onnxruntime", threads=1)
    want = fresh(["a red circle", "a blue square"], steps=3, seed=9).array
    pipe = Pipeline.load(bundle_fp32, backend="onnxruntime", threads=1)
    backend = pipe.backends[stage]
    backend.session = _FailingSession(backend.session)
    with pytest.raises(BackendError, match=rf"^{stage}: onnxruntime failed: .*simulated failure"):
        pipe(["a red circle", "a blue square"], steps=3, seed=9)
    np.testing.assert_array_equal(pipe(["a red circle", "a blue square"], steps=3, seed=9).array, want)


def test_bad_prompt_and_bad_parameter_do_not_affect_the_next_request(bundle_fp32):
    pipe = Pipeline.load(bundle_fp32, backend="onnxruntime", threads=1)
    want = pipe("a red circle", steps=2, seed=4).array
    with pytest.raises(PromptError):
        pipe(["a red circle", ""], steps=2, seed=4)
    with pytest.raises(ParameterError):
        pipe("a red circle", steps=2, seed=-4)
    with pytest.raises(BackendError):  # an arbitrary exception from inside a backend
        backend = pipe.backends["unet_0"]
        backend.session = _FailingSession(backend.session)
        pipe("a red circle", steps=2, seed=4)
    np.testing.assert_array_equal(pipe("a red circle", steps=2, seed=4).array, want)
