"""``fleetkeeper promguard``: run the guard, or ask what it would do with a request."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import parse_qsl

import orjson
import typer

from fleetkeeper.core import cliutil
from fleetkeeper.core.errors import ConfigError

from . import policy as P
from .proxy import load_settings, serve

app = typer.Typer(help="Series-query guard in front of Prometheus (/api/v1/series, /labels, /label/*/values).",
                  no_args_is_help=True)


def _split_listen(listen: str) -> tuple[str, int | str]:
    host, sep, port = listen.rpartition(":")
    if not sep:
        return "127.0.0.1", listen
    return host.strip("[]") or "0.0.0.0", port


def _settings(source: str, **kw):
    try:
        return load_settings(source, **kw)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


@app.command()
def run(
    upstream: str = typer.Option(..., help="Prometheus base URL, e.g. http://127.0.0.1:9090"),
    listen: str = typer.Option("127.0.0.1:9091", help="host:port to listen on"),
    deadline: float = typer.Option(10.0, help="seconds before a guarded request is cancelled upstream"),
    max_series: int = typer.Option(10_000, help="most series /api/v1/series returns"),
    max_label_results: int = typer.Option(10_000, help="most names/values the label endpoints return"),
    max_range: float = typer.Option(6 * 3600.0, help="widest start..end window, seconds"),
    default_range: float = typer.Option(3600.0, help="window when the client sends no start, seconds"),
    on_wide_range: str = typer.Option("clamp", help="clamp | reject"),
    on_limit: str = typer.Option("truncate", help="truncate (with a warning) | reject"),
    reject_unscoped: bool = typer.Option(True, "--reject-unscoped/--allow-unscoped",
                                         help="refuse selectors with no metric name, such as {le!=\"\"}"),
    upstream_limit: str = typer.Option("auto", help="send Prometheus's limit parameter: auto | always | never"),
    max_concurrent: int = typer.Option(8, help="guarded requests in flight at once"),
    log_level: str = typer.Option("INFO", help="logging level"),
) -> None:
    """Run the guard until interrupted."""
    host, port = _split_listen(listen)
    settings = _settings(
        "promguard run", upstream=upstream, listen_host=host, listen_port=port, deadline=deadline,
        max_series=max_series, max_label_results=max_label_results, max_range=max_range,
        default_range=default_range, on_wide_range=on_wide_range, on_limit=on_limit,
        reject_unscoped=reject_unscoped, upstream_limit=upstream_limit, max_concurrent=max_concurrent,
    )
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass


@app.command()
def explain(
    request: str = typer.Argument(..., help="path and query, e.g. '/api/v1/series?match[]={le!=\"\"}'"),
    deadline: float = typer.Option(10.0),
    max_series: int = typer.Option(10_000),
    max_range: float = typer.Option(6 * 3600.0),
    default_range: float = typer.Option(3600.0),
    reject_unscoped: bool = typer.Option(True, "--reject-unscoped/--allow-unscoped"),
    upstream_supports_limit: bool = typer.Option(False, help="pretend the upstream is Prometheus >= 2.51"),
    output: str = cliutil.output_option("json"),
) -> None:
    """Print what the guard would do with one request (no network)."""
    settings = _settings("promguard explain", upstream="http://upstream.invalid", deadline=deadline,
                         max_series=max_series, max_range=max_range, default_range=default_range,
                         reject_unscoped=reject_unscoped)
    path, _, query = request.partition("?")
    d = P.plan(path, parse_qsl(query, keep_blank_values=True), time.time(), settings.policy, upstream_supports_limit)
    fmt = "json" if output == "text" else output  # the answer is structured; text is compact JSON

    def show(data: dict) -> None:
        typer.echo(orjson.dumps(data).decode() if output == "text" else cliutil.render(data, fmt))

    if d is None:
        show({"action": "passthrough", "path": path})
    elif isinstance(d, P.Reject):
        show({"action": "reject", "http_status": d.status, **d.body()})
        raise typer.Exit(1)
    else:
        show({"action": "forward", "endpoint": d.endpoint, "params": d.params,
              "limit": d.limit, "deadline": d.deadline, "notes": d.notes})
