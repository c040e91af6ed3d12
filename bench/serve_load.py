"""A bounded load generator for imagen-serve, and the engines alone on full batches for the ratio.

    imagen-serve --port 8000 &
    python -m bench.serve_load --url http://127.0.0.1:8000 --concurrency 1,4,8,16 --requests 200 --duration 30

Per concurrency level, that many client threads send POST /v1/images/generations back to back
(keep-alive connections) until the level has sent `--requests` requests or `--duration` seconds
have passed, then wait for the answers. Reported per level: images/s (decoded images over the
level's wall time), latency p50/p95/p99 of answered requests, 429s, other error statuses, and lost
requests: those neither refused (429, 503) nor answered with an error status that did not come back
with `n` PNGs of the right size (every PNG is decoded). Then, without the server's help, the same
bundle's engines run full batches back to back in this process (`--engine-seconds`, 0 to skip) through
the server's own batch code, and the ratio server/engines is printed.

Only loopback addresses are accepted: this is a benchmark of one machine, never a load test of
someone else's server.
"""

import argparse
import base64
import http.client
import io
import ipaddress
import json
import os
import platform
import sys
import threading
import time
from urllib.parse import urlsplit

import numpy as np

URL_PATH = "/v1/images/generations"
PROMPTS = [
    "a small red circle on the left",
    "a large blue square at the top",
    "a green triangle in the middle",
    "a small yellow circle at the bottom",
    "a large purple square on the right",
]


def loopback_url(url: str) -> tuple[str, int]:
    """(host, port) of an http URL on this machine; ValueError for any other."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are accepted, got {url!r}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{host!r} is not a loopback address: this generator only loads a server on this machine")
    return host, parts.port or 80


class Client:
    """One keep-alive connection; `post` returns (status, headers, body) or raises OSError."""

    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port, self.timeout, self.connection = host, port, timeout, None

    def request(self, method: str, path: str, body: dict | None = None):
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            data = None if body is None else json.dumps(body)
            self.connection.request(method, path, data, {"Content-Type": "application/json"})
            response = self.connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def valid_images(body: bytes, n: int, size: int) -> bool:
    """Whether an answer holds n decodable PNGs of size x size."""
    from PIL import Image

    try:
        data = json.loads(body)["data"]
        if len(data) != n:
            return False
        for item in data:
            image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"], validate=True)))
            image.load()
            if image.format != "PNG" or image.size != (size, size):
                return False
        return True
    except (ValueError, KeyError, TypeError, OSError):
        return False


def run_level(
    host, port, concurrency: int, requests: int, duration: float, request_body, size: int, n: int, timeout: float
) -> dict:
    """One concurrency level, bounded by `requests` and `duration`."""
    lock, counts, latencies = threading.Lock(), {"sent": 0, "ok": 0, "429": 0, "503": 0, "errors": 0, "lost": 0}, []
    start = time.monotonic()
    deadline = start + duration

    def worker():
        client = Client(host, port, timeout)
        while True:
            with lock:
                if counts["sent"] >= requests or time.monotonic() >= deadline:
                    break
                counts["sent"] += 1
                index = counts["sent"]
            sent = time.monotonic()
            try:
                status, headers, body = client.request("POST", URL_PATH, request_body(index))
            except (OSError, http.client.HTTPException):
                status, headers, body = None, {}, b""
            latency = time.monotonic() - sent
            outcome = classify(status, body, n, size)
            with lock:
                counts[outcome] += 1
                if outcome == "ok":
                    latencies.append(latency)
            if outcome == "429":  # back off as told, within the level's time
                time.sleep(min(float(headers.get("retry-after", 1)), max(0.0, deadline - time.monotonic()), 1.0))
        client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - start
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if latencies else (float("nan"),) * 3
    return {
        "concurrency": concurrency,
        **counts,
        "images": counts["ok"] * n,
        "wall_s": wall,
        "images_per_s": counts["ok"] * n / wall,
        "p50_s": float(p50),
        "p95_s": float(p95),
        "p99_s": float(p99),
    }


def classify(status: int | None, body: bytes, n: int, size: int) -> str:
    if status == 200:
        return "ok" if valid_images(body, n, size) else "lost"
    if status in (429, 503):
        return str(status)
    return "lost" if status is None else "errors"


def engines_alone(bundle, seconds: float, steps, threads) -> dict:
    """Full batches back to back through the server's batch code (engine.run_batch), no HTTP, no queue."""
    from imagen.runtime import Pipeline
    from imagen.runtime.serve import engine

    pipe = Pipeline.load(bundle, threads=threads)
    requests = [engine.prepare(pipe, PROMPTS[i % len(PROMPTS)], 1, seed=i, steps=steps) for i in range(pipe.max_batch)]
    engine.run_batch(pipe, requests)  # warm-up
    batches, start = 0, time.monotonic()
    while batches == 0 or time.monotonic() - start < seconds:
        engine.run_batch(pipe, requests)
        batches += 1
    wall = time.monotonic() - start
    return {
        "bundle_sha": pipe.bundle.short_sha,
        "batch": pipe.max_batch,
        "batches": batches,
        "wall_s": wall,
        "images_per_s": batches * pipe.max_batch / wall,
    }


def render(levels: list[dict], alone: dict | None, facts: dict) -> str:
    lines = [
        f"machine: {facts['machine']}; server bundle {facts['bundle_sha']}, {facts['size']}x{facts['size']}, "
        f"max batch {facts['max_batch']}; n={facts['n']}, steps={facts['steps']}; "
        f"load average before: {facts['load_before']}",
        "",
        "| concurrency | requests sent | answered | images/s | p50 s | p95 s | p99 s | 429 | 503 | errors | lost |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        lines.append(
            f"| {level['concurrency']} | {level['sent']} | {level['ok']} | {level['images_per_s']:.2f} | "
            f"{level['p50_s']:.2f} | {level['p95_s']:.2f} | {level['p99_s']:.2f} | {level['429']} | "
            f"{level['503']} | {level['errors']} | {level['lost']} |"
        )
    if alone is not None:
        best = max(levels, key=lambda level: level["images_per_s"]) if levels else None
        lines += [
            "",
            f"engines alone, full batches of {alone['batch']} back to back: {alone['images_per_s']:.2f} "
            f"images/s ({alone['batches']} batches in {alone['wall_s']:.1f} s)",
        ]
        if best is not None:
            ratio = best["images_per_s"] / alone["images_per_s"]
            lines.append(
                f"server at its best level (concurrency {best['concurrency']}): "
                f"{best['images_per_s']:.2f} images/s = {ratio:.2f} x the engines alone"
            )
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the server, on this machine (http://127.0.0.1:PORT)")
    parser.add_argument("--concurrency", default="1,4,8,16", help="client threads per level, comma-separated")
    parser.add_argument("--requests", type=int, default=200, help="at most this many requests per level")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per level at most (then drains)")
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--steps", type=int, default=None, help="steps per Unet (default: the bundle's)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--bundle", default=None, help="the server's bundle, for the engines alone (default: demo)")
    parser.add_argument("--engine-seconds", type=float, default=30.0, help="engines alone: seconds (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="engines alone: CPU threads per session")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    levels = [int(value) for value in args.concurrency.split(",")]
    if not all(1 <= level <= 256 for level in levels) or not 1 <= args.requests <= 100_000:
        parser.error("concurrency levels must be in [1, 256] and --requests in [1, 100000]")
    if not 0 < args.duration <= 3600 or not 0 <= args.engine_seconds <= 3600:
        parser.error("--duration must be in (0, 3600] and --engine-seconds in [0, 3600]")
    return args, levels


def main(argv=None) -> int:
    args, levels = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        host, port = loopback_url(args.url)
    except ValueError as error:
        print(f"serve_load: error: {error}", file=sys.stderr)
        return 2
    client = Client(host, port, args.timeout)
    status, _, body = client.request("GET", "/readyz")
    if status != 200:
        print(
            f"serve_load: error: the server is not ready ({status}: {body.decode(errors='replace')})", file=sys.stderr
        )
        return 2
    ready = json.loads(body)
    size = int(ready["size"].split("x")[0])
    facts = {
        "machine": f"{os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        "bundle_sha": ready["bundle_sha"],
        "size": size,
        "max_batch": ready["max_batch"],
        "n": args.n,
        "steps": args.steps or "bundle default",
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }

    def request_body(index):
        body = {"prompt": PROMPTS[index % len(PROMPTS)], "n": args.n, "seed": index}
        return body if args.steps is None else {**body, "steps": args.steps}

    results = []
    for concurrency in levels:
        level = run_level(
            host, port, concurrency, args.requests, args.duration, request_body, size, args.n, args.timeout
        )
        print(json.dumps(level), file=sys.stderr)
        results.append(level)
    alone = None
    if args.engine_seconds > 0:
        alone = engines_alone(args.bundle, args.engine_seconds, args.steps, args.threads)
        if alone["bundle_sha"] != ready["bundle_sha"]:
            print(
                f"serve_load: warning: the server runs bundle {ready['bundle_sha']}, the engines alone ran "
                f"{alone['bundle_sha']}: pass the server's --bundle",
                file=sys.stderr,
            )
    print(render(results, alone, facts))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"facts": facts, "levels": results, "engines_alone": alone}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
