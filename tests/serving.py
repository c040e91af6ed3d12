"""What the imagen-serve tests share: whether the web stack is installed, and a bounded wait."""

import base64
import http.client
import importlib.util
import io
import json
import time

import pytest

WEB = ("fastapi", "uvicorn", "prometheus_client", "httpx")
MISSING = [name for name in WEB if importlib.util.find_spec(name) is None]
needs_web = pytest.mark.skipif(
    bool(MISSING), reason=f"{', '.join(MISSING)} not installed: pip install 'imagen-cascade[serve]' httpx"
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
