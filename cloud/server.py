"""The server's lifecycle: start (load, check, listen), serve until SIGTERM/SIGINT, drain, stop.

``tandem serve`` (cli.py) only parses arguments and calls :func:`run`; each ``--workers N`` worker is
``python -m tandem.cloud.server CONFIG PORT`` (started by workers.py's supervisor), which calls it
too, talking to its supervisor over stdin/stdout.

Start-up refuses, with one line naming the cause and a non-zero exit, what would otherwise be a
server that looks ready while every request fails: a repository that does not exist (a typo; it is
never created), one that yields no loadable model (each reason named: entries that are not bundles,
bundles that fail their signature, hash or ONNX checks; ``allow_empty`` starts anyway, for models
loaded on demand), and a port already in use. ``/v2/health/ready`` answers 200 only while every
model found at start-up has a version loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import faulthandler
import json
import logging
import logging.handlers
import os
import queue
import resource
import signal
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

from tandem.shared.errors import InvalidInput, TandemError

from .config import EXIT_GRACE_S, ServerConfig
from .workers import SERVING, follow_supervisor, supervise

__all__ = ["main", "run", "serve", "check_repository"]

_log = logging.getLogger("tandem.cloud")


def main(config: ServerConfig) -> int:
    """``tandem serve``: check the repository, then serve in this process or, with ``workers`` > 1,
    supervise that many worker processes; the exit code once stopped."""
    check_repository(config)
    return supervise(config) if config.workers > 1 else run(config)


def run(config: ServerConfig, *, worker: bool = False) -> int:
    """Serve ``config`` on the event loop it asks for (uvloop when "auto" finds it) until a signal.

    This is a process's main: once it has served and returns, the process has
    :data:`~tandem.cloud.config.EXIT_GRACE_S` to exit."""
    code = run_loop(config, serve(config, worker=worker))
    exit_now_if_computing(code)
    _bound_exit(EXIT_GRACE_S)
    return code


def exit_now_if_computing(code: int) -> None:
    """End the process at once with ``code`` if a batch is still computing after the drain.

    A drain that ran out of time answered that batch's requests already; the interpreter's exit
    would tear onnxruntime down under the running batch, which aborts the process ("terminate
    called without an active exception"). Logs are flushed first; the databases were closed by the
    drain."""
    from .batcher import threads_computing

    left = threads_computing(_JOIN_S)
    if not left:
        return
    _log.warning("%d batch(es) still computing after the drain: exiting without waiting for them", left)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


def run_loop(config: ServerConfig, main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on the event loop the config asks for."""
    if config.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if config.event_loop == "uvloop":
                main.close()
                raise InvalidInput("event_loop = uvloop, but uvloop is not installed (pip install uvloop)") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def check_repository(config: ServerConfig) -> None:
    """Refuse a repository path that is not a directory (it is never created: a typo would give a
    server with no model and a stray feedback database)."""
    root = Path(config.repository)
    if not root.is_dir():
        raise InvalidInput(f"the repository {root} does not exist or is not a directory")


def _raise_descriptor_limit(connections: int) -> None:
    """Let the process hold ``connections`` sockets (and its files) if the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


async def serve(config: ServerConfig, worker: bool = False) -> int:
    """Serve until SIGTERM/SIGINT, then drain; 0 once every accepted request was answered."""
    with _log_off_the_loop():
        return await _serve(config, worker)


@contextlib.contextmanager
def _log_off_the_loop() -> Iterator[None]:
    """Route every log record through a queue to a thread that does the writing.

    One access-log line per request goes to stderr; when whoever reads stderr falls behind (a full
    pipe), a direct write would block the event loop and with it every request. Access lines are
    the exception: their own thread writes them (gate._AccessLog), never the loop, so they go to
    the handlers directly; the queue's extra hop cost each ~4 of its ~10 us of CPU.
    """
    root = logging.getLogger()
    handlers = root.handlers
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
    root.handlers = [logging.handlers.QueueHandler(records)]
    access = logging.getLogger("tandem.cloud.access")
    direct = bool(handlers) and not access.handlers and access.propagate  # unless the app configured it itself
    if direct:
        access.handlers, access.propagate = [_message_only(h) for h in handlers], False
    listener.start()
    try:
        yield
    finally:
        listener.stop()
        root.handlers = handlers
        if direct:
            access.handlers, access.propagate = [], True


def _message_only(handler: logging.Handler) -> logging.Handler:
    """``handler``'s destination for access lines, without its format's prefix (time, level, logger).

    Access lines are JSON objects, one per line, so that a log shipper parses each line as it is.
    Only the plain stream and file handlers ``logging.basicConfig`` makes are re-targeted; any other
    handler was the app's choice and is used as it is.
    """
    if type(handler) not in (logging.StreamHandler, logging.FileHandler) or getattr(handler, "stream", None) is None:
        return handler
    plain = logging.StreamHandler(handler.stream)  # type: ignore[attr-defined]
    plain.setLevel(handler.level)
    for f in handler.filters:
        plain.addFilter(f)
    plain.setFormatter(logging.Formatter("%(message)s"))
    plain.lock = handler.lock  # one lock per stream: an access line and another record never interleave
    return plain


async def _serve(config: ServerConfig, worker: bool) -> int:
    from .app import STATE, create_app, describe_models, make_runner
    from .front import listen

    check_repository(config)
    _raise_descriptor_limit(config.max_connections)
    app = create_app(config)
    state = app[STATE]
    runner = make_runner(app)
    await runner.setup()  # loads and warms every model
    try:
        if not state.repository.loaded() and not config.allow_empty:
            reasons = state.not_served() or [f"no bundle in {config.repository} (<name>/<version>/manifest.json)"]
            raise InvalidInput(
                "no model can be served: " + "; ".join(reasons) + " (--allow-empty starts anyway, to load models on demand)"
            )
        for reason in state.not_served():
            _log.error("not served: %s", reason)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        control = None
        if worker:
            control = _follow_supervisor(state, loop, stop)
        try:
            door = await listen(runner, config.host, config.port, reuse_port=worker, backlog=1024)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise InvalidInput(f"cannot listen on {config.host}:{config.port}: the address is already in use") from None
            raise InvalidInput(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    except TandemError:
        await runner.cleanup()
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"  cores={config.available_cores()}", flush=True)
    for line in describe_models(app):
        print(f"  {line}", flush=True)
    print(f"ready http://{host}:{door.port}", flush=True)
    await stop.wait()
    if worker:
        # A worker gets the signal twice when sent to the whole process group (Ctrl-C, systemd,
        # timeout) and forwarded by the supervisor: the second must not kill it mid-drain or
        # mid-exit (asyncio would restore the default handlers as the loop closes).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
    if config.shutdown_delay_s > 0:
        await _shutdown_delay(state, config.shutdown_delay_s, stop)
    state.drain_by = time.monotonic() + config.shutdown_timeout_s
    _bound_exit(config.shutdown_timeout_s + EXIT_GRACE_S)
    _log.info("draining: no new connections; answering accepted requests (exit within %g s)", config.shutdown_timeout_s + EXIT_GRACE_S)
    # Stop listening and answer what the front door accepted (and what sat in the sockets'
    # buffers); then cleanup() waits for aiohttp's in-flight handlers and the job runs, and
    # on_cleanup drains every batcher and releases the sessions: all within what is left of
    # shutdown_timeout_s (state.drain_left()).
    if control is not None:
        control.drain()  # a model change waiting on the other workers would hold up cleanup()
    await door.close(state.drain_left())
    # aiohttp reads its handlers' bound from the runner (set when it was made, not settable).
    runner._shutdown_timeout = state.drain_left()
    await runner.cleanup()
    if control is not None:
        await control.close()
    _log.info("stopped")
    return 0


#: How long the instance threads of closed batchers get to end before the exit (see
#: exit_now_if_computing): one that is not inside a batch ends at once.
_JOIN_S = 0.5


def _bound_exit(seconds: float) -> None:
    """From now on, end the process (exit code 1, every thread's stack on stderr) if it still
    runs ``seconds`` later, whatever it waits on: a drain, a finalizer, a thread, a lock.

    A shutdown must end within what the deployment allows it (Kubernetes' grace period): a
    process that hangs there is killed without a word, and its requests' fate is unknown. The
    watchdog is faulthandler's C thread, so it fires even while a thread holds the GIL; a later
    call replaces the bound.
    """
    faulthandler.dump_traceback_later(seconds, exit=True)


def _follow_supervisor(state: Any, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> Any:
    """A worker of ``--workers N``: not ready until the supervisor says every worker is (any
    worker may answer a health check); model load/unload reaches every worker through the
    supervisor (control.py); the end of its stdin means the supervisor is gone: drain and exit."""
    from .control import WorkerControl

    def send(line: str) -> None:  # to the supervisor, which reads our stdout line by line
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def go() -> None:
        state.ready = True
        send(SERVING)  # the supervisor prints ready once every worker said this

    state.ready = False
    state.control = control = WorkerControl(state.repository, send, on_go=go)
    follow_supervisor(loop, on_line=control.command, on_eof=stop.set)
    return control


async def _shutdown_delay(state: Any, delay: float, stop: asyncio.Event) -> None:
    """Serve on for ``delay`` seconds, saying not ready and closing every answered connection, so
    that load balancers and clients' connection pools move on before the listener closes.

    A second signal ends the wait early (one process: a worker ignores repeated signals)."""
    state.ready = False
    state.gate.draining = True
    _log.info("shutting down in %g s: /v2/health/ready answers 503 and responses close their connections meanwhile", delay)
    stop.clear()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)


def _worker_main(argv: list[str]) -> int:
    """One worker of ``--workers N``: ``python -m tandem.cloud.server CONFIG PORT``."""
    config_path, port = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    doc = json.loads(Path(config_path).read_text())
    doc["port"] = int(port)
    try:
        return run(ServerConfig(**doc), worker=True)
    except TandemError as e:
        print(f"error: {e.message}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
