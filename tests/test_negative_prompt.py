"""Negative prompts where users make images, over a tiny DeepFloyd IF bundle (stage I alone, 32x32,
max batch 2, exported once for this module), whose Unets take their unconditional rows from a
negative prompt: imagen-run's --negative-prompt and the PNG text that makes the image again, and
imagen-serve's `negative_prompt` field, alone and in a batch whose requests have different negative
prompts. Each is compared with `Pipeline` called directly with the same arguments. The demo
bundle's refusals (a learned null text) are in test_cli_run.py, test_serve.py and
test_serve_demo.py; test_serve_ray.py compares the Ray app's refusal with imagen-serve's."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner
from deepfloyd_tiny import IMAGE_SIZE, write_tiny_if

from imagen.runtime import Pipeline
from imagen.runtime.cli import main as run_cli

from serving import URL, WAIT, decode_png, needs_web

PROMPT = "a red circle on the left"
NEGATIVE = "a blue square"
STEPS = 4
SEED = 5
# the batching tolerance of docs/serving.md (uint8): the engines' batch-dependent rounding
MAX_LEVELS, MIN_EQUAL = 2, 0.9


@pytest.fixture(scope="module")
def if_bundle(tmp_path_factory):
    from imagen.export.bundle import export_bundle

    stage_1, _ = write_tiny_if(tmp_path_factory.mktemp("deepfloyd"))
    out = tmp_path_factory.mktemp("if_bundle") / "bundle"
    export_bundle(stage_1, out, max_batch=2)
    return out


@pytest.fixture(scope="module")
def if_pipe(if_bundle):
    with Pipeline.load(if_bundle, threads=1) as pipe:
        assert pipe.negative_prompts and pipe.max_batch == 2
        yield pipe


def mean_levels(a, b) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def test_imagen_run_takes_a_negative_prompt_and_its_png_makes_the_image_again(if_bundle, if_pipe, tmp_path):
    from PIL import Image

    common = [PROMPT, "--bundle", str(if_bundle), "--steps", str(STEPS), "--seed", str(SEED), "--threads", "1"]
    runs = {"negative": ["--negative-prompt", NEGATIVE], "plain": [], "empty": ["--negative-prompt", ""]}
    infos = {}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.png"
        result = CliRunner().invoke(run_cli, [*common, *extra, "-o", str(out), "--json"])
        assert result.exit_code == 0, result.output
        (infos[name],) = json.loads(result.stdout)
    images = {name: Image.open(tmp_path / f"{name}.png") for name in runs}
    pixels = {name: np.asarray(image) for name, image in images.items()}
    assert pixels["negative"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)

    direct = if_pipe(PROMPT, steps=STEPS, seed=SEED, negative_prompt=NEGATIVE).array[0]
    np.testing.assert_array_equal(pixels["negative"], direct)
    np.testing.assert_array_equal(pixels["empty"], pixels["plain"])  # "" is the empty prompt, as None
    np.testing.assert_array_equal(pixels["plain"], if_pipe(PROMPT, steps=STEPS, seed=SEED).array[0])
    changed = mean_levels(pixels["negative"], pixels["plain"])
    print(f"negative prompt against none, same seed: mean abs difference {changed:.1f} uint8 levels")
    assert changed > 1.0

    text = images["negative"].text
    assert text["negative_prompt"] == NEGATIVE and infos["negative"]["negative_prompt"] == NEGATIVE
    assert "negative_prompt" not in images["plain"].text and "negative_prompt" not in infos["plain"]
    assert images["empty"].text["negative_prompt"] == "" and infos["empty"]["negative_prompt"] == ""
    # png.py's promise: the text chunks are the arguments that make the image again
    again = if_pipe(
        text["prompt"],
        negative_prompt=text["negative_prompt"],
        seed=int(text["seed"]),
        steps=json.loads(text["steps"]),
        sampler=text["sampler"],
        guidance_scale=json.loads(text["guidance_scale"]),
        eta=float(text["eta"]),
        sr_strength=float(text["sr_strength"]),
    )
    np.testing.assert_array_equal(again.array[0], pixels["negative"])
    assert again.info[0]["negative_prompt"] == NEGATIVE


def _served(reply) -> tuple[np.ndarray, dict, dict]:
    assert reply.status_code == 200, reply.text
    (item,) = reply.json()["data"]
    image = decode_png(item["b64_json"])
    return np.asarray(image), item["imagen"], image.text


@needs_web
def test_imagen_serve_takes_a_negative_prompt_per_request(if_pipe):
    from fastapi.testclient import TestClient

    from imagen.runtime.serve import ServeConfig, create_app

    body = {"prompt": PROMPT, "seed": SEED, "steps": STEPS}
    app = create_app(if_pipe, ServeConfig(max_wait_ms=0, max_prompt_chars=100))
    with TestClient(app) as client:
        assert app.state.service.ready.wait(WAIT)
        negative, info, text = _served(client.post(URL, json={**body, "negative_prompt": NEGATIVE}))
        plain, plain_info, plain_text = _served(client.post(URL, json=body))
        empty, empty_info, _ = _served(client.post(URL, json={**body, "negative_prompt": ""}))
        null, _, _ = _served(client.post(URL, json={**body, "negative_prompt": None}))

        refused = [  # a negative prompt this bundle cannot take: 400, never a 500, and the server goes on
            ("a\x00b", "invalid_parameter", "control character"),
            ("x" * 101, "prompt_too_long", "the negative prompt is 101 characters"),
        ]
        for text_given, code, fragment in refused:
            reply = client.post(URL, json={**body, "negative_prompt": text_given})
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert (error["param"], error["code"], error["type"]) == ("negative_prompt", code, "invalid_request_error")
            assert fragment in error["message"], error
        assert client.post(URL, json={**body, "steps": 1}).status_code == 200

    np.testing.assert_array_equal(negative, if_pipe(PROMPT, steps=STEPS, seed=SEED, negative_prompt=NEGATIVE).array[0])
    np.testing.assert_array_equal(plain, if_pipe(PROMPT, steps=STEPS, seed=SEED).array[0])
    np.testing.assert_array_equal(empty, plain)
    np.testing.assert_array_equal(null, plain)
    assert mean_levels(negative, plain) > 1.0
    assert info["negative_prompt"] == text["negative_prompt"] == NEGATIVE and info["batch"]["requests"] == 1
    assert "negative_prompt" not in plain_info and "negative_prompt" not in plain_text
    assert empty_info["negative_prompt"] == ""


@needs_web
def test_requests_with_different_negative_prompts_share_a_batch_and_keep_their_images(if_pipe):
    """Two requests, the same prompt and seed, different negative prompts: one engine batch (the key is
    the settings), and each request gets the image it gets alone."""
    from fastapi.testclient import TestClient

    from imagen.runtime.serve import ServeConfig, create_app

    bodies = [
        {"prompt": PROMPT, "seed": SEED, "steps": STEPS, "negative_prompt": NEGATIVE},
        {"prompt": PROMPT, "seed": SEED, "steps": STEPS},
    ]
    # the window is long, so the batch goes when it is full: 2 requests x 1 image = max_batch
    app = create_app(if_pipe, ServeConfig(max_wait_ms=60_000))
    with TestClient(app) as client, ThreadPoolExecutor(len(bodies)) as pool:
        assert app.state.service.ready.wait(WAIT)
        replies = list(pool.map(lambda body: client.post(URL, json=body), bodies))
    served = [_served(reply) for reply in replies]
    worst, equal = 0, []
    for body, (pixels, info, _) in zip(bodies, served):
        assert info["batch"] == {"images": 2, "requests": 2}
        assert info.get("negative_prompt") == body.get("negative_prompt")
        solo = if_pipe(PROMPT, steps=STEPS, seed=SEED, negative_prompt=body.get("negative_prompt")).array[0]
        difference = np.abs(pixels.astype(np.int16) - solo.astype(np.int16))
        worst = max(worst, int(difference.max()))
        equal.append(float(np.mean(difference == 0)))
    apart = mean_levels(served[0][0], served[1][0])
    print(f"batched vs solo uint8: max abs difference {worst}, share of equal values {min(equal):.4f}; ", end="")
    print(f"the two requests differ by {apart:.1f} levels on average")
    assert worst <= MAX_LEVELS and min(equal) >= MIN_EQUAL
    assert apart > 1.0  # each request's own negative prompt, not one for the batch
