"""The sampling loop in another array namespace: the whole cascade under array-api-strict, on a
device of its own, gives the NumPy loop's images bit for bit, and never leaves that namespace or
device (array-api-strict refuses NumPy operands and arrays of another device). Also the array
API quantile against numpy.quantile, and the namespace seam's errors."""

import numpy as np
import pytest

from imagen.runtime import Pipeline
from imagen.runtime import arrays as arrays_module
from imagen.runtime import pipeline as pipeline_module
from imagen.runtime.arrays import NUMPY, backend_namespace, dtype_name, to_namespace, to_numpy
from imagen.runtime.errors import BackendError
from imagen.runtime.guidance import dynamic_threshold, quantile

xs = pytest.importorskip("array_api_strict", reason="array-api-strict not installed: pip install array-api-strict")
StrictArray = type(xs.asarray(0))
DEVICE = xs.Device("device1")  # not the default device: an array created without `device=` cannot mix in


class StrictBackend:
    """A stage backend whose arrays live in array-api-strict on DEVICE, over the NumPy backend of the
    same stage (the engine). It refuses feeds that are not strict arrays on DEVICE."""

    array_namespace, array_device = xs, DEVICE

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def run(self, feeds: dict) -> dict:
        for name, array in feeds.items():
            assert isinstance(array, StrictArray), f"{name} is a {type(array).__name__}"
            assert array.device == DEVICE, f"{name} is on {array.device}"
        self.calls += 1
        outputs = self.inner.run({name: to_numpy(array) for name, array in feeds.items()})
        return {name: xs.asarray(array, device=DEVICE) for name, array in outputs.items()}


@pytest.fixture(scope="module")
def numpy_pipe():
    return Pipeline.load(threads=1)


def strict_pipe(numpy_pipe, encoder_too: bool) -> Pipeline:
    backends = {
        name: StrictBackend(backend) if encoder_too or name != "text_encoder" else backend
        for name, backend in numpy_pipe.backends.items()
    }
    return Pipeline(numpy_pipe.bundle, backends, numpy_pipe.tokenizer, "strict")


CASES = [
    dict(sampler="ddpm", steps=4, guidance_scale=3.0),
    dict(sampler="ddim", steps=5, eta=0.5, guidance_scale=1.0),
    dict(sampler="dpmpp_2m", steps=6, sr_strength=1.0),
    dict(sampler="dpmpp_2m", steps=6, sr_strength=0.5, guidance_scale=7.5),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['sampler']}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("encoder_too", [True, False], ids=["all-strict", "numpy-encoder"])
def test_the_whole_loop_under_array_api_strict_equals_numpy_bit_for_bit(numpy_pipe, case, encoder_too, monkeypatch):
    pipe = strict_pipe(numpy_pipe, encoder_too)
    host_copies = []  # strict arrays brought to the host by the pipeline, directly or through to_namespace

    def counted(array):
        if isinstance(array, StrictArray):
            host_copies.append(array)
        return to_numpy(array)

    monkeypatch.setattr(pipeline_module, "to_numpy", counted)
    monkeypatch.setattr(arrays_module, "to_numpy", counted)
    prompts = ["a small red circle on the left", "a large blue square"]
    got = pipe(prompts, seed=11, num_images_per_prompt=2, **case)
    want = numpy_pipe(prompts, seed=11, num_images_per_prompt=2, **case)
    assert got.array.dtype == np.uint8 and got.array.shape == want.array.shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(got.array, want.array)
    assert [array.shape for array in host_copies] == [(4, 64, 64, 3)]  # only the final images come back
    calls = sum(backend.calls for backend in pipe.backends.values() if isinstance(backend, StrictBackend))
    assert calls == got.info[0]["timings"]["engine_calls"] - (0 if encoder_too else 1)


def test_sample_takes_numpy_text_and_noise_and_returns_the_loop_namespace(numpy_pipe):
    pipe = strict_pipe(numpy_pipe, encoder_too=False)
    settings = pipe.settings(steps=3, sampler="ddim")
    ids, mask, _ = pipe.tokenizer(["a green triangle"])
    embeds, text_mask = numpy_pipe.text_conditioning(numpy_pipe.encode(ids, mask), mask, 1)
    generator = np.random.default_rng(3)
    x = pipe.sample(embeds, text_mask, lambda shape: generator.standard_normal(shape, dtype=np.float32), settings)
    assert isinstance(x, StrictArray) and x.device == DEVICE and x.shape == (1, 3, 64, 64)
    generator = np.random.default_rng(3)
    want = numpy_pipe.sample(
        embeds, text_mask, lambda shape: generator.standard_normal(shape, dtype=np.float32), settings
    )
    np.testing.assert_array_equal(to_numpy(x), want)


def test_unet_backends_in_different_namespaces_are_refused(numpy_pipe):
    backends = dict(numpy_pipe.backends)
    backends["unet_1"] = StrictBackend(backends["unet_1"])
    with pytest.raises(BackendError, match="different namespaces"):
        Pipeline(numpy_pipe.bundle, backends, numpy_pipe.tokenizer)
    assert backend_namespace(numpy_pipe.backends["unet_0"]) is NUMPY


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.95, 0.975, 0.995, 1.0, 1 / 3])
def test_quantile_is_numpy_quantile_bit_for_bit(q):
    rng = np.random.default_rng(int(q * 1000))
    for size in (1, 2, 3, 7, 48, 3 * 64 * 64):
        values = np.abs(rng.standard_normal((3, size)).astype(np.float32) * np.float32(rng.uniform(0.01, 5)))
        values[1, : size // 2] = values[1, 0]  # ties
        want = np.quantile(values, q, axis=-1).astype(np.float32)
        got = quantile(values, q)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
        strict = quantile(xs.asarray(values, device=DEVICE), q)
        np.testing.assert_array_equal(to_numpy(strict), want)


def test_dynamic_threshold_in_strict_equals_numpy():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 3, 8, 8)).astype(np.float32) * np.float32(2)
    x0[2] *= np.float32(0.1)  # this sample stays below 1: s = 1, x0 unchanged
    want = dynamic_threshold(x0, 0.95)
    got = dynamic_threshold(xs.asarray(x0, device=DEVICE), 0.95)
    np.testing.assert_array_equal(to_numpy(got), want)
    np.testing.assert_array_equal(want[2], x0[2])
    s0 = np.quantile(np.abs(x0[0]), 0.95)
    assert (
        s0 > 1
        and np.max(np.abs(want[0])) == pytest.approx(1.0)
        and want[0] == pytest.approx(np.clip(x0[0], -s0, s0) / s0)
    )


def test_arrays_helpers_name_dtypes_and_move_arrays():
    strict = xs.asarray(np.arange(6, dtype=np.int64), device=DEVICE)
    assert [dtype_name(a) for a in (strict, np.zeros(1, bool), np.zeros(1, np.float32))] == ["int64", "bool", "float32"]
    moved = to_namespace(xs, np.ones(4, np.float32), like=strict)
    assert moved.device == DEVICE and dtype_name(moved) == "float32"
    assert to_namespace(xs, moved) is moved
    np.testing.assert_array_equal(to_namespace(NUMPY, strict), np.arange(6))
