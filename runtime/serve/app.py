"""`create_app(pipe, config)`: the FastAPI app of imagen-serve (docs/serving.md has the API and error table).

    POST /v1/images/generations   OpenAI's images API (b64_json PNGs; its fields with no meaning here are
                                  named in x-imagen-ignored) plus seed, steps, sampler, guidance_scale,
                                  eta, sr_strength, negative_prompt; per-image info in data[i]["imagen"]
    GET  /healthz                 the process answers
    GET  /readyz                  the bundle is loaded and warmed, and the server is not draining
    GET  /metrics                 Prometheus text

A request is checked and tokenized on the event loop, queued in the `Batcher` and answered when its
batch is done; the engines run in the batcher's worker thread. Waiting for the batch, the handler
also watches its connection and its time limit: a request whose client goes away (or whose time
runs out) before its batch starts is taken out of the queue. What a client sees (checks, answers,
errors, the API key and body limits) is in `api`, which the Ray Serve app shares.
"""

import asyncio
import contextlib
import logging
import threading
import time

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from . import engine
from .api import (
    Guard,
    add_error_handlers,
    answer,
    answer_headers,
    check_request,
    failure_error,
    output_size,
    ready_body,
    timeout_error,
)
from .batching import Batcher, Closing, QueueFull
from .config import ServeConfig
from .metrics import Metrics
from .schema import GENERATIONS, GenerationRequest, ServeError

log = logging.getLogger("imagen.serve")


class Service:
    """The state behind the routes: the pipeline, the batcher, readiness and the metrics."""

    def __init__(self, pipe, config: ServeConfig):
        self.pipe, self.config = pipe, config
        self.size = output_size(pipe)
        queue_images = config.queue_images(pipe.max_batch)
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
        out the window, and the sessions allocate the memory of the largest batch); a stage whose steps
        are fixed takes them all (`Pipeline.warmup_steps`)."""
        try:
            request = engine.prepare(self.pipe, "warm-up", self.max_images, seed=0, steps=self.pipe.warmup_steps)
            await self.batcher.submit(request.key, request.images, request).future
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
            job = self.batcher.submit(image_request.key, image_request.images, image_request)
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
        return check_request(self.pipe, body, self.max_images, self.config.max_prompt_chars)

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
        raise timeout_error(timeout, was_queued)

    def _answer(self, image_request, images, job, arrived: float) -> dict:
        total = time.monotonic() - arrived
        body = answer(image_request, images, {"queue": job.started - job.enqueued, "request": total})
        self.metrics.images.inc(len(body["data"]))
        self.metrics.latency.observe(total)
        return body


def _result(future):
    try:
        return future.result()
    except Exception as error:
        raise failure_error(error) from None


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
    app.add_middleware(
        Guard,
        api_key=service.config.api_key,
        max_body_bytes=service.config.max_body_bytes,
        on_status=lambda status: service.metrics.requests.labels(str(status)).inc(),
    )
    add_error_handlers(app)

    @app.post(GENERATIONS)
    async def generations(body: GenerationRequest, request: Request):
        return JSONResponse(await service.generate(body, request), headers=answer_headers(body))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        reason = service.unavailable()
        if reason is not None:
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        return ready_body(pipe)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
