"""`create_app(pipe, config)`: the FastAPI app of imagen-serve (docs/serving.md has the API and error table).

    POST /v1/images/generations   OpenAI's images API (b64_json) plus seed, steps, sampler, guidance_scale,
                                  eta, sr_strength; per-image info in data[i]["imagen"]
    GET  /healthz                 the process answers
    GET  /readyz                  the bundle is loaded and warmed, and the server is not draining
    GET  /metrics                 Prometheus text

A request is checked and tokenized on the event loop, queued in the `Batcher` and answered when its
batch is done; the engines run in the batcher's worker thread. Waiting for the batch, the handler
also watches its connection and its time limit: a request whose client goes away (or whose time
runs out) before its batch starts is taken out of the queue.
"""

import asyncio
import base64
import contextlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from imagen.runtime.errors import ImagenError, NonFiniteError, ParameterError, PromptError

from . import engine
from .batching import Batcher, Closing, QueueFull
from .metrics import Metrics
from .schema import GENERATIONS, GenerationRequest, ServeError, error_response, validation_error

log = logging.getLogger("imagen.serve")


@dataclass(frozen=True)
class ServeConfig:
    """How the server batches and what it accepts. `max_queue_images` None: 4 full batches."""

    max_wait_ms: float = 10.0
    max_queue_images: int | None = None
    timeout_s: float = 120.0
    max_prompt_chars: int = 4000
    max_body_bytes: int = 64 * 1024
    api_key: str | None = None
    warmup: bool = True


class Service:
    """The state behind the routes: the pipeline, the batcher, readiness and the metrics."""

    def __init__(self, pipe, config: ServeConfig):
        self.pipe, self.config = pipe, config
        self.size = pipe.bundle.manifest.image_sizes[-1]
        queue_images = config.max_queue_images or 4 * pipe.max_batch
        self.max_images = min(pipe.max_batch, queue_images)  # images one request may ask for
        self.batcher = Batcher(
            lambda requests: engine.run_batch(pipe, requests),
            max_batch=pipe.max_batch,
            max_wait_s=config.max_wait_ms / 1000,
            max_queue_images=queue_images,
            on_batch=self._on_batch,
        )
        self.metrics = Metrics(self.batcher, pipe.max_batch)
        self.ready = threading.Event()  # set once warmed; tests and the CLI may wait on it
        self.draining = False
        self.failure: str | None = None
        self._warmup: asyncio.Task | None = None

    def _on_batch(self, jobs, seconds: float) -> None:
        self.metrics.observe_batch(jobs, seconds)

    def unavailable(self) -> str | None:
        """Why the server takes no generation requests now, or None."""
        if self.draining:
            return "draining: the server is shutting down"
        if self.failure is not None:
            return f"warm-up failed: {self.failure}"
        if not self.ready.is_set():
            return "warming up: the first request has not finished yet"
        return None

    async def startup(self) -> None:
        self.batcher.start()
        if self.config.warmup:
            self._warmup = asyncio.get_running_loop().create_task(self._warm())
        else:
            self._set_ready()

    async def _warm(self) -> None:
        """One short request through the batcher: 1 step per Unet on a full batch (it goes without waiting
        out the window, and the sessions allocate the memory of the largest batch)."""
        try:
            request = engine.prepare(self.pipe, "warm-up", self.max_images, seed=0, steps=1)
            await self.batcher.submit(request.key, request.n, request).future
        except Exception as error:  # noqa: BLE001 - reported by /readyz, which then never says ready
            self.failure = f"{type(error).__name__}: {error}"
            log.exception("warm-up failed")
            return
        self._set_ready()

    def _set_ready(self) -> None:
        self.ready.set()
        self.metrics.ready.set(0 if self.draining else 1)

    def begin_drain(self) -> None:
        """Stops taking requests (503). Only sets flags, so a signal handler may call it."""
        self.draining = True
        self.metrics.ready.set(0)

    async def shutdown(self) -> None:
        self.begin_drain()
        if self._warmup is not None:
            self._warmup.cancel()
        await self.batcher.close(timeout=self.config.timeout_s)

    async def generate(self, body: GenerationRequest, request: Request) -> dict:
        arrived = time.monotonic()
        reason = self.unavailable()
        if reason is not None:
            code = "draining" if self.draining else "not_ready"
            raise ServeError(
                503,
                f"the server is {reason}; retry shortly",
                "server_unavailable",
                code=code,
                headers={} if self.draining else {"Retry-After": "1"},
            )
        image_request = self.check(body)
        try:
            job = self.batcher.submit(image_request.key, image_request.n, image_request)
        except QueueFull as error:
            raise ServeError(
                429, str(error), "rate_limit_error", code="queue_full", headers={"Retry-After": str(error.retry_after)}
            ) from None
        except Closing as error:
            raise ServeError(503, str(error), "server_unavailable", code="draining") from None
        self.metrics.in_flight.inc()
        try:
            images = await self._wait(job, request, arrived)
        finally:
            self.metrics.in_flight.dec()
        return self._answer(image_request, images, job, arrived)

    def check(self, body: GenerationRequest) -> "engine.ImageRequest":
        """The request checked against the server and the bundle: ServeError 400 or 413."""
        expected = f"{self.size}x{self.size}"
        if body.response_format != "b64_json":
            raise ServeError(
                400,
                f"response_format {body.response_format!r} is not supported: this server keeps "
                'no files to link to; use "b64_json"',
                param="response_format",
                code="unsupported_response_format",
            )
        if body.size is not None and body.size != expected:
            raise ServeError(
                400,
                f"size must be {expected!r} (the bundle's output size), got {body.size!r}; omit it or send that",
                param="size",
                code="unsupported_size",
            )
        if body.n < 1:
            raise ServeError(400, f"n must be at least 1, got {body.n}", param="n", code="invalid_parameter")
        if body.n > self.max_images:
            raise ServeError(
                413,
                f"n={body.n} images is more than one request may ask for here (at most "
                f"{self.max_images}, the bundle's max batch); send several requests",
                param="n",
                code="too_many_images",
            )
        if len(body.prompt) > self.config.max_prompt_chars:
            raise ServeError(
                400,
                f"the prompt is {len(body.prompt)} characters; at most "
                f"{self.config.max_prompt_chars} are accepted, shorten it",
                param="prompt",
                code="prompt_too_long",
            )
        try:
            return engine.prepare(self.pipe, body.prompt, body.n, **body.settings())
        except ParameterError as error:
            raise ServeError(400, str(error), param=error.parameter, code="invalid_parameter") from None
        except PromptError as error:
            # the runtime numbers prompts in a list; this API takes one
            message = str(error).replace("prompt 0", "the prompt", 1)
            raise ServeError(400, message, param="prompt", code="invalid_prompt") from None

    async def _wait(self, job, request: Request, arrived: float):
        """The job's result, or ServeError 504 (time limit) or 499 (client gone)."""
        timeout, was_queued = self.config.timeout_s, False
        watcher = asyncio.ensure_future(_client_gone(request))
        try:
            remaining = max(0.0, timeout - (time.monotonic() - arrived))
            done, _ = await asyncio.wait({job.future, watcher}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not job.future.done():  # time ran out, the client left, or this task was cancelled
                was_queued = self.batcher.drop(job)
                if was_queued:
                    self.metrics.dropped.inc()
        if job.future.done() and not job.future.cancelled():
            return _result(job.future)
        if watcher in done:
            raise ServeError(499, "the client closed the connection", code="client_closed")
        where = "in the queue" if was_queued else "in its batch"
        raise ServeError(
            504,
            f"the request did not finish within {timeout:g} s (it was still {where}); retry "
            "later, or ask for fewer images or steps",
            "timeout_error",
            code="timeout",
        )

    def _answer(self, image_request, images, job, arrived: float) -> dict:
        data = []
        total = time.monotonic() - arrived
        for png, info in zip(images.pngs, images.info, strict=True):
            info["timings"].update(queue=job.started - job.enqueued, request=total)
            item = {"b64_json": base64.b64encode(png).decode("ascii")}
            if image_request.revised_prompt is not None:
                item["revised_prompt"] = image_request.revised_prompt
            item["imagen"] = info
            data.append(item)
        self.metrics.images.inc(len(data))
        self.metrics.latency.observe(total)
        return {"created": int(time.time()), "data": data}


def _result(future):
    try:
        return future.result()
    except NonFiniteError as error:
        raise ServeError(500, str(error), "server_error", code="non_finite") from None
    except ImagenError as error:
        raise ServeError(500, f"the engine failed: {error}", "server_error", code="engine_error") from None
    except Exception:
        log.exception("a batch failed")
        raise ServeError(
            500, "the engine failed unexpectedly; the server log has the details", "server_error", code="engine_error"
        ) from None


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Guard:
    """ASGI middleware for /v1/: the API key (401), the body size (411, 413), and requests counted by status."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        status = 500  # unless a response starts

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self.refusal(dict(scope["headers"]), scope["method"])
            app = self.app if refusal is None else refusal.response()
            await app(scope, receive, send_status)
        finally:
            if scope["path"] == GENERATIONS:
                self.service.metrics.requests.labels(str(status)).inc()

    def refusal(self, headers: dict, method: str) -> ServeError | None:
        key = self.service.config.api_key
        if key:
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return ServeError(
                    401,
                    "a valid API key is required: send the header 'Authorization: Bearer <key>' "
                    "with the key set in IMAGEN_API_KEY on the server",
                    "authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if method != "POST":
            return None
        limit = self.service.config.max_body_bytes
        length = headers.get(b"content-length")
        if length is None:
            return ServeError(
                411,
                "send the body with a Content-Length header (chunked bodies are not accepted)",
                code="length_required",
            )
        if not length.isdigit() or int(length) > limit:
            return ServeError(
                413,
                f"the body is {length.decode('latin-1')} bytes; at most {limit} are accepted",
                code="body_too_large",
            )
        return None


def create_app(pipe, config: ServeConfig | None = None) -> FastAPI:
    """The app over a loaded `Pipeline`; its `Service` is `app.state.service`."""
    service = Service(pipe, config or ServeConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.startup()
        try:
            yield
        finally:
            await service.shutdown()

    app = FastAPI(title="imagen-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_middleware(Guard, service=service)
    app.add_exception_handler(ServeError, lambda request, error: error.response())
    app.add_exception_handler(
        RequestValidationError, lambda request, error: validation_error(error.errors()).response()
    )
    app.add_exception_handler(HTTPException, _http_error)

    @app.post(GENERATIONS)
    async def generations(body: GenerationRequest, request: Request):
        return JSONResponse(await service.generate(body, request))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        reason = service.unavailable()
        if reason is not None:
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        return {
            "ready": True,
            "bundle_sha": pipe.bundle.short_sha,
            "size": f"{service.size}x{service.size}",
            "max_batch": pipe.max_batch,
            "backend": pipe.backend_name,
        }

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _http_error(request, error: HTTPException):
    message = {
        404: f"no route {request.url.path}; see docs/serving.md",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(error.status_code, str(error.detail))
    return error_response(error.status_code, message, code=None, headers=getattr(error, "headers", None))
