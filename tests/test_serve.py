"""imagen-serve (imagen.runtime.serve): the batcher on its own, the HTTP API over the hand-made bundle
with fake engines (schema, errors, readiness, metrics, drain), batching over the demo bundle's real
engines (each request equals its solo images), and a real uvicorn process stopped by SIGTERM.

The fake engines sit behind a `Gate`: the test closes it to hold a batch in the engine, so queue,
time-limit and drain cases are set up by events, not by timing."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from bundles import fake_pipeline, make_bundle
from serving import (
    URL,
    WAIT,
    check_with_openai,
    decode_png,
    http_post,
    metric,
    metric_sample,
    needs_openai,
    needs_web,
    running_server,
    wait_until,
)

# --- the HTTP API over fake engines ------------------------------------------------------------


class Gate:
    """A backend wrapper: every call waits for `open`; `entered` tells that a batch reached the engine."""

    def __init__(self, backend):
        self.backend, self.open, self.entered = backend, threading.Event(), threading.Event()
        self.open.set()

    def run(self, feeds):
        self.entered.set()
        if not self.open.wait(WAIT):
            raise TimeoutError("the test never opened the gate")
        return self.backend.run(feeds)


@contextmanager
def fake_server(root, gate_open=True, **config):
    """A TestClient over the hand-made bundle (max batch 4, 16x16 images, 8 tokens) with gated engines."""
    from fastapi.testclient import TestClient

    from imagen.runtime.serve import ServeConfig, create_app

    pipe = fake_pipeline(make_bundle(root))
    gate = pipe.backends["text_encoder"] = Gate(pipe.backends["text_encoder"])
    if not gate_open:
        gate.open.clear()
    app = create_app(pipe, ServeConfig(**{"max_wait_ms": 0, **config}))
    with TestClient(app) as client:
        service = app.state.service
        try:
            if gate_open:
                assert service.ready.wait(WAIT)
            yield client, service, gate
        finally:
            gate.open.set()  # so that the shutdown's drain never waits on a held batch


@needs_web
def test_generation_answers_openai_shape_with_info(tmp_path):
    with fake_server(tmp_path) as (client, service, _):
        reply = client.post(URL, json={"prompt": "ab", "n": 2, "size": "16x16", "seed": 5, "steps": 3})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert set(body) == {"created", "data"} and abs(body["created"] - time.time()) < 3600
        assert len(body["data"]) == 2
        for index, item in enumerate(body["data"]):
            assert "revised_prompt" not in item  # "ab" fits
            image = decode_png(item["b64_json"])
            assert (image.format, image.size, image.mode) == ("PNG", (16, 16), "RGB")
            assert image.text["seed"] == "5"
            info = item["imagen"]
            assert (info["index"], info["seed"], info["steps"], info["truncated"]) == (index, 5, [3, 3], False)
            assert info["bundle_sha"] == service.pipe.bundle.short_sha
            assert info["batch"] == {"images": 2, "requests": 1}
            assert {"queue", "request", "total", "engine", "unet_0", "unet_1"} <= set(info["timings"])
        assert "x-imagen-ignored" not in reply.headers

        drawn = client.post(URL, json={"prompt": "a red circle"}).json()["data"][0]
        assert drawn["revised_prompt"] == "a red c" and drawn["imagen"]["truncated"]  # 7 bytes fit before eos
        seed = drawn["imagen"]["seed"]
        assert isinstance(seed, int) and 0 <= seed < 2**63  # drawn and reported: it reproduces the image
        again = client.post(URL, json={"prompt": "a red circle", "seed": seed}).json()["data"][0]
        assert again["b64_json"] == drawn["b64_json"]

        # OpenAI's fields with no meaning here are accepted and named; those it honours give the same image
        openai_fields = {"model": "dall-e-3", "quality": "hd", "style": "natural", "user": "u", "svg": {"model": "m"}}
        honoured = {"size": "auto", "response_format": "b64_json", "output_format": "png", "background": "auto"}
        body = {"prompt": "a red circle", "seed": seed, **openai_fields, **honoured, "stream": None, "moderation": None}
        reply = client.post(URL, json=body)
        assert reply.status_code == 200 and reply.headers["x-imagen-ignored"] == "model,quality,style,user,svg"
        assert reply.json()["data"][0]["b64_json"] == drawn["b64_json"]


BAD_VALUES = [  # body, param, code: each a 400 that names what to change
    ({"size": "32x32"}, "size", "unsupported_size"),
    ({"response_format": "url"}, "response_format", "unsupported_response_format"),
    ({"output_format": "webp"}, "output_format", "unsupported_output_format"),
    ({"background": "transparent"}, "background", "unsupported_background"),
    ({"stream": True}, "stream", "unsupported_stream"),
    ({"partial_images": 1}, "partial_images", "unsupported_partial_images"),
    ({"n": 0}, "n", "invalid_parameter"),
    ({"steps": 0}, "steps", "invalid_parameter"),
    ({"steps": [2, 3, 4]}, "steps", "invalid_parameter"),
    ({"sampler": "euler"}, "sampler", "invalid_parameter"),
    ({"guidance_scale": -1}, "guidance_scale", "invalid_parameter"),
    ({"sr_strength": 0}, "sr_strength", "invalid_parameter"),
    ({"eta": 2}, "eta", "invalid_parameter"),
    ({"seed": -1}, "seed", "invalid_parameter"),
    ({"seed": 2**63}, "seed", "invalid_parameter"),
    ({"prompt": "  "}, "prompt", "invalid_prompt"),
    ({"prompt": "a\x00b"}, "prompt", "invalid_prompt"),
    ({"prompt": "x" * 101}, "prompt", "prompt_too_long"),
    # a bundle with a learned null text takes no negative prompt (DeepFloyd IF's do: test_negative_prompt.py)
    ({"negative_prompt": "blurry"}, "negative_prompt", "invalid_parameter"),
    ({"negative_prompt": ""}, "negative_prompt", "invalid_parameter"),
    ({"negative_prompt": "x" * 101}, "negative_prompt", "prompt_too_long"),
]
SCHEMA_VIOLATIONS = [  # body, param, code: each a 422
    ({"n": 1}, "prompt", "missing"),
    ({"prompt": 5}, "prompt", "string_type"),
    ({"prompt": "ab", "n": 2.0}, "n", "int_type"),
    ({"prompt": "ab", "guidance_scale": "5"}, "guidance_scale", "float_type"),
    ({"prompt": "ab", "stepz": 3}, "stepz", "extra_forbidden"),
]


@needs_web
def test_bad_requests_answer_400_or_422_and_the_server_goes_on(tmp_path):
    with fake_server(tmp_path, max_prompt_chars=100) as (client, _, _):
        for change, param, code in BAD_VALUES:
            reply = client.post(URL, json={"prompt": "ab", **change})
            assert reply.status_code == 400, (change, reply.text)
            error = reply.json()["error"]
            assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), change
            assert error["message"]
        for body, param, code in SCHEMA_VIOLATIONS:
            reply = client.post(URL, json=body)
            assert reply.status_code == 422, (body, reply.text)
            assert (reply.json()["error"]["param"], reply.json()["error"]["code"]) == (param, code)
        assert (
            "known fields are prompt, n"
            in client.post(URL, json={"prompt": "ab", "stepz": 3}).json()["error"]["message"]
        )
        reply = client.post(URL, content=b"{not json", headers={"content-type": "application/json"})
        assert (reply.status_code, reply.json()["error"]["code"]) == (422, "json_invalid")
        assert client.get("/v1/nowhere").json()["error"]["message"].startswith("no route")
        assert client.post(URL, json={"prompt": "ab"}).status_code == 200
        assert metric(client, "imagen_requests_total", status="400") == len(BAD_VALUES)
        assert metric(client, "imagen_requests_total", status="422") == len(SCHEMA_VIOLATIONS) + 2


@needs_web
def test_the_openapi_description_documents_the_extension_fields(tmp_path):
    from imagen.runtime.serve import ServeConfig, create_app

    app = create_app(fake_pipeline(make_bundle(tmp_path)), ServeConfig(warmup=False))
    fields = app.openapi()["components"]["schemas"]["GenerationRequest"]["properties"]
    negative = fields["negative_prompt"]
    assert {"type": "string"} in negative["anyOf"] and {"type": "null"} in negative["anyOf"]
    assert "DeepFloyd IF" in negative["description"] and "400 with param negative_prompt" in negative["description"]
    assert all(fields[name].get("description") for name in ("seed", "steps", "sampler", "negative_prompt"))


@needs_web
def test_too_many_images_or_too_large_a_body_answer_413(tmp_path):
    with fake_server(tmp_path, max_body_bytes=1000) as (client, _, _):
        reply = client.post(URL, json={"prompt": "ab", "n": 5})
        assert reply.status_code == 413
        assert reply.json()["error"]["code"] == "too_many_images" and "at most 4" in reply.json()["error"]["message"]
        reply = client.post(URL, json={"prompt": "x" * 2000})
        assert (reply.status_code, reply.json()["error"]["code"]) == (413, "body_too_large")
        chunked = client.post(URL, content=iter([b'{"prompt": "ab"}']), headers={"content-type": "application/json"})
        assert (chunked.status_code, chunked.json()["error"]["code"]) == (411, "length_required")


@needs_web
def test_api_key_is_required_when_set(tmp_path):
    with fake_server(tmp_path, api_key="s3cret") as (client, _, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            reply = client.post(URL, json={"prompt": "ab"}, headers=headers)
            assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
            assert reply.json()["error"]["type"] == "authentication_error"
        reply = client.post(URL, content=b"{bad", headers={"content-type": "application/json"})
        assert reply.status_code == 401  # the key is checked before the body is read
        assert client.post(URL, json={"prompt": "ab"}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


@needs_web
def test_full_queue_answers_429_with_retry_after(tmp_path):
    with (
        fake_server(tmp_path, max_queue_images=3, max_wait_ms=60_000) as (client, service, gate),
        ThreadPoolExecutor(4) as pool,
    ):
        gate.open.clear()
        gate.entered.clear()
        running = pool.submit(client.post, URL, json={"prompt": "ab", "n": 3})  # fills the queue: goes at once
        assert gate.entered.wait(WAIT)
        queued = pool.submit(client.post, URL, json={"prompt": "ab", "n": 3, "steps": 2})
        wait_until(lambda: service.batcher.queued_images == 3)
        reply = client.post(URL, json={"prompt": "ab", "n": 1})
        assert reply.status_code == 429 and int(reply.headers["retry-after"]) >= 1
        assert reply.json()["error"]["code"] == "queue_full" and "retry in" in reply.json()["error"]["message"]
        assert metric(client, "imagen_queue_images") == 3
        gate.open.set()
        assert running.result(WAIT).status_code == 200 and queued.result(WAIT).status_code == 200


@needs_web
def test_not_ready_until_warmed_then_ready(tmp_path):
    with fake_server(tmp_path, gate_open=False) as (client, service, gate):
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "warming up" in ready.json()["reason"]
        reply = client.post(URL, json={"prompt": "ab"})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "not_ready"
        assert reply.headers["retry-after"] == "1" and metric(client, "imagen_ready") == 0
        gate.open.set()  # the warm-up request runs
        assert service.ready.wait(WAIT)
        assert client.get("/readyz").json()["ready"] is True and metric(client, "imagen_ready") == 1
        assert client.post(URL, json={"prompt": "ab"}).status_code == 200


@needs_web
def test_time_limit_answers_504_and_drops_the_queued_request(tmp_path):
    with fake_server(tmp_path, timeout_s=0.5, max_wait_ms=0) as (client, service, gate), ThreadPoolExecutor(2) as pool:
        gate.open.clear()
        gate.entered.clear()
        running = pool.submit(client.post, URL, json={"prompt": "ab"})
        assert gate.entered.wait(WAIT)
        queued = client.post(URL, json={"prompt": "ab", "steps": 2})  # waits behind the held batch
        assert queued.status_code == 504 and "still in the queue" in queued.json()["error"]["message"]
        reply = running.result(WAIT)
        assert reply.status_code == 504 and "in its batch" in reply.json()["error"]["message"]
        assert reply.json()["error"]["type"] == "timeout_error"
        gate.open.set()
        wait_until(lambda: metric(client, "imagen_batch_requests_count") == 2)  # the warm-up and the held batch
        assert metric(client, "imagen_requests_dropped_total") == 1
        assert client.post(URL, json={"prompt": "ab"}).status_code == 200


@needs_web
def test_engine_failure_answers_500_and_the_server_goes_on(tmp_path):
    from bundles import FakeBackend

    with fake_server(tmp_path) as (client, service, _):
        good = service.pipe.backends["unet_0"]
        service.pipe.backends["unet_0"] = FakeBackend(service.pipe.bundle.stages["unet_0"].signature, nan_at_call=0)
        reply = client.post(URL, json={"prompt": "ab"})
        assert reply.status_code == 500
        error = reply.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "non_finite") and "unet_0" in error["message"]
        service.pipe.backends["unet_0"] = good
        assert client.post(URL, json={"prompt": "ab"}).status_code == 200
        assert metric(client, "imagen_requests_total", status="500") == 1


@needs_web
def test_metrics_count_requests_images_and_batches(tmp_path):
    with fake_server(tmp_path) as (client, _, _):
        for n in (1, 3):
            assert client.post(URL, json={"prompt": "ab", "n": n}).status_code == 200
        assert client.post(URL, json={"prompt": "ab", "n": 0}).status_code == 400
        assert metric(client, "imagen_requests_total", status="200") == 2
        assert metric(client, "imagen_requests_total", status="400") == 1
        assert metric(client, "imagen_images_total") == 4
        assert metric(client, "imagen_batch_images_count") == 3  # with the warm-up's
        assert metric(client, "imagen_batch_images_sum") == 4 + 1 + 3  # the warm-up is a full batch
        assert metric(client, "imagen_batch_images_bucket", le="2.0") == 1
        assert metric(client, "imagen_request_seconds_count") == 2
        assert metric(client, "imagen_queue_images") == 0 and metric(client, "imagen_requests_in_flight") == 0


@needs_web
def test_drain_refuses_new_requests_and_finishes_those_in_flight(tmp_path):
    with fake_server(tmp_path) as (client, service, gate), ThreadPoolExecutor(2) as pool:
        gate.open.clear()
        gate.entered.clear()
        in_flight = pool.submit(client.post, URL, json={"prompt": "ab", "n": 2})
        assert gate.entered.wait(WAIT)
        service.begin_drain()  # what SIGTERM does first
        reply = client.post(URL, json={"prompt": "ab"})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "draining"
        assert client.get("/readyz").status_code == 503 and client.get("/healthz").status_code == 200
        gate.open.set()
        reply = in_flight.result(WAIT)
        assert reply.status_code == 200 and len(reply.json()["data"]) == 2
    assert service.batcher.closing and not service.batcher.queue  # the lifespan's shutdown closed the batcher


@needs_web
@needs_openai
def test_the_openai_client_gets_images_and_typed_errors(tmp_path):
    """imagen-serve over a real connection (uvicorn in a thread), driven by the official client."""
    from imagen.runtime.serve import ServeConfig, create_app

    app = create_app(fake_pipeline(make_bundle(tmp_path)), ServeConfig(max_wait_ms=0))
    with running_server(app) as port:
        assert app.state.service.ready.wait(WAIT)
        check_with_openai(f"http://127.0.0.1:{port}", size="16x16")


@needs_web
def test_a_client_that_disconnects_before_its_batch_is_dropped(tmp_path):
    """Over a real connection (uvicorn in a thread): the client hangs up while its request is queued."""
    import uvicorn

    from imagen.runtime.serve import ServeConfig, create_app

    pipe = fake_pipeline(make_bundle(tmp_path))
    gate = pipe.backends["text_encoder"] = Gate(pipe.backends["text_encoder"])
    app = create_app(pipe, ServeConfig(max_wait_ms=0))
    service = app.state.service
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        assert service.ready.wait(WAIT)
        gate.open.clear()
        gate.entered.clear()
        held = threading.Thread(target=http_post, args=(port, {"prompt": "held"}))
        held.start()
        assert gate.entered.wait(WAIT)
        body = json.dumps({"prompt": "gone", "n": 2}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
            client.sendall(
                b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            wait_until(lambda: service.batcher.queued_images == 2)
        wait_until(lambda: metric_sample(service, "imagen_requests_dropped_total") == 1)
        assert service.batcher.queued_images == 0
        gate.open.set()
        held.join(WAIT)
        wait_until(lambda: metric_sample(service, "imagen_batch_requests_count") == 2)
        assert metric_sample(service, "imagen_batch_requests_sum") == 2  # the warm-up and "held": "gone" never ran
    finally:
        gate.open.set()
        server.should_exit = True
        thread.join(WAIT)
