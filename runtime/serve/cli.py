"""imagen-serve: the HTTP service over a bundle (docs/serving.md).

imagen-serve --bundle bundle/ --port 8000            # the demo bundle without --bundle
IMAGEN_API_KEY=secret imagen-serve --host 0.0.0.0    # clients send 'Authorization: Bearer secret'

SIGTERM (or Ctrl-C) stops taking requests (503), finishes the ones in flight, then exits: status 0
after SIGTERM, 130 after Ctrl-C. A bundle that does not load, or a port that is taken, exits 2.
"""

import ipaddress
import logging
import os
import signal
import socket

import click

from imagen._cli import command, run_command
from imagen.runtime.backends import BACKENDS, PROVIDER_SETS
from imagen.runtime.cli import providers_option

PREFIX = "imagen-serve: "
API_KEY_VARIABLE = "IMAGEN_API_KEY"


@command("imagen-serve", PREFIX)
@click.option("--bundle", type=click.Path(), default=None, help="Bundle folder (default: the built-in demo).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free one).")
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(0, 10_000),
    default=10.0,
    show_default=True,
    help="How long the oldest queued request waits for others to share its batch.",
)
@click.option(
    "--max-queue-images",
    type=click.IntRange(1),
    default=None,
    help="Images the queue holds before it answers 429 (default: 4 full batches).",
)
@click.option(
    "--timeout-s",
    type=click.FloatRange(0.1),
    default=120.0,
    show_default=True,
    help="Time limit of one request, queue included (504 after it).",
)
@click.option(
    "--max-prompt-chars",
    type=click.IntRange(1),
    default=4000,
    show_default=True,
    help="Longest prompt accepted (400 beyond).",
)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@providers_option
@click.option(
    "--threads", type=int, default=None, help="CPU threads per session (default: the CPUs this process may run on)."
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(debug, **options):
    """Serve POST /v1/images/generations (OpenAI's images API) over a bundle, batching concurrent requests."""
    run_command(lambda: serve(**options), debug=debug, prefix=PREFIX)


def serve(
    bundle,
    host,
    port,
    max_wait_ms,
    max_queue_images,
    timeout_s,
    max_prompt_chars,
    backend,
    providers,
    threads,
    log_level,
):
    try:
        import uvicorn

        from .app import ServeConfig, create_app
    except ImportError as error:
        raise click.ClickException(
            f"{error.name} is not installed; install the server with pip install 'imagen-cascade[serve]'"
        ) from None
    from imagen.runtime import Pipeline

    api_key = os.environ.get(API_KEY_VARIABLE) or None
    if not api_key and not _is_loopback(host):
        click.echo(
            f"{PREFIX}warning: listening on {host} without {API_KEY_VARIABLE}: anyone who can reach "
            "this address can use the server",
            err=True,
        )
    pipe = Pipeline.load(bundle, backend=backend, providers=PROVIDER_SETS[providers], threads=threads)
    config = ServeConfig(
        max_wait_ms=max_wait_ms,
        max_queue_images=max_queue_images,
        timeout_s=timeout_s,
        max_prompt_chars=max_prompt_chars,
        api_key=api_key,
    )
    app = create_app(pipe, config)
    listener = _listen(host, port)
    logging.getLogger("imagen.serve").setLevel(log_level.upper())
    server = _draining_server(
        uvicorn,
        uvicorn.Config(
            app,
            log_level=log_level,
            timeout_graceful_shutdown=int(timeout_s) + 5,
            server_header=False,
            limit_concurrency=max(64, 4 * (max_queue_images or 4 * pipe.max_batch)),
        ),
        app.state.service,
    )
    bound_host, bound_port = listener.getsockname()[:2]
    click.echo(
        f"{PREFIX}serving bundle {pipe.bundle.short_sha} ({pipe.backend_name}) on "
        f"http://{_url_host(bound_host)}:{bound_port}",
        err=True,
    )
    # uvicorn re-raises SIGTERM once it has shut down; a handler of ours makes that a clean exit (status 0)
    signal.signal(signal.SIGTERM, lambda number, frame: None)
    server.run(sockets=[listener])
    if not server.started:
        raise click.ClickException("the server did not start (see the log above)")


def _draining_server(uvicorn, config, service):
    class DrainingServer(uvicorn.Server):
        """uvicorn's Server that tells the service to drain as soon as a shutdown signal arrives."""

        def handle_exit(self, sig, frame):
            service.begin_drain()
            super().handle_exit(sig, frame)

    return DrainingServer(config)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (OSError, a user error, when it is taken or not an address here)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise OSError(
            f"cannot listen on {host}:{port}: {error.strerror or error}; pick another --host or --port"
        ) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    main()
