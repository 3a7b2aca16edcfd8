"""``tandem serve``: run the cloud server until SIGTERM/SIGINT, then drain and exit 0.

Cheap to import: aiohttp, onnxruntime and the server modules are imported inside ``run``.
"""

from __future__ import annotations

import argparse
import contextlib

__all__ = ["serve"]


def serve(parser: argparse.ArgumentParser) -> None:
    """Serve a repository of bundles over HTTP (native msgpack + Open Inference Protocol v2)."""
    parser.add_argument("--repository", required=False, help="model repository: REPO/<model>/<version>/ bundles")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8000)")
    parser.add_argument("--trusted-key", action="append", dest="trusted_keys", metavar="PUB.pem", help="public key that may sign bundles (repeatable)")
    parser.add_argument("--insecure-skip-signature", action="store_true", default=None, help="load bundles without checking signatures (hashes are still checked)")
    parser.add_argument("--config", default=None, help="config file (.toml, .yaml, .json); flags and TANDEM_* env override it")
    parser.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY", help="accepted bearer token (repeatable); none = no auth")
    parser.add_argument("--instances", type=int, default=None, help="onnxruntime sessions per model version")
    parser.add_argument("--providers", default=None, help="ordered execution providers, comma separated")
    parser.add_argument(
        "--workers", type=int, default=None,
        help="server processes sharing the port (SO_REUSEPORT), one event loop each (default 1; the number of cores "
        "is the throughput setting for small models on CPU)",
    )
    parser.epilog = (
        "Every other setting (batching per model, timeouts, shutdown delay, cache, canary, ...) comes from --config "
        "or TANDEM_* variables (TANDEM_BATCHING__MAX_BATCH_SIZE=16): see examples/cloud/serve.toml."
    )
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:

    from .config import load_config

    config = load_config(
        args.config,
        repository=args.repository,
        host=args.host,
        port=args.port,
        trusted_keys=args.trusted_keys,
        insecure_skip_signature=args.insecure_skip_signature,
        api_keys=args.api_keys,
        instances=args.instances,
        workers=args.workers,
        providers=[s.strip() for s in args.providers.split(",") if s.strip()] if args.providers else None,
    )
    if not config.insecure_skip_signature and not config.trusted_keys:
        from tandem.shared.errors import InvalidInput

        raise InvalidInput("give --trusted-key PUB.pem (or --insecure-skip-signature to load unsigned bundles knowingly)")
    if config.workers > 1:
        from .workers import supervise

        return supervise(config)
    return run_loop(config, _serve(config))


def run_loop(config, main):  # type: ignore[no-untyped-def]
    """Run ``main`` on the event loop the config asks for (uvloop when "auto" finds it)."""
    import asyncio

    if config.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if config.event_loop == "uvloop":
                from tandem.shared.errors import InvalidInput

                raise InvalidInput("event_loop = uvloop, but uvloop is not installed (pip install uvloop)") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


async def _serve(config, worker: bool = False) -> int:  # type: ignore[no-untyped-def]
    with _log_off_the_loop():
        return await _run_server(config, worker)


@contextlib.contextmanager
def _log_off_the_loop():  # type: ignore[no-untyped-def]
    """Route every log record through a queue to a thread that does the writing.

    One access-log line per request goes to stderr; when whoever reads stderr falls behind (a full
    pipe), a direct write would block the event loop and with it every request. Access lines are
    the exception: their own thread writes them (gate._AccessLog), never the loop, so they go to
    the handlers directly; the queue's extra hop cost each ~4 of its ~10 us of CPU.
    """
    import logging
    import logging.handlers
    import queue

    root = logging.getLogger()
    handlers = root.handlers
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
    root.handlers = [logging.handlers.QueueHandler(records)]
    access = logging.getLogger("tandem.cloud.access")
    direct = bool(handlers) and not access.handlers and access.propagate  # unless the app configured it itself
    if direct:
        access.handlers, access.propagate = list(handlers), False
    listener.start()
    try:
        yield
    finally:
        listener.stop()
        root.handlers = handlers
        if direct:
            access.handlers, access.propagate = [], True


async def _run_server(config, worker: bool = False) -> int:  # type: ignore[no-untyped-def]
    """Serve until SIGTERM/SIGINT. A ``worker`` (one of ``--workers N`` processes, see workers.py)
    shares the port with its siblings and talks to the supervisor over stdin/stdout."""
    import asyncio
    import logging
    import signal

    from aiohttp import web

    from .app import STATE, create_app, describe_models
    from .front import listen

    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.shutdown_timeout_s, handle_signals=False)
    await runner.setup()  # loads and warms every model
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    control = None
    if worker:
        import sys

        from .control import WorkerControl
        from .workers import follow_supervisor

        state = app[STATE]

        def send(line: str) -> None:  # to the supervisor, which reads our stdout line by line
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

        # Not ready until the supervisor says every worker is: any worker may answer a health check.
        state.ready = False
        # Model load/unload reaches every worker through the supervisor (see control.py).
        state.control = control = WorkerControl(state.repository, send, on_go=lambda: setattr(state, "ready", True))
        follow_supervisor(loop, on_line=control.command, on_eof=stop.set)
    door = await listen(runner, config.host, config.port, reuse_port=worker, backlog=1024)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = f"[{config.host}]" if ":" in config.host else config.host
    port = door.port
    print(f"  cores={config.available_cores()}", flush=True)
    for line in describe_models(app):
        print(f"  {line}", flush=True)
    print(f"ready http://{host}:{port}", flush=True)
    await stop.wait()
    if worker:
        # A worker gets the signal twice when sent to the whole process group (Ctrl-C, systemd,
        # timeout) and forwarded by the supervisor: the second must not kill it mid-drain or
        # mid-exit (asyncio would restore the default handlers as the loop closes).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
    log = logging.getLogger("tandem.cloud")
    if config.shutdown_delay_s > 0:
        await _shutdown_delay(app[STATE], config.shutdown_delay_s, stop, log)
    log.info("draining: no new connections; answering accepted requests")
    # Stop listening and answer what the front door accepted; then cleanup() waits for aiohttp's
    # in-flight handlers (shutdown_timeout), and on_cleanup drains every batcher and releases the
    # sessions.
    if control is not None:
        control.drain()  # a model change waiting on the other workers would hold up cleanup()
    await door.close(config.shutdown_timeout_s)
    await runner.cleanup()
    if control is not None:
        await control.close()
    log.info("stopped")
    return 0


async def _shutdown_delay(state, delay: float, stop, log) -> None:  # type: ignore[no-untyped-def]
    """Serve on for ``delay`` seconds, saying not ready and closing every answered connection, so
    that load balancers and clients' connection pools move on before the listener closes.

    A second signal ends the wait early (one process: a worker ignores repeated signals)."""
    import asyncio
    import contextlib

    state.ready = False
    state.gate.draining = True
    log.info("shutting down in %g s: /v2/health/ready answers 503 and responses close their connections meanwhile", delay)
    stop.clear()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
