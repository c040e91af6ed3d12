"""imagen-serve's HTTP API as a Ray Serve application: many replicas, on many machines (docs/serving.md).

    serve run imagen.runtime.serve.ray:build_app bundle=/path/to/bundle num_replicas=2
    serve deploy recipes/serve/ray-serve.yaml          # a running Ray cluster, or KubeRay's RayService

Each replica loads the bundle once (`Pipeline.load`), warms it with one full batch, and answers
the same routes as imagen-serve with the same checks, answers and errors (`api`). Concurrent
requests are gathered by `@serve.batch` up to the bundle's max batch in images; a gathered batch
runs as engine batches by imagen-serve's rule (`batching.split_batches`: equal settings, at most max
batch images), one at a time in the replica's engine thread, each one `Pipeline.generate` call
(`engine.run_batch`), so every request keeps its own seed and noise. Ray does the rest: routing
between replicas, autoscaling, backpressure (429 with `Retry-After` beyond `max_queued_requests`)
and the graceful shutdown of a replica (it takes no new requests and finishes those it holds).

The arguments are ServeConfig's (serve/config.py, imagen-serve's options) and `DeploymentConfig`'s
(Ray's own), both declared once as fields and parsed from those declarations (`parse_args`).

Ray is imported here only; `imagen.runtime` and `imagen.runtime.serve` never import this module.
"""

import asyncio
import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

try:
    from ray import serve
    from ray.serve.config import AutoscalingConfig, BackpressureConfig
except ImportError as error:
    raise ImportError(
        f"Ray Serve is not installed, or too old for this app ({error}); "
        "install it with pip install 'imagen-cascade[ray]' (tested with ray[serve] 2.60)"
    ) from None
from fastapi import FastAPI
from starlette.responses import JSONResponse

from imagen.runtime.backends import PROVIDER_SETS

from . import engine
from .api import (
    Guard,
    add_error_handlers,
    answer,
    answer_headers,
    check_request,
    failure_error,
    ready_body,
    timeout_error,
)
from .batching import split_batches
from .config import API_KEY_VARIABLE, RAY, ArgumentError, ServeConfig, option, parse_options
from .schema import GENERATIONS, GenerationRequest

REPLICA_HEADER = "x-imagen-replica"  # names the replica that answered


def _autoscaling(name, value):
    """Ray Serve's AutoscalingConfig as a mapping (JSON on the command line), checked by Ray's own model."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ArgumentError(
                name, 'must be a JSON object, e.g. autoscaling_config=\'{"min_replicas": 1, "max_replicas": 4}\''
            ) from None
    if not isinstance(value, dict):
        raise ArgumentError(name, f"must be a mapping such as {{min_replicas: 1, max_replicas: 4}}, got {value!r}")
    known = AutoscalingConfig.model_fields
    for key in value:
        if key not in known:
            raise ArgumentError(
                name, f"{key!r} is not a field of Ray Serve's AutoscalingConfig (min_replicas, max_replicas, ...)"
            )
    try:
        AutoscalingConfig(**value)
    except (TypeError, ValueError) as error:
        errors = getattr(error, "errors", None)
        first = errors()[0] if callable(errors) else {"loc": (), "msg": str(error).splitlines()[0]}
        field = ".".join(str(part) for part in first.get("loc", ()))
        where = f"{field}: " if field else ""
        raise ArgumentError(name, f"{where}{first['msg']}; see Ray Serve's AutoscalingConfig") from None
    return value


@dataclasses.dataclass(frozen=True)
class DeploymentConfig:
    """The Ray-only arguments of `build_app`: replicas, their resources and Ray's backpressure."""

    num_replicas: int | str | None = option(
        None, "a fixed number of replicas (default 1), or auto", kind=int, minimum=1, words=(("auto", "'auto'"),)
    )
    autoscaling_config: dict | None = option(None, "Ray Serve's AutoscalingConfig", parse=_autoscaling)
    num_cpus: float = option(1.0, "Ray CPUs of one replica", kind=float, minimum=0)
    num_gpus: float = option(0.0, "Ray GPUs of one replica", kind=float, minimum=0)
    max_ongoing_requests: int = option(16, "requests one replica holds: what @serve.batch gathers", kind=int, minimum=1)
    max_queued_requests: int = option(
        64, "requests waiting for a replica; beyond it, 429", kind=int, minimum=1, words=((-1, "-1 (no limit)"),)
    )

    def options(self, config: ServeConfig) -> dict:
        """`Deployment.options(...)`: replicas or autoscaling, resources, backpressure, graceful shutdown."""
        if self.autoscaling_config is not None:
            replicas = {"num_replicas": "auto", "autoscaling_config": self.autoscaling_config}
        else:
            replicas = {"num_replicas": 1 if self.num_replicas is None else self.num_replicas}
        return {
            **replicas,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1),
            # a replica that is stopped finishes what it holds, as imagen-serve drains on SIGTERM
            "graceful_shutdown_timeout_s": config.timeout_s + 5,
        }


def parse_args(args: dict) -> tuple[ServeConfig, DeploymentConfig]:
    """`build_app`'s arguments checked and typed: the ServeConfig fields that the Ray app takes, and
    the deployment's. ArgumentError names the first bad one. `threads` None: num_cpus, at least 1."""
    serve_values, deployment_values = parse_options((ServeConfig, DeploymentConfig), dict(args or {}), RAY)
    deployment = DeploymentConfig(**deployment_values)
    if deployment.autoscaling_config is not None and deployment.num_replicas not in (None, "auto"):
        raise ArgumentError(
            "num_replicas", "give either num_replicas or autoscaling_config, not both (or num_replicas=auto)"
        )
    config = ServeConfig(**serve_values)
    if config.threads is None:
        config = dataclasses.replace(config, threads=max(1, int(deployment.num_cpus)))
    return config, deployment


@dataclasses.dataclass(eq=False)
class Pending:
    """One request waiting in `@serve.batch`: `started` once its engine batch starts; `abandoned` once
    its handler left (time limit, client gone), so that a later engine batch skips it."""

    request: engine.ImageRequest
    started: float | None = None
    abandoned: bool = False


def _images(pending: list[Pending]) -> int:
    return sum(item.request.images for item in pending)


class ReplicaHeader:
    """ASGI middleware: every answer names the replica that gave it (`x-imagen-replica`)."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named if scope["type"] == "http" else send)


@serve.deployment(name="imagen")
@serve.ingress()
class ImagenDeployment:
    """One replica: the bundle loaded and warmed once, the routes of imagen-serve, and one engine thread."""

    def __init__(self, config: ServeConfig):
        from imagen.runtime import Pipeline

        self.config = dataclasses.replace(config, api_key=os.environ.get(API_KEY_VARIABLE) or None)
        providers = PROVIDER_SETS[config.providers]
        self.pipe = Pipeline.load(config.bundle, config.backend, providers, config.threads, config.precision)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagen-engine")
        self.generate_batch.set_max_batch_size(self.pipe.max_batch)
        self.generate_batch.set_batch_wait_timeout_s(config.max_wait_ms / 1000)
        # the warm-up: a full batch at 1 step per Unet, so the sessions allocate the largest batch's memory
        engine.run_batch(
            self.pipe, [engine.prepare(self.pipe, "warm-up", self.pipe.max_batch, seed=0, steps=self.pipe.warmup_steps)]
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="imagen-serve (Ray Serve)", docs_url=None, redoc_url=None)
        app.add_middleware(Guard, api_key=self.config.api_key, max_body_bytes=self.config.max_body_bytes)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        add_error_handlers(app)

        @app.post(GENERATIONS)
        async def generations(body: GenerationRequest):
            return JSONResponse(await self.generate(body), headers=answer_headers(body))

        @app.get("/healthz")
        async def healthz():
            return {"status": "ok"}

        @app.get("/readyz")
        async def readyz():
            return ready_body(self.pipe)  # Ray routes to a replica only once it is built: loaded and warmed

        return app

    async def generate(self, body: GenerationRequest) -> dict:
        """One request: checked (400, 413), batched, answered (200, 500, 504)."""
        arrived = time.monotonic()
        request = check_request(self.pipe, body, self.pipe.max_batch, self.config.max_prompt_chars)
        pending = Pending(request)
        try:
            outcome = await asyncio.wait_for(self.generate_batch(pending), self.config.timeout_s)
        except asyncio.TimeoutError:
            raise timeout_error(self.config.timeout_s, was_queued=pending.started is None) from None
        finally:
            pending.abandoned = True  # answered, timed out or cancelled: a later engine batch skips it
        if isinstance(outcome, Exception):
            raise failure_error(outcome)
        return answer(request, outcome, {"queue": pending.started - arrived, "request": time.monotonic() - arrived})

    # the sizes are the bundle's and the config's, set in __init__; batch_size_fn counts images
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, batch_size_fn=_images)
    async def generate_batch(self, pending: list[Pending]) -> list:
        """The gathered requests as engine batches (`split_batches`), one after another in the engine
        thread; each request gets its `Images`, or the exception its engine batch raised."""
        outcomes: list = [None] * len(pending)
        loop = asyncio.get_running_loop()
        for indices in split_batches([item.request for item in pending], self.pipe.max_batch):
            indices = [index for index in indices if not pending[index].abandoned]
            if not indices:
                continue
            started = time.monotonic()
            for index in indices:
                pending[index].started = started
            requests = [pending[index].request for index in indices]
            try:
                results = await loop.run_in_executor(self._executor, engine.run_batch, self.pipe, requests)
            except Exception as error:  # noqa: BLE001 - this engine batch's requests answer 500; the rest go on
                results = [error] * len(indices)
            for index, result in zip(indices, results):
                outcomes[index] = result
        return outcomes

    def __del__(self):
        executor = getattr(self, "_executor", None)  # absent when the constructor failed
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            pipe.close()


def build_app(args: dict) -> serve.Application:
    """The Ray Serve application: `serve run imagen.runtime.serve.ray:build_app key=value ...`, or the
    `import_path` of a Serve config file with `args:`. ArgumentError names a bad argument."""
    config, deployment = parse_args(args)
    return ImagenDeployment.options(**deployment.options(config)).bind(config)
