"""imagen-serve: an HTTP service that batches concurrent requests into engine batches (docs/serving.md).

    imagen-serve --bundle bundle/ --port 8000          # or: python -m imagen.runtime.serve.cli
    curl -s localhost:8000/v1/images/generations -d '{"prompt": "a red circle", "size": "64x64"}'

Modules: `config` (`ServeConfig`, the options of both servers, declared once; no web imports),
`batching` (the grouping rule, the request queue and batcher: asyncio and a worker thread, no web
imports), `engine` (one engine batch from many requests: `Pipeline.generate`), `schema` (the
request body and the error bodies), `api` (what a client sees: checks, answers, errors, limits),
`metrics` (Prometheus), `app` (`create_app`: FastAPI routes), `cli` (uvicorn) and `ray` (the same
API as a Ray Serve application, `build_app`). The web stack (FastAPI, uvicorn, prometheus-client:
the `serve` extra) is imported here only, and only by `api`, `app`, `schema`, `metrics`, `cli` and
`ray`; Ray (the `ray` extra) only by `ray`. The rest of `imagen.runtime` never imports this package.
"""

__all__ = ["create_app", "ServeConfig"]


def __getattr__(name):
    # lazy, so that `imagen.runtime.serve.batching`, `.config` and `.engine` import without the web stack
    if name == "ServeConfig":
        from .config import ServeConfig

        return ServeConfig
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
