"""The HTTP API that imagen-serve (`app`) and the Ray Serve app (`ray`) both answer, in one place.

`check_request` checks a body against the server and the bundle (400, 413) and tokenizes it;
`answer` makes the 200 body from a request's images and `answer_headers` its headers (the fields
that have no meaning here, `x-imagen-ignored`); `failure_error` and `timeout_error` are the
500 and 504 answers; `Guard` is the ASGI middleware for the API key and the body limits (401, 411,
413); `add_error_handlers` makes every error, FastAPI's own included (422, 404, 405), the JSON error
body; `ready_body` is what /readyz answers once the server is ready. How requests wait for their
batch differs between the two servers; what a client sees does not.
"""

import base64
import hmac
import json
import logging
import time
from collections.abc import Callable

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from imagen.runtime.errors import ImagenError, NonFiniteError, ParameterError, PromptError

from . import engine
from .schema import GENERATIONS, IGNORED_HEADER, GenerationRequest, ServeError, error_response, validation_error

log = logging.getLogger("imagen.serve")


# OpenAI's fields that this server honours for some values only: name, those values, why not others
UNSUPPORTED = (
    ("response_format", ("b64_json",), "this server keeps no files to link to"),
    ("output_format", ("png",), "this server answers PNG images"),
    ("background", ("auto", "opaque"), "the images are opaque RGB, without an alpha channel"),
    ("stream", (False,), "the answer comes in one piece"),
    ("partial_images", (0,), "partial images come only with streaming, which this server does not do"),
)


def output_size(pipe) -> int:
    """The side of the bundle's images (its last Unet's size)."""
    return pipe.bundle.manifest.image_sizes[-1]


def check_request(pipe, body: GenerationRequest, max_images: int, max_prompt_chars: int) -> "engine.ImageRequest":
    """The request checked against the server and the bundle, tokenized: ServeError 400 or 413."""
    size = output_size(pipe)
    expected = f"{size}x{size}"
    if body.size not in (None, "auto", expected):
        raise ServeError(
            400,
            f"size must be {expected!r} (the bundle's output size), got {body.size!r}; omit it or send that",
            param="size",
            code="unsupported_size",
        )
    for name, allowed, why in UNSUPPORTED:
        given = getattr(body, name)
        if given is not None and given not in allowed:
            fix = " or ".join(json.dumps(value) for value in allowed)
            raise ServeError(
                400,
                f"{name} {json.dumps(given)} is not supported: {why}; omit it or send {fix}",
                param=name,
                code=f"unsupported_{name}",
            )
    if body.n < 1:
        raise ServeError(400, f"n must be at least 1, got {body.n}", param="n", code="invalid_parameter")
    if body.n > max_images:
        raise ServeError(
            413,
            f"n={body.n} images is more than one request may ask for here (at most "
            f"{max_images}, the bundle's max batch); send several requests",
            param="n",
            code="too_many_images",
        )
    for name, text in (("prompt", body.prompt), ("negative_prompt", body.negative_prompt)):
        if text is not None and len(text) > max_prompt_chars:
            raise ServeError(
                400,
                f"the {name.replace('_', ' ')} is {len(text)} characters; at most {max_prompt_chars} are "
                "accepted, shorten it",
                param=name,
                code="prompt_too_long",
            )
    try:
        return engine.prepare(pipe, body.prompt, body.n, negative_prompt=body.negative_prompt, **body.settings())
    except ParameterError as error:
        raise ServeError(400, str(error), param=error.parameter, code="invalid_parameter") from None
    except PromptError as error:
        # the runtime numbers prompts in a list; this API takes one
        message = str(error).replace("prompt 0", "the prompt", 1)
        raise ServeError(400, message, param="prompt", code="invalid_prompt") from None


def answer(image_request: "engine.ImageRequest", images: "engine.Images", timings: dict) -> dict:
    """The 200 body: one item per image, its PNG in base64 and its info with `timings` added."""
    data = []
    for png, info in zip(images.pngs, images.info, strict=True):
        info["timings"].update(timings)
        item = {"b64_json": base64.b64encode(png).decode("ascii")}
        if image_request.revised_prompt is not None:
            item["revised_prompt"] = image_request.revised_prompt
        item["imagen"] = info
        data.append(item)
    return {"created": int(time.time()), "data": data}


def answer_headers(body: GenerationRequest) -> dict:
    """The 200's headers: `x-imagen-ignored` names the given fields that have no meaning here."""
    ignored = body.ignored()
    return {IGNORED_HEADER: ",".join(ignored)} if ignored else {}


def failure_error(error: Exception) -> ServeError:
    """The 500 for a batch that failed; the server goes on."""
    if isinstance(error, NonFiniteError):
        return ServeError(500, str(error), "server_error", code="non_finite")
    if isinstance(error, ImagenError):
        return ServeError(500, f"the engine failed: {error}", "server_error", code="engine_error")
    log.error("a batch failed", exc_info=error)
    return ServeError(
        500, "the engine failed unexpectedly; the server log has the details", "server_error", code="engine_error"
    )


def timeout_error(timeout_s: float, was_queued: bool) -> ServeError:
    """The 504 for a request that did not finish in time, saying where it was."""
    where = "in the queue" if was_queued else "in its batch"
    return ServeError(
        504,
        f"the request did not finish within {timeout_s:g} s (it was still {where}); retry "
        "later, or ask for fewer images or steps",
        "timeout_error",
        code="timeout",
    )


def ready_body(pipe) -> dict:
    """What /readyz answers (200) once the bundle is loaded and warmed: the bundle, the engine, the
    Unets' precision, why they were chosen (`engine`, one line) and bf16's quality gate where it was
    measured (`quality_gate`: threshold, each Unet's relative error, the Unets it applies to, passed;
    else null)."""
    size, choice = output_size(pipe), getattr(pipe, "choice", None)
    return {
        "ready": True,
        "bundle_sha": pipe.bundle.short_sha,
        "size": f"{size}x{size}",
        "max_batch": pipe.max_batch,
        "backend": pipe.backend_name,
        "precision": pipe.precision,
        "engine": None if choice is None else choice.reason,
        "quality_gate": None if choice is None else choice.gate,
    }


class Guard:
    """ASGI middleware for /v1/: the API key (401) and the body size (411, 413). `on_status(status)`,
    when given, is called with the status of every answer to POST /v1/images/generations."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, on_status: Callable[[int], None] | None = None):
        self.app, self.api_key, self.max_body_bytes, self.on_status = app, api_key, max_body_bytes, on_status

    async def __call__(self, scope, receive, send):
        route = _route(scope) if scope["type"] == "http" else ""
        if not route.startswith("/v1/"):
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
            if route == GENERATIONS and self.on_status is not None:
                self.on_status(status)

    def refusal(self, headers: dict, method: str) -> ServeError | None:
        if self.api_key:
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
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
        length = headers.get(b"content-length")
        if length is None:
            return ServeError(
                411,
                "send the body with a Content-Length header (chunked bodies are not accepted)",
                code="length_required",
            )
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return ServeError(
                413,
                f"the body is {length.decode('latin-1')} bytes; at most {self.max_body_bytes} are accepted",
                code="body_too_large",
            )
        return None


def _route(scope) -> str:
    """The path below the app's mount point (`root_path`: a proxy's or Ray Serve's route prefix)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def add_error_handlers(app) -> None:
    """Every error a FastAPI `app` answers becomes `{"error": {...}}`: ours, schema violations (422), 404, 405."""
    app.add_exception_handler(ServeError, lambda request, error: error.response())
    app.add_exception_handler(
        RequestValidationError, lambda request, error: validation_error(error.errors()).response()
    )
    app.add_exception_handler(HTTPException, _http_error)


def _http_error(request, error: HTTPException):
    message = {
        404: f"no route {request.url.path}; see docs/serving.md",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(error.status_code, str(error.detail))
    return error_response(error.status_code, message, code=None, headers=getattr(error, "headers", None))
