"""Bounds on what one request or connection may cost the server: the largest upload body (by
default derived from the task: the largest valid update frame), and the uvicorn options that
drop slow senders and cap the connections held at once."""

from __future__ import annotations

import functools
import logging
import math

from asyncfl import wire
from asyncfl.config import ConfigError, ServerConfig
from asyncfl.server.aggregation import AggregationRole

log = logging.getLogger("asyncfl.server")
BODY_MARGIN = 1.25  # over the largest valid frame: room for a client that writes its header less tightly


def body_limit(settings: ServerConfig, aggregation: AggregationRole) -> int:
    """`max_body_bytes` when set, else the largest valid update frame × `BODY_MARGIN`: with an
    upload codec, the codec's payload for the model's weights (compressed frames carry the model's
    tensors only); without, float32 for every tensor an upload carries (the delta's, then each of
    the algorithm's upload fields, e.g. SCAFFOLD's control variate change)."""
    if settings.max_body_bytes is not None:
        return settings.max_body_bytes
    model = list(zip(aggregation.names, aggregation.shapes))
    codec = aggregation.upload_codec
    if aggregation.masked is not None:
        tensors, payload = model, aggregation.masked.terms.payload_bytes
    elif codec is not None:
        tensors, payload = model, codec.bytes_for(sum(math.prod(s) for _, s in model))
    else:
        tensors, payload = aggregation.expected, 4 * sum(math.prod(s) for _, s in aggregation.expected)
    return math.ceil(BODY_MARGIN * wire.largest_update_frame(tensors, payload))


def uvicorn_options(settings: ServerConfig) -> dict:
    """Keyword arguments for `uvicorn.run`: the HTTP protocol with a header deadline, the idle
    keep-alive bound and the connection cap (uvicorn answers 503 above it; clients retry)."""
    from asyncfl.server.connection import HeaderDeadlineProtocol

    return {
        "http": functools.partial(HeaderDeadlineProtocol, header_timeout=settings.header_timeout),
        "timeout_keep_alive": settings.keep_alive_timeout,
        "limit_concurrency": settings.max_connections,
    }


GC_THRESHOLDS = (10_000, 50, 100)  # young, middle, old: see serve_http
SPARE_DESCRIPTORS = 128  # besides the client connections: database connections, state files, logs


def make_room_for(connections: int, chosen: bool = True) -> int:
    """Raise this process's soft limit on open files to fit `connections` sockets and
    SPARE_DESCRIPTORS others (a common default soft limit is 1,024); the connection cap to
    serve with. When even the hard limit is lower: ConfigError for a cap the operator `chosen`,
    else (the default cap) the largest cap that fits, with a warning, so that a default server
    still starts where the hard limit is small."""
    try:
        import resource
    except ImportError:  # no such limit to raise on this platform
        return connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = connections + SPARE_DESCRIPTORS
    if soft == resource.RLIM_INFINITY or soft >= need:
        return connections
    if hard != resource.RLIM_INFINITY and hard < need:
        if chosen or hard <= 2 * SPARE_DESCRIPTORS:
            raise ConfigError(
                f"max_connections {connections} needs {need} open files, above this process's hard limit {hard}: "
                "lower server.max_connections or raise the limit (ulimit -Hn, LimitNOFILE=)"
            )
        connections, need = hard - SPARE_DESCRIPTORS, hard
        log.warning("open files limited to %d: serving at most %d connections", hard, connections)
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return connections


def serve_http(app, args, settings: ServerConfig) -> None:
    """Run an ASGI app on uvicorn as `serve` does for every role: the command line's address,
    TLS and log level, no access log, the bounds above and the check-in budget.

    Everything alive by now (torch, the web stack, the app) moves to the collector's permanent
    generation: a full collection would otherwise walk those millions of objects, stopping
    every request for 150-250 ms about once a second under load. Then collections are made
    rarer (Python's thresholds, 700 / 10 / 10, meant full ones of 10-56 ms about once a second
    at 2,000 check-ins/s): a young one every 10,000 allocations, 6-9 ms about once a second;
    older generations far less often. Garbage without cycles is freed at once all the same."""
    import gc

    import uvicorn

    from asyncfl.server.admission import with_admission

    cap = make_room_for(settings.max_connections, chosen="max_connections" in settings.model_fields_set)
    settings = settings.model_copy(update={"max_connections": cap})
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)

    uvicorn.run(
        with_admission(app, settings.checkin_rate_per_s, settings.retry_after),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        access_log=False,
        **uvicorn_options(settings),
    )
