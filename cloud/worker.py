"""``tandem worker``: run the jobs of a Redis job queue on this machine.

A worker loads the models of its repository (as ``tandem serve`` does: signatures checked, warmed
up), then loops: claim jobs from the queue's consumer group (entries a dead worker left unacknowledged
past ``jobs.claim_timeout_s`` first, then the best priority), run them through the models' batchers
(:class:`~.jobs.JobRunner`: coalesced batches), store each result, acknowledge the entries, POST
callbacks. Up to two claimed groups are in flight, so the next batch is read and decoded while one
computes. SIGTERM/SIGINT: stop claiming, finish and store what is in hand, exit 0. A worker killed
outright loses nothing: its unacknowledged entries are reclaimed by the others (or by itself when
restarted). Any number of workers, on any number of machines, may consume one queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from typing import Any

from tandem.shared.errors import InvalidInput, Unavailable

from .config import ServerConfig
from .job_queue import consume

__all__ = ["Worker", "run_worker"]

_log = logging.getLogger("tandem.cloud.worker")

#: Claimed groups in flight at once: one computing, one being read, decoded and answered.
_IN_FLIGHT = 2
#: Jobs claimed at once by default: three round trips per group, so a large group spends little
#: on Redis per job; its jobs still run in batches of the model's max_batch_size.
_CLAIM = 64


class Worker:
    """One consumer of a Redis job queue (see the module docstring)."""

    def __init__(self, config: ServerConfig, queue_url: str, *, name: str | None = None, claim: int = _CLAIM) -> None:
        from .inference import Inference
        from .jobs import Callbacks, JobRunner
        from .metrics import Metrics
        from .redis_queue import RedisJobQueue
        from .repository import ModelRepository

        if not queue_url.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidInput(f"tandem worker consumes a Redis queue: give --queue redis://host:port/db, not {queue_url!r}")
        if claim < 1:
            raise InvalidInput("--claim must be at least 1")
        self.config = config
        self.metrics = Metrics()
        self.repository = ModelRepository(config, self.metrics)
        self.inference = Inference(self.repository, config)
        self.runner = JobRunner(self.inference, below_online=False)  # a worker serves no online traffic
        self.queue = RedisJobQueue(queue_url, prefix=config.jobs.redis_prefix, claim_timeout_s=config.jobs.claim_timeout_s, consumer=name)
        self.callbacks = Callbacks(config.jobs.callback_attempts, config.jobs.callback_timeout_s)
        self.claim = claim
        self.stop = asyncio.Event()
        self.completed = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return self.queue.consumer

    async def start(self) -> None:
        self.repository.scan()
        await self.repository.start()
        if not self.repository.loaded():
            raise InvalidInput(f"no model can be served from {self.config.repository}: nothing for the worker to run")
        # What is loaded now lives as long as the worker: kept out of the collector's sight, a full
        # collection no longer walks it (~25 ms each, about once per thousand jobs).
        gc.freeze()

    async def run(self) -> None:
        """Claim and run jobs until :attr:`stop` is set; then finish what is in hand."""
        await consume(self.queue, self.claim, self._process, self._tasks, in_flight=_IN_FLIGHT,
                      stopped=self.stop.is_set, pause=self._pause)
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def _process(self, jobs: list[Any]) -> None:
        try:
            await self._run_and_store(jobs)
        except Exception:  # noqa: BLE001 - unacknowledged, the jobs are reclaimed after the claim timeout
            _log.exception("%d claimed job(s) could not be run; they will be reclaimed", len(jobs))

    async def _run_and_store(self, jobs: list[Any]) -> None:
        done, back = await self.runner.run(jobs)
        # Stored first, acknowledged after: a worker dying between the two leaves entries that
        # another reclaims, finds finished, and acknowledges without running them again.
        for attempt in range(30):
            try:
                finished = await self.queue.complete(done, self.config.jobs.result_ttl_s)
                break
            except Unavailable as e:
                if attempt == 0:
                    _log.warning("cannot store %d result(s) yet: %s", len(done), e.message)
                await asyncio.sleep(1.0)
        else:
            _log.error("gave up storing %d result(s); their jobs will be reclaimed and run again", len(done))
            return
        self.completed += len(done)
        self.callbacks.notify(finished)
        if back:
            with contextlib.suppress(Unavailable):
                await self.queue.release(back)

    async def close(self) -> None:
        await self.callbacks.close()
        await self.queue.close()
        await self.repository.close(self.config.shutdown_timeout_s)


async def _main(config: ServerConfig, queue_url: str, name: str | None, claim: int) -> int:
    worker = Worker(config, queue_url, name=name, claim=claim)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop.set)
    try:
        await worker.start()
        await worker.queue.ping()
        for m in worker.repository.loaded():
            print(f"  {m.name}:{m.version}  providers={','.join(m.engine.providers)}  instances={m.engine.instances}", flush=True)
        print(f"worker {worker.name} consuming {queue_url}", flush=True)
        await worker.run()
    finally:
        await worker.close()
    print(f"worker {worker.name} stopped after {worker.completed} job(s)", flush=True)
    return 0


def run_worker(config: ServerConfig, queue_url: str, *, name: str | None = None, claim: int = _CLAIM) -> int:
    """Run a worker until SIGTERM/SIGINT; 0 on a clean stop."""
    from .server import check_repository, exit_now_if_computing

    check_repository(config)
    code = asyncio.run(_main(config, queue_url, name, claim))
    exit_now_if_computing(code)
    return code
