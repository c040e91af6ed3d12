"""imagen-serve on the demo bundle's real engines: concurrent requests form one batch equal to their
solo images; a negative prompt is a 400 (the demo has a learned null text); a real process drains
on SIGTERM and exits 0; its user errors exit 2. (The load
generator's own checks are in test_bench.py.)"""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving import URL, WAIT, decode_png, http_get, http_post, metric, needs_web, wait_until

# --- the demo bundle's real engines --------------------------------------------------------------


@needs_web
def test_concurrent_requests_form_one_batch_equal_to_their_solo_images():
    from fastapi.testclient import TestClient

    from imagen.runtime import Pipeline
    from imagen.runtime.serve import ServeConfig, create_app

    pipe = Pipeline.load()  # the demo bundle: max batch 8, 64x64
    requests = [
        {"prompt": prompt, "n": 2, "seed": seed, "steps": 3}
        for prompt, seed in [
            ("a small red circle on the left", 1),
            ("a large blue square at the top", 2),
            ("a green triangle", 3),
            ("a small yellow circle in the middle", 4),
        ]
    ]
    # the window is long, so the batch goes when it is full: 4 requests x 2 images = max_batch
    app = create_app(pipe, ServeConfig(max_wait_ms=60_000))
    with TestClient(app) as client, ThreadPoolExecutor(len(requests)) as pool:
        assert app.state.service.ready.wait(WAIT)
        replies = list(pool.map(lambda body: client.post(URL, json=body), requests))
        assert metric(client, "imagen_batch_requests_count") == 2  # the warm-up and one batch
        assert metric(client, "imagen_batch_requests_sum") == 1 + 4
        assert metric(client, "imagen_batch_images_sum") == 8 + 8  # the warm-up is a full batch
    worst, equal = 0, []
    for body, reply in zip(requests, replies):
        assert reply.status_code == 200, reply.text
        data = reply.json()["data"]
        assert [item["imagen"]["batch"] for item in data] == [{"images": 8, "requests": 4}] * 2
        served = np.stack([np.asarray(decode_png(item["b64_json"])) for item in data])
        solo = pipe(body["prompt"], seed=body["seed"], num_images_per_prompt=2, steps=3).array
        difference = np.abs(served.astype(np.int16) - solo.astype(np.int16))
        worst = max(worst, int(difference.max()))
        equal.append(float(np.mean(difference == 0)))
    print(f"batched vs solo uint8: max abs difference {worst}, share of equal values {min(equal):.4f} (worst request)")
    assert worst <= 2 and min(equal) >= 0.9


@needs_web
def test_a_negative_prompt_is_a_400_for_the_demo_bundle_and_the_server_goes_on():
    """The demo's Unets take a learned null text: a negative prompt is refused before it queues, naming
    the field (bundles that take one: test_negative_prompt.py)."""
    from fastapi.testclient import TestClient

    from imagen.runtime import Pipeline
    from imagen.runtime.serve import ServeConfig, create_app

    with TestClient(create_app(Pipeline.load(), ServeConfig(warmup=False))) as client:
        reply = client.post(URL, json={"prompt": "a red circle", "negative_prompt": "blurry", "steps": 1})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert (error["param"], error["code"], error["type"]) == (
            "negative_prompt",
            "invalid_parameter",
            "invalid_request_error",
        )
        assert (
            error["message"].startswith("negative_prompt must be left out") and "learned null text" in error["message"]
        )
        reply = client.post(URL, json={"prompt": "a red circle", "negative_prompt": None, "steps": 1})
        assert reply.status_code == 200 and "negative_prompt" not in reply.json()["data"][0]["imagen"]
        assert metric(client, "imagen_requests_total", status="400") == 1
        assert metric(client, "imagen_requests_total", status="500") is None


def test_imagen_serve_process_drains_on_sigterm_and_exits_0():
    pytest.importorskip("uvicorn", reason="uvicorn not installed: pip install 'imagen-cascade[serve]'")
    pytest.importorskip("fastapi", reason="fastapi not installed: pip install 'imagen-cascade[serve]'")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("IMAGEN_API_KEY", None)
    command = [sys.executable, "-m", "imagen.runtime.serve.cli", "--port", "0", "--log-level", "warning"]
    command += ["--precision", "fp32"]  # no engine measurement at start (tests/test_openvino.py has it)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        port = None
        while port is None:
            line = lines.get(timeout=WAIT)
            if "serving bundle" in line:
                port = int(line.rsplit(":", 1)[1])
        wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=60)
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(http_post, port, {"prompt": "a small red circle on the left", "seed": 0}, 60)
            wait_until(lambda: b"imagen_running_requests 1.0" in http_get(port, "/metrics")[1])
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            status, body = in_flight.result(60)
            answered = time.monotonic()
        assert status == 200 and answered > signalled  # answered after the signal: it was in flight
        image = decode_png(json.loads(body)["data"][0]["b64_json"])
        assert image.size == (64, 64)
        assert process.wait(timeout=60) == 0
        with pytest.raises(OSError):  # no longer listening
            http_get(port, "/healthz")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_imagen_serve_user_errors_exit_2():
    pytest.importorskip("uvicorn", reason="uvicorn not installed: pip install 'imagen-cascade[serve]'")
    command = [sys.executable, "-m", "imagen.runtime.serve.cli", "--port", "0"]
    out = subprocess.run([*command, "--bundle", "/nonexistent/bundle"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("imagen-serve: error: ") and out.stderr.count("\n") == 1
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        out = subprocess.run([*command[:-1], port], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "imagen-serve: error:" in out.stderr and "in use" in out.stderr
