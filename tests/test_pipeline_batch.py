"""The one request flow, `Pipeline.generate`, over fake backends: a batch of requests gives each its
solo images and its own info; bad requests are refused before any stage runs; `__call__` is a batch
of one; the text rows are taken portably (CuPy's `repeat` takes no array of counts); `close()` and
the `with` block release the engines and later requests say the pipeline was closed."""

import numpy as np
import pytest

from imagen.runtime import Request, encode_png
from imagen.runtime.arrays import to_numpy
from imagen.runtime.errors import BackendError, ParameterError

from bundles import fake_pipeline


def test_generate_gives_each_request_its_solo_images_and_info(fake_bundle):
    pipe = fake_pipeline(fake_bundle)  # max batch 4
    requests = [Request(["a red circle", "ü"], seed=5), Request("b", n=2, seed=9)]
    results = pipe.generate(requests, pipe.settings(steps=3, sampler="ddim"))
    assert [len(result) for result in results] == [2, 2] and pipe.backends["text_encoder"].calls == 1
    for request, result in zip(requests, results):
        solo = pipe(request.prompts, seed=request.seed, num_images_per_prompt=request.n, steps=3, sampler="ddim")
        np.testing.assert_array_equal(result.array, solo.array)  # the fake engines are row by row: exact
        assert [info["seed"] for info in result.info] == [request.seed] * len(result)
    first, second = results[0].info, results[1].info
    assert [info["prompt"] for info in first + second] == ["a red circle", "ü", "b", "b"]
    assert [info["index"] for info in first + second] == [0, 1, 0, 1]
    assert [info["truncated"] for info in first + second] == [True, False, False, False]  # 8 tokens
    assert all(info["batch"] == {"images": 4, "requests": 2} for info in first + second)
    assert first[0]["timings"]["engine_calls"] == 1 + 3 + 3 and first[0]["timings"] is not first[1]["timings"]
    drawn, given = pipe.generate([Request("c"), Request("d", seed=1)], pipe.settings(steps=3))
    seed = drawn.info[0]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**63  # drawn and reported: it reproduces the image
    np.testing.assert_array_equal(pipe("c", seed=seed, steps=3).array, drawn.array)
    assert given.info[0]["seed"] == 1


def test_call_is_a_batch_of_one_and_a_generator_draws_its_rows(fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    called = pipe(["a", "b"], seed=4, num_images_per_prompt=2, steps=2)
    (batched,) = pipe.generate([Request(["a", "b"], n=2, seed=4)], pipe.settings(steps=2))
    np.testing.assert_array_equal(called.array, batched.array)
    assert called.info[0]["batch"] == {"images": 4, "requests": 1}
    generated = pipe(["a", "b"], generator=np.random.Generator(np.random.PCG64(4)), num_images_per_prompt=2, steps=2)
    np.testing.assert_array_equal(generated.array, called.array)
    assert generated.info[0]["seed"] is None
    assert called.images[0].size == (16, 16) and len(called.images) == 4  # PIL, made on first use


BAD_REQUESTS = [  # requests, settings, the parameter the error names
    ([], None, "requests"),
    ("a", None, "requests"),
    (["a"], None, "requests"),
    ([Request("a", n=3), Request("b", n=2)], None, "requests"),  # 5 images, max batch 4
    ([Request("a", n=0)], None, "n"),
    ([Request(["a", "b", "c"], n=2)], None, "prompts"),
    ([Request(5)], None, "prompts"),
    ([Request("a", seed=-1)], None, "seed"),
    ([Request("a", seed=1, generator=np.random.default_rng(1))], None, "seed"),
    ([Request("a", generator=np.random.RandomState(1))], None, "generator"),
    ([Request("a")], {"steps": 3}, "settings"),
]


@pytest.mark.parametrize("requests,settings,name", BAD_REQUESTS)
def test_bad_requests_raise_parameter_error_before_any_stage_runs(fake_bundle, requests, settings, name):
    pipe = fake_pipeline(fake_bundle)
    with pytest.raises(ParameterError) as caught:
        pipe.generate(requests, settings)
    assert caught.value.parameter == name
    assert pipe.backends["text_encoder"].calls == 0


def test_settings_are_checked_against_the_bundle(fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    too_many = pipe.settings(steps=3).__class__(sampler="ddim", steps=(31, 3), guidance_scale=1.0)
    with pytest.raises(ParameterError, match="^steps must be"):
        pipe.generate([Request("a", seed=0)], too_many)


class CupyLikeNamespace:
    """array-api-strict, except that `repeat` takes only an int or a sequence of ints, as
    `cupy.repeat` does (array-api-strict also takes an array of counts, so it hides the difference)."""

    def __init__(self):
        import array_api_strict

        self.strict = array_api_strict

    def __getattr__(self, name):
        return getattr(self.strict, name)

    def repeat(self, x, repeats, /, *, axis=None):
        if not isinstance(repeats, (int, list, tuple)):
            raise TypeError(f"repeats must be an int or a sequence of ints, as in cupy.repeat, got {type(repeats)}")
        return self.strict.repeat(x, repeats, axis=axis)


@pytest.mark.parametrize("repeats", [2, [1, 3, 2], (2, 0, 1)])
def test_text_conditioning_takes_rows_without_an_array_of_counts(fake_bundle, repeats):
    pytest.importorskip("array_api_strict")
    pipe = fake_pipeline(fake_bundle)
    ids, mask, _ = pipe.tokenizer(["a red circle", "ü", "b"])
    embeds = pipe.encode(ids, mask)
    expected = [np.repeat(embeds, repeats, axis=0), np.repeat(mask, repeats, axis=0).astype(bool)]
    on_numpy = pipe.text_conditioning(embeds, mask, repeats)
    pipe.xp, pipe.device = CupyLikeNamespace(), None  # the loop's namespace, as a CuPy backend sets it
    cupy_like = pipe.text_conditioning(embeds, mask, repeats)
    for got in (on_numpy, cupy_like):
        for array, want in zip(got, expected):
            host = to_numpy(array)
            assert host.dtype == want.dtype
            np.testing.assert_array_equal(host, want)  # NumPy: bit for bit as np.repeat


class Closing:
    """A fake backend with a `close`, as the TensorRT backend has."""

    def __init__(self, backend):
        self.backend, self.closed = backend, 0

    def run(self, feeds):
        return self.backend.run(feeds)

    def close(self):
        self.closed += 1


def test_close_releases_the_engines_and_later_requests_say_so(fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    closing = pipe.backends["unet_0"] = Closing(pipe.backends["unet_0"])
    with pipe as entered:
        assert entered is pipe
        image = pipe("a", seed=1, steps=2).array
    assert closing.closed == 1 and pipe.backends == {} and pipe.closed
    pipe.close()  # twice: nothing more
    assert closing.closed == 1
    for call in (lambda: pipe("a", seed=1, steps=2), lambda: pipe.generate([Request("a", seed=1)])):
        with pytest.raises(BackendError, match="pipeline was closed"):
            call()
    assert image.shape == (1, 16, 16, 3)


def test_encode_png_carries_the_settings_that_reproduce_the_image(fake_bundle):
    from io import BytesIO

    from PIL import Image

    pipe = fake_pipeline(fake_bundle)
    result = pipe("a", seed=3, steps=[2, 3], sampler="ddim", eta=0.5, guidance_scale=2.0)
    png = Image.open(BytesIO(encode_png(result.array[0], result.info[0])))
    np.testing.assert_array_equal(np.asarray(png), result.array[0])
    assert png.text == {
        "prompt": "a",
        "seed": "3",
        "sampler": "ddim",
        "steps": "[2, 3]",
        "eta": "0.5",
        "sr_strength": str(result.info[0]["sr_strength"]),
        "guidance_scale": "2.0",
        "bundle_sha": pipe.bundle.short_sha,
        "backend": "",
        "precision": "fp32",
    }
