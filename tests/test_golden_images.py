"""Every request flow makes the images stored before the flow was written once, bit for bit, on
ONNX Runtime CPU (tests/golden.py says how the digests were taken and why they are kept per machine)."""

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagen.runtime import Pipeline, Request
from imagen.runtime.serve import engine

from golden import BATCHES, CALLS, digest, machine_key, stored

DIGESTS = stored(Path(__file__).parent / "data" / "golden_images.json")
pytestmark = pytest.mark.skipif(DIGESTS is None, reason=f"no stored digests for this machine ({machine_key()})")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(threads=2)


@pytest.mark.parametrize("name", list(CALLS))
def test_pipeline_call_makes_the_stored_images(pipe, name):
    assert digest(pipe(**CALLS[name]).array) == DIGESTS[name]


@pytest.mark.parametrize("name", list(BATCHES))
def test_server_batch_makes_the_stored_images(pipe, name):
    batch = BATCHES[name]
    requests = [
        engine.prepare(pipe, prompt, n, seed=seed, **batch["settings"]) for prompt, n, seed in batch["requests"]
    ]
    pngs = [png for images in engine.run_batch(pipe, requests) for png in images.pngs]
    assert digest(np.stack([np.asarray(Image.open(BytesIO(png))) for png in pngs])) == DIGESTS[name]


@pytest.mark.parametrize("name", list(BATCHES))
def test_generate_makes_the_stored_images_of_the_server_batch(pipe, name):
    """The server's batch is one `Pipeline.generate` call: called directly, the same images."""
    batch = BATCHES[name]
    requests = [Request(prompt, n, seed) for prompt, n, seed in batch["requests"]]
    results = pipe.generate(requests, pipe.settings(**batch["settings"]))
    assert digest(np.concatenate([result.array for result in results])) == DIGESTS[name]
