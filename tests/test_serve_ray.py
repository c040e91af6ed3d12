"""The Ray Serve app (imagen.runtime.serve.ray) on a small local Ray instance (127.0.0.1, a free port):
two replicas of the demo bundle answer; concurrent requests form engine batches by settings, within
the max batch, and equal their solo images; every answer, good or bad, equals imagen-serve's; Ray's
backpressure answers 429, and a replica with IMAGEN_API_KEY 401; the `openai` client gets its images
and typed errors. Then, without a cluster: the app's arguments and the shipped Serve config.

Replicas take no logical CPU (`num_cpus: 0`) and one engine thread each, so the whole module runs
on two cores; Serve and Ray are shut down in the fixture's finalizer. Two tests lean on margins of
seconds over milliseconds: concurrent requests reach their replica within its 2 s batching window,
and four requests sent at once arrive while the first (a batch of 8 images) still runs."""

import http.client
import importlib.util
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_serve import BAD_VALUES, SCHEMA_VIOLATIONS

from serving import URL, WAIT, check_with_openai, decode_png, needs_openai, needs_web

pytestmark = [
    needs_web,
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None, reason="ray not installed: pip install 'imagen-cascade[ray]'"
    ),
    # Ray's own config models use a pydantic 1 idiom that pydantic 2 warns about
    pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning"),
]
ROOT = Path(__file__).parent.parent
REPLICAS = {"num_cpus": 0, "threads": 1}  # replicas share the two cores; Ray counts no CPU for them
# fp32: ONNX Runtime's exact images, those of demo_pipe (Pipeline.load's default) below
APP = {**REPLICAS, "num_replicas": "2", "max_wait_ms": "2000", "max_prompt_chars": 100, "precision": "fp32"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(port, method, path, body=None, headers=None, chunked=False):
    """(status, headers, JSON or bytes) of one HTTP request to 127.0.0.1:port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2 * WAIT)
    try:
        data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        if chunked:
            connection.request(method, path, iter([data]), headers, encode_chunked=True)
        else:
            connection.request(method, path, data, headers)
        response = connection.getresponse()
        content = response.read()
        kind = response.getheader("content-type", "")
        return response.status, response, json.loads(content) if kind.startswith("application/json") else content
    finally:
        connection.close()


@pytest.fixture(scope="module")
def ray_port():
    """A local Ray instance with Serve's HTTP proxy on 127.0.0.1 at a free port; shut down at the end."""
    import ray
    from ray import serve

    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # Ray reports nothing from a test run
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=100 * 1024**2,
            logging_level="ERROR",
            log_to_driver=False,
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            yield port
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def imagen_app(ray_port):
    """The app over the demo bundle, two replicas, at /; `serve.run` returns once both are warmed."""
    from ray import serve

    from imagen.runtime.serve.ray import build_app

    serve.run(build_app(APP), name="imagen", route_prefix="/", blocking=False)
    return ray_port


@pytest.fixture(scope="module")
def demo_pipe():
    from imagen.runtime import Pipeline

    return Pipeline.load()


@pytest.fixture(scope="module")
def imagen_serve(demo_pipe):
    """imagen-serve over the same bundle in this process: the answers the Ray app must give."""
    from fastapi.testclient import TestClient

    from imagen.runtime.serve import ServeConfig, create_app

    with TestClient(create_app(demo_pipe, ServeConfig(max_prompt_chars=100, warmup=False))) as client:
        yield client


def test_two_replicas_answer_each_loaded_and_warmed(imagen_app, demo_pipe):
    from ray import serve

    from imagen.runtime.serve.api import ready_body

    states = serve.status().applications["imagen"].deployments["imagen"].replica_states
    assert {str(getattr(state, "value", state)): count for state, count in states.items()} == {"RUNNING": 2}
    replicas = set()
    for _ in range(64):  # the router picks a replica at random: 64 misses in a row is 2**-63
        status, response, body = call(imagen_app, "GET", "/readyz")
        assert (status, body) == (200, ready_body(demo_pipe))
        replicas.add(response.getheader("x-imagen-replica"))
        if len(replicas) == 2:
            break
    assert len(replicas) == 2 and None not in replicas, replicas
    assert call(imagen_app, "GET", "/healthz")[::2] == (200, {"status": "ok"})


def test_concurrent_requests_form_engine_batches_by_settings_equal_to_solo_images(imagen_app, demo_pipe):
    """Six requests at once, two settings (steps 3 and 2), 8 images in all: whatever replica each
    reaches, the requests of one replica with equal settings run as one engine batch."""
    prompts = ["a small red circle on the left", "a large blue square at the top", "a green triangle"]
    requests = [
        {"prompt": prompt, "n": n, "seed": 10 * steps + index, "steps": steps}
        for steps in (3, 2)
        for index, (prompt, n) in enumerate(zip(prompts, (2, 1, 1)))
    ]
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda body: call(imagen_app, "POST", URL, body), requests))
    batches = {}  # one engine batch: its replica and its (shared) batch time
    for body, (status, response, answer) in zip(requests, replies):
        assert status == 200, answer
        info = answer["data"][0]["imagen"]
        assert [item["imagen"]["batch"] for item in answer["data"]] == [info["batch"]] * body["n"]
        key = (response.getheader("x-imagen-replica"), info["timings"]["total"])
        batches.setdefault(key, []).append((body, info))
    for members in batches.values():
        batch = members[0][1]["batch"]
        assert len({body["steps"] for body, _ in members}) == 1, members  # one setting per engine batch
        assert batch == {"requests": len(members), "images": sum(body["n"] for body, _ in members)}
        assert batch["images"] <= demo_pipe.max_batch
    assert max(len(members) for members in batches.values()) >= 2  # 6 requests, 2 replicas, 2 settings
    worst, equal = 0, []
    for body, (_, _, answer) in zip(requests, replies):
        served = np.stack([np.asarray(decode_png(item["b64_json"])) for item in answer["data"]])
        solo = demo_pipe(body["prompt"], seed=body["seed"], num_images_per_prompt=body["n"], steps=body["steps"]).array
        difference = np.abs(served.astype(np.int16) - solo.astype(np.int16))
        worst = max(worst, int(difference.max()))
        equal.append(float(np.mean(difference == 0)))
    sizes = sorted(len(members) for members in batches.values())
    print(f"engine batches (requests each): {sizes}; served vs solo uint8: max abs difference {worst}, ", end="")
    print(f"share of equal values {min(equal):.4f} (worst request)")
    assert worst <= 2 and min(equal) >= 0.9


EXTRA_CASES = [  # method, path, body, status: answered by both servers before any engine work
    ("POST", URL, {"prompt": "ab", "n": 9}, 413),  # more than the max batch
    ("POST", URL, {"prompt": "x" * 70_000}, 413),  # a body over 64 KiB
    ("POST", URL, b"{not json", 422),
    ("GET", "/v1/nowhere", None, 404),
    ("GET", URL, None, 405),
    ("GET", "/healthz", None, 200),
    ("GET", "/readyz", None, 200),
]


def test_answers_equal_imagen_serve_answers_good_and_bad(imagen_app, imagen_serve):
    cases = [("POST", URL, {"prompt": "ab", **change}, 400) for change, _, _ in BAD_VALUES]
    cases += [("POST", URL, body, 422) for body, _, _ in SCHEMA_VIOLATIONS] + EXTRA_CASES
    for method, path, body, expected in cases:
        status, _, answer = call(imagen_app, method, path, body)
        content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        reference = imagen_serve.request(method, path, content=content, headers={"content-type": "application/json"})
        assert (status, answer) == (expected, reference.json()), (method, path, body)
        assert reference.status_code == expected
    status, _, answer = call(imagen_app, "POST", URL, {"prompt": "ab"}, chunked=True)
    chunked = imagen_serve.post(URL, content=iter([b'{"prompt": "ab"}']), headers={"content-type": "application/json"})
    assert (status, answer) == (411, chunked.json())

    body = {"prompt": "a small red circle on the left", "n": 2, "size": "64x64", "seed": 7, "steps": 3}
    status, _, answer = call(imagen_app, "POST", URL, body)
    reference = imagen_serve.post(URL, json=body)
    assert status == reference.status_code == 200
    reference = reference.json()
    assert set(answer) == set(reference) == {"created", "data"} and len(answer["data"]) == len(reference["data"]) == 2
    for item, expected in zip(answer["data"], reference["data"]):
        assert set(item) == set(expected) and set(item["imagen"]) == set(expected["imagen"])
        assert set(item["imagen"]["timings"]) == set(expected["imagen"]["timings"])
        for info in (item["imagen"], expected["imagen"]):
            del info["timings"]
        assert item["imagen"] == expected["imagen"]  # seed, settings, bundle, backend, batch of 2 images
        served, solo = decode_png(item["b64_json"]), decode_png(expected["b64_json"])
        assert served.text == solo.text  # the PNG's prompt, seed, sampler, steps, guidance and bundle
        difference = np.abs(np.asarray(served, np.int16) - np.asarray(solo, np.int16))
        assert difference.max() <= 2 and np.mean(difference == 0) >= 0.9


@needs_openai
def test_the_openai_client_gets_images_and_typed_errors(imagen_app):
    check_with_openai(f"http://127.0.0.1:{imagen_app}", size="64x64")


def test_ray_backpressure_answers_429_and_a_replica_with_a_key_answers_401_without_it(ray_port):
    """A second app under a route prefix: one replica that holds one request and lets one wait, with
    IMAGEN_API_KEY in its environment. Of four requests at once, Ray refuses some with 429."""
    from ray import serve

    from imagen.runtime.serve.ray import ImagenDeployment, parse_args

    config, deployment = parse_args(
        {**REPLICAS, "num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1, "max_wait_ms": 0}
    )
    options = deployment.options(config)
    options["ray_actor_options"]["runtime_env"] = {"env_vars": {"IMAGEN_API_KEY": "s3cret"}}
    app = ImagenDeployment.options(**options).bind(config)
    serve.run(app, name="small", route_prefix="/small", blocking=False)
    try:
        path, key = "/small" + URL, {"Authorization": "Bearer s3cret"}
        status, response, answer = call(ray_port, "POST", path, {"prompt": "ab"})
        assert (status, answer["error"]["code"]) == (401, "invalid_api_key")
        assert response.getheader("www-authenticate") == "Bearer"
        body = {"prompt": "a green triangle", "n": 8, "steps": 2}
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: call(ray_port, "POST", path, body, key), range(4)))
        statuses = sorted(status for status, _, _ in replies)
        print(f"four requests at once to a replica that holds one and queues one: {statuses}")
        assert set(statuses) == {200, 429} and statuses.count(200) <= 2, statuses
        for status, response, answer in replies:
            if status == 429:
                assert response.getheader("retry-after") == "1"
            else:
                assert len(answer["data"]) == 8
        # under a route prefix the API's own limits still hold
        status, _, answer = call(ray_port, "POST", path, {"prompt": "ab"}, key, chunked=True)
        assert (status, answer["error"]["code"]) == (411, "length_required")
    finally:
        serve.delete("small")


# --- without a cluster -------------------------------------------------------------------------------

BAD_ARGUMENTS = [  # args, the field the error names, a part of its message
    ({"num_replica": "2"}, "num_replica", "known ones are bundle, backend"),
    ({"port": "8000"}, "port", "known ones are"),  # imagen-serve's own: Ray's proxy listens
    ({"num_replicas": "two"}, "num_replicas", "whole number >= 1 or 'auto'"),
    ({"num_replicas": 0}, "num_replicas", "got 0"),
    ({"threads": "1.5"}, "threads", "whole number >= 1"),
    ({"num_gpus": "-1"}, "num_gpus", "number >= 0"),
    ({"num_cpus": "many"}, "num_cpus", "got 'many'"),
    ({"providers": "gpu"}, "providers", "one of cpu, auto, cuda, tensorrt"),
    ({"backend": "cuda"}, "backend", "auto, onnxruntime, tensorrt"),
    ({"max_queued_requests": 0}, "max_queued_requests", "or -1 (no limit)"),
    ({"timeout_s": "0"}, "timeout_s", "number > 0"),
    ({"max_wait_ms": "20000"}, "max_wait_ms", "number in [0, 10000]"),
    ({"autoscaling_config": "{min_replicas: 1"}, "autoscaling_config", "JSON object"),
    ({"autoscaling_config": {"min_replicas": 1, "max_replica": 2}}, "autoscaling_config", "max_replica"),
    ({"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling_config", "min_replicas (3)"),
    ({"num_replicas": 2, "autoscaling_config": {"max_replicas": 2}}, "num_replicas", "not both"),
]


def test_app_arguments_are_typed_and_bad_ones_named_in_one_line():
    from ray.serve import Application

    from imagen.runtime.serve import ServeConfig
    from imagen.runtime.serve.ray import ArgumentError, build_app, parse_args

    config, deployment = parse_args({"num_replicas": "2", "num_gpus": "1", "num_cpus": "0", "bundle": "b"})
    assert (config.bundle, config.providers, config.threads) == ("b", "cpu", 1)  # threads: num_cpus, at least 1
    assert (config.max_wait_ms, config.timeout_s) == (ServeConfig.max_wait_ms, ServeConfig.timeout_s) == (10.0, 120.0)
    assert parse_args({"providers": "cuda", "num_cpus": 3})[0] == ServeConfig(providers="cuda", threads=3)
    options = deployment.options(config)
    assert options["num_replicas"] == 2 and options["ray_actor_options"] == {"num_cpus": 0.0, "num_gpus": 1.0}
    assert (options["max_ongoing_requests"], options["max_queued_requests"]) == (16, 64)
    assert options["backpressure_config"].status_code == 429 and options["graceful_shutdown_timeout_s"] == 125
    scaled = parse_args({"autoscaling_config": '{"min_replicas": 1, "max_replicas": 4}', "num_replicas": "auto"})[1]
    assert scaled.options(config)["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4}
    assert parse_args({"max_queued_requests": "-1"})[1].max_queued_requests == -1
    assert isinstance(build_app({}), Application)
    for args, name, fragment in BAD_ARGUMENTS:
        with pytest.raises(ArgumentError) as caught:
            build_app(args)
        message = str(caught.value)
        assert caught.value.name == name and message.startswith(f"{name}: "), (args, message)
        assert fragment in message and "\n" not in message, (args, message)


def test_shipped_ray_serve_config_is_valid_and_builds():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from imagen.runtime.serve.ray import build_app

    config = yaml.safe_load((ROOT / "recipes" / "serve" / "ray-serve.yaml").read_text())
    (application,) = ServeDeploySchema.model_validate(config).applications
    assert application.import_path == "imagen.runtime.serve.ray:build_app"
    built = build_app(application.args)._bound_deployment
    assert built.ray_actor_options == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert built._deployment_config.autoscaling_config.max_replicas == 8


def test_the_ray_app_serves_an_imagen_pytorch_bundle(ray_port, imagen_pytorch_bundles):
    """A second application over the tiny ElucidatedImagen bundle (its steps fixed by its table, so its
    warm-up samples them all): its image equals the pipeline's own, and a request for other steps is a 400."""
    from imagen_pytorch_tiny import missing_packages
    from ray import serve

    from imagen.runtime import Pipeline
    from imagen.runtime.serve.ray import build_app

    if missing_packages():
        pytest.skip(f"imagen-pytorch 2.1.0 is not installed (missing: {missing_packages()})")
    bundle = imagen_pytorch_bundles["elucidated"]
    config = {**REPLICAS, "num_replicas": "1", "max_wait_ms": "0", "precision": "fp32", "bundle": str(bundle)}
    serve.run(build_app(config), name="imagen-pytorch", route_prefix="/imagen-pytorch", blocking=False)
    try:
        status, _, body = call(ray_port, "POST", f"/imagen-pytorch{URL}", {"prompt": "a blue square", "seed": 4})
        assert status == 200, body
        (item,) = body["data"]
        with Pipeline.load(bundle) as pipe:
            np.testing.assert_array_equal(
                np.asarray(decode_png(item["b64_json"])), pipe("a blue square", seed=4).array[0]
            )
        status, _, body = call(ray_port, "POST", f"/imagen-pytorch{URL}", {"prompt": "a", "seed": 4, "steps": 2})
        assert status == 400 and body["error"]["param"] == "steps", body
    finally:
        serve.delete("imagen-pytorch")
