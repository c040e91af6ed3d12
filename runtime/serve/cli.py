"""imagen-serve: the HTTP service over a bundle (docs/serving.md).

imagen-serve --bundle bundle/ --port 8000            # the demo bundle without --bundle
IMAGEN_API_KEY=secret imagen-serve --host 0.0.0.0    # clients send 'Authorization: Bearer secret'

The options come from `ServeConfig`'s fields (serve/config.py), as the Ray app's arguments do.
SIGTERM (or Ctrl-C) stops taking requests (503), finishes the ones in flight, then exits: status 0
after SIGTERM, 130 after Ctrl-C. A bundle that does not load, or a port that is taken, exits 2.
"""

import dataclasses
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Callable

import click

from imagen._cli import command, run_command
from imagen.runtime.backends import PROVIDER_SETS

from .config import API_KEY_VARIABLE, CLI, Option, ServeConfig, option_fields

PREFIX = "imagen-serve: "


def click_option(field: dataclasses.Field) -> Callable:
    """The click option of one ServeConfig field (`--max-wait-ms` for max_wait_ms), from its `Option`."""
    spec: Option = field.metadata["option"]
    if spec.choices:
        kind = click.Choice(list(spec.choices))
    elif spec.kind is int:
        kind = click.IntRange(spec.minimum, spec.maximum)
    elif spec.kind is float:
        kind = click.FloatRange(spec.minimum, spec.maximum, min_open=spec.above)
    else:
        kind = str
    flag = "--" + field.name.replace("_", "-")
    return click.option(flag, type=kind, default=field.default, show_default=field.default is not None, help=spec.help)


def config_options(function: Callable) -> Callable:
    """`function` with a click option for every ServeConfig field that imagen-serve takes."""
    for field in reversed(option_fields(ServeConfig, CLI)):
        function = click_option(field)(function)
    return function


@command("imagen-serve", PREFIX)
@config_options
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(debug, **options):
    """Serve POST /v1/images/generations (OpenAI's images API) over a bundle, batching concurrent requests."""
    config = ServeConfig(**options, api_key=os.environ.get(API_KEY_VARIABLE) or None)
    run_command(lambda: serve(config), debug=debug, prefix=PREFIX)


def serve(config: ServeConfig) -> None:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as error:
        raise click.ClickException(
            f"{error.name} is not installed; install the server with pip install 'imagen-cascade[serve]'"
        ) from None
    from imagen.runtime import Pipeline

    if not config.api_key and not _is_loopback(config.host):
        click.echo(
            f"{PREFIX}warning: listening on {config.host} without {API_KEY_VARIABLE}: anyone who can reach "
            "this address can use the server",
            err=True,
        )
    providers, threads, precision = PROVIDER_SETS[config.providers], config.threads, config.precision
    with Pipeline.load(config.bundle, config.backend, providers, threads, precision) as pipe:
        app = create_app(pipe, config)
        listener = _listen(config.host, config.port)
        logging.getLogger("imagen.serve").setLevel(config.log_level.upper())
        server = _draining_server(
            uvicorn,
            uvicorn.Config(
                app,
                log_level=config.log_level,
                timeout_graceful_shutdown=int(config.timeout_s) + 5,
                server_header=False,
                limit_concurrency=max(64, 4 * config.queue_images(pipe.max_batch)),
            ),
            app.state.service,
        )
        bound_host, bound_port = listener.getsockname()[:2]
        click.echo(f"{PREFIX}engine: {pipe.choice.reason}", err=True)
        click.echo(
            f"{PREFIX}serving bundle {pipe.bundle.short_sha} ({pipe.backend_name} {pipe.precision}) on "
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
