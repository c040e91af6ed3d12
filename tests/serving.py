"""What the imagen-serve tests share: whether the web stack is installed, a bounded wait, a real
uvicorn server in a thread, and what the `openai` client must see from either server."""

import base64
import contextlib
import http.client
import importlib.util
import io
import json
import socket
import threading
import time

import pytest

WEB = ("fastapi", "uvicorn", "prometheus_client", "httpx")
MISSING = [name for name in WEB if importlib.util.find_spec(name) is None]
needs_web = pytest.mark.skipif(
    bool(MISSING), reason=f"{', '.join(MISSING)} not installed: pip install 'imagen-cascade[serve]' httpx"
)
needs_openai = pytest.mark.skipif(
    importlib.util.find_spec("openai") is None, reason="openai not installed: pip install 'imagen-cascade[dev]'"
)
URL = "/v1/images/generations"
WAIT = 30  # seconds: the bound of every wait on an event; reached only when something is broken


def wait_until(predicate, timeout=WAIT):
    """Waits for a condition another thread makes true (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


def metric_sample(service, name):
    return service.metrics.registry.get_sample_value(name)


def http_post(port, body, timeout=WAIT):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", URL, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def http_get(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        if path == "/readyz":
            return 0, b""  # still starting
        raise
    finally:
        connection.close()


def metric(client, name, **labels):
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def decode_png(b64):
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


@contextlib.contextmanager
def running_server(app):
    """`app` served by uvicorn on 127.0.0.1 at a free port, in a thread: yields the port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(WAIT)


def check_with_openai(base_url: str, size: str):
    """The official `openai` client against a server at `base_url`: images.generate with every field of
    OpenAI's request that has no meaning here gets its images, and the header names those fields;
    values that cannot be honoured and schema violations arrive as openai's typed exceptions."""
    import httpx2
    import openai

    http = httpx2.Client(trust_env=False, timeout=2 * WAIT)
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, http_client=http)
    ignored = dict(model="imagen", quality="high", style="vivid", user="u1", moderation="low", output_compression=50)
    honoured = dict(size=size, response_format="b64_json", output_format="png", background="opaque", stream=False)
    raw = client.images.with_raw_response.generate(
        prompt="a red circle", n=2, **ignored, **honoured, partial_images=0, extra_body={"seed": 5, "steps": 2}
    )
    assert raw.status_code == 200 and raw.headers["x-imagen-ignored"] == ",".join(ignored)
    images = raw.parse()
    assert len(images.data) == 2
    for index, item in enumerate(images.data):
        png = decode_png(item.b64_json)
        assert f"{png.size[0]}x{png.size[1]}" == size and png.text["seed"] == "5"
        assert (item.imagen["index"], item.imagen["seed"], item.imagen["steps"][0]) == (index, 5, 2)
    plain = client.images.with_raw_response.generate(prompt="a red circle", size="auto", extra_body={"steps": 1})
    assert plain.status_code == 200 and "x-imagen-ignored" not in plain.headers
    refused = [  # fields whose value this server cannot honour: 400, BadRequestError, naming the field
        ({"size": "1024x1024"}, "size"),
        ({"response_format": "url"}, "response_format"),
        ({"output_format": "jpeg"}, "output_format"),
        ({"background": "transparent"}, "background"),
        ({"stream": True}, "stream"),
        ({"partial_images": 2}, "partial_images"),
        ({"extra_body": {"steps": 0}}, "steps"),
    ]
    for change, param in refused:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt="ab", **change)
        error = caught.value
        assert (error.status_code, error.param, error.type) == (400, param, "invalid_request_error"), change
        assert param == "steps" or error.code == f"unsupported_{param}" and "omit it" in error.message, error
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.images.generate(prompt="ab", extra_body={"stepz": 3})
    assert caught.value.param == "stepz" and caught.value.code == "extra_forbidden"
    with pytest.raises(openai.APIStatusError) as caught:
        client.images.generate(prompt="ab", n=64)
    assert caught.value.status_code == 413 and caught.value.code == "too_many_images"
