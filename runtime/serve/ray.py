"""imagen-serve's HTTP API as a Ray Serve application: many replicas, on many machines (docs/serving.md).

    serve run imagen.runtime.serve.ray:build_app bundle=/path/to/bundle num_replicas=2
    serve deploy recipes/serve/ray-serve.yaml          # a running Ray cluster, or KubeRay's RayService

Each replica loads the bundle once (`Pipeline.load`), warms it with one full batch, and answers
the same routes as imagen-serve with the same checks, answers and errors (`api`). Concurrent
requests are gathered by `@serve.batch` up to the bundle's max batch in images; within a gathered
batch, requests with other settings (`ImageRequest.key`) run as separate engine batches
(`split_batch`), one at a time in the replica's engine thread, each through `engine.run_batch`, so
every request keeps its own seed and noise. Ray does the rest: routing between replicas,
autoscaling, backpressure (429 with `Retry-After` beyond `max_queued_requests`) and the graceful
shutdown of a replica (it takes no new requests and finishes those it holds).

Ray is imported here only; `imagen.runtime` and `imagen.runtime.serve` never import this module.
"""

import asyncio
import dataclasses
import json
import math
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

from imagen.runtime.backends import BACKENDS, PROVIDER_SETS

from . import engine
from .api import Guard, ServeConfig, add_error_handlers, answer, check_request, failure_error, ready_body, timeout_error
from .cli import API_KEY_VARIABLE
from .schema import GENERATIONS, GenerationRequest

REPLICA_HEADER = "x-imagen-replica"  # names the replica that answered


class ArgumentError(ValueError):
    """An argument of `build_app` that cannot be used: names it, what is wrong and the fix."""

    def __init__(self, name: str, problem: str):
        self.name = name
        super().__init__(f"{name}: {problem}")


@dataclasses.dataclass(frozen=True)
class AppArgs:
    """What `build_app` takes: `serve run ... key=value` (strings) or the `args:` of a Serve config file."""

    bundle: str | None = None  # the demo bundle when None
    backend: str = "auto"
    providers: str = "cpu"  # ONNX Runtime's execution providers (imagen-serve's --providers); cuda on GPU replicas
    threads: int | None = None  # engine threads per replica; None: num_cpus, at least 1
    num_replicas: int | str | None = None  # None: 1, or autoscaling_config's
    autoscaling_config: dict | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 16  # per replica: what @serve.batch can gather
    max_queued_requests: int = 64  # waiting for a replica; beyond it, 429 (-1: no limit)
    max_wait_ms: float = 10.0
    timeout_s: float = 120.0
    max_prompt_chars: int = 4000

    @classmethod
    def from_args(cls, args: dict) -> "AppArgs":
        """Checked and typed arguments: ArgumentError names the first bad one."""
        known = [field.name for field in dataclasses.fields(cls)]
        for name in args:
            if name not in known:
                raise ArgumentError(name, f"is not an argument of this app; the known ones are {', '.join(known)}")
        values = {name: _PARSERS[name](name, value) for name, value in args.items()}
        if values.get("autoscaling_config") is not None and values.get("num_replicas") not in (None, "auto"):
            raise ArgumentError(
                "num_replicas", "give either num_replicas or autoscaling_config, not both (or num_replicas=auto)"
            )
        return cls(**values)

    def deployment_options(self) -> dict:
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
            "graceful_shutdown_timeout_s": self.timeout_s + 5,
        }

    def serve_config(self) -> ServeConfig:
        return ServeConfig(
            max_wait_ms=self.max_wait_ms, timeout_s=self.timeout_s, max_prompt_chars=self.max_prompt_chars
        )


def _integer(minimum: int, *, auto: bool = False, none: bool = False, unlimited: bool = False):
    """A parser of a whole number >= `minimum`; also "auto", None or -1 (no limit) where allowed."""

    def parse(name, value):
        if none and value in (None, "none"):
            return None
        if auto and value == "auto":
            return "auto"
        if isinstance(value, str) and value.strip().removeprefix("-").isdigit():
            value = int(value)
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not whole or not (value >= minimum or (unlimited and value == -1)):
            others = " or 'auto'" if auto else " or -1 (no limit)" if unlimited else ""
            raise ArgumentError(name, f"must be a whole number >= {minimum}{others}, got {value!r}; e.g. {name}=2")
        return value

    return parse


def _number(minimum: float, *, above: bool = False):
    """A parser of a number >= `minimum` (> with `above`)."""

    def parse(name, value):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        if bad or value < minimum or (above and value == minimum):
            relation = ">" if above else ">="
            raise ArgumentError(name, f"must be a number {relation} {minimum:g}, got {value!r}; e.g. {name}=1")
        return float(value)

    return parse


def _bundle(name, value):
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ArgumentError(name, f"must be a path to a bundle folder, got {value!r}; or leave it out for the demo")
    return value


def _backend(name, value):
    if value not in BACKENDS:
        raise ArgumentError(name, f"must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def _providers(name, value):
    if value not in PROVIDER_SETS:
        raise ArgumentError(name, f"must be one of {', '.join(PROVIDER_SETS)}, got {value!r}")
    return value


def _autoscaling(name, value):
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


_PARSERS = {
    "bundle": _bundle,
    "backend": _backend,
    "providers": _providers,
    "threads": _integer(1, none=True),
    "num_replicas": _integer(1, auto=True),
    "autoscaling_config": _autoscaling,
    "num_cpus": _number(0),
    "num_gpus": _number(0),
    "max_ongoing_requests": _integer(1),
    "max_queued_requests": _integer(1, unlimited=True),
    "max_wait_ms": _number(0),
    "timeout_s": _number(0, above=True),
    "max_prompt_chars": _integer(1),
}


def split_batch(requests: list, max_batch: int) -> list[list[int]]:
    """Indices of `requests` in engine batches: requests with equal `key` together, in arrival order,
    and at most `max_batch` images (the sum of `n`) in each."""
    groups: dict = {}
    for index, request in enumerate(requests):
        batches = groups.setdefault(request.key, [[]])
        images = sum(requests[other].n for other in batches[-1])
        if batches[-1] and images + request.n > max_batch:
            batches.append([])
        batches[-1].append(index)
    return [batch for batches in groups.values() for batch in batches]


@dataclasses.dataclass(eq=False)
class Pending:
    """One request waiting in `@serve.batch`: `started` once its engine batch starts; `abandoned` once
    its handler left (time limit, client gone), so that a later engine batch skips it."""

    request: engine.ImageRequest
    started: float | None = None
    abandoned: bool = False


def _images(pending: list[Pending]) -> int:
    return sum(item.request.n for item in pending)


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

    def __init__(self, bundle: str | None, backend: str, providers: str, threads: int, config: ServeConfig):
        from imagen.runtime import Pipeline

        self.config = dataclasses.replace(config, api_key=os.environ.get(API_KEY_VARIABLE) or None)
        self.pipe = Pipeline.load(bundle, backend=backend, providers=PROVIDER_SETS[providers], threads=threads)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagen-engine")
        self.generate_batch.set_max_batch_size(self.pipe.max_batch)
        self.generate_batch.set_batch_wait_timeout_s(config.max_wait_ms / 1000)
        # the warm-up: a full batch at 1 step per Unet, so the sessions allocate the largest batch's memory
        engine.run_batch(self.pipe, [engine.prepare(self.pipe, "warm-up", self.pipe.max_batch, seed=0, steps=1)])

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="imagen-serve (Ray Serve)", docs_url=None, redoc_url=None)
        app.add_middleware(Guard, api_key=self.config.api_key, max_body_bytes=self.config.max_body_bytes)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        add_error_handlers(app)

        @app.post(GENERATIONS)
        async def generations(body: GenerationRequest):
            return JSONResponse(await self.generate(body))

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
        """The gathered requests as engine batches (`split_batch`), one after another in the engine
        thread; each request gets its `Images`, or the exception its engine batch raised."""
        outcomes: list = [None] * len(pending)
        loop = asyncio.get_running_loop()
        for indices in split_batch([item.request for item in pending], self.pipe.max_batch):
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


def build_app(args: dict) -> serve.Application:
    """The Ray Serve application: `serve run imagen.runtime.serve.ray:build_app key=value ...`, or the
    `import_path` of a Serve config file with `args:`. ArgumentError names a bad argument."""
    options = AppArgs.from_args(dict(args or {}))
    threads = options.threads or max(1, int(options.num_cpus))
    deployment = ImagenDeployment.options(**options.deployment_options())
    return deployment.bind(options.bundle, options.backend, options.providers, threads, options.serve_config())
