"""Server configuration: one pydantic-settings model, from code, a file (TOML/YAML/JSON) or ``TANDEM_*``.

Precedence (highest first): keyword arguments / CLI flags, environment (``TANDEM_PORT=9000``,
nested with ``__``: ``TANDEM_BATCHING__MAX_BATCH_SIZE=16``), the config file, defaults.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from tandem.shared.errors import InvalidInput
from tandem.shared.profile import DriftSettings

from .cores import available_cores

__all__ = ["BatchingConfig", "MonitoringConfig", "JobsConfig", "ServerConfig", "load_config", "EXIT_GRACE_S"]

#: Seconds a server process may take to release everything and exit once its drain has ended (or
#: ran out of ``shutdown_timeout_s``); past it the process is ended with its threads' stacks on
#: stderr (server.py), and a ``--workers`` supervisor kills a worker that is still there (workers.py).
EXIT_GRACE_S = 10.0


class BatchingConfig(BaseModel):
    """The dynamic batcher of one model (Triton's ``dynamic_batching`` in spirit)."""

    model_config = ConfigDict(extra="forbid")

    #: Largest batch (rows) run at once; 1 disables batching.
    max_batch_size: int = Field(32, ge=1)
    #: How long the oldest request may wait for a batch to fill. 0: run whatever is queued at once.
    max_queue_delay_us: int = Field(0, ge=0)
    #: Under load, how long an instance that just finished a batch may wait for a fuller next one.
    #: It waits only when requests queued while the batch ran (a lone client never waits), and
    #: only for what that load can fill: three quarters of the rows it just answered (whose
    #: clients send again while it waits) plus those queued, at most max_batch_size, or a
    #: preferred size. 0: never. Unlike max_queue_delay_us (counted from the oldest request's
    #: arrival, so it never waits once the queue is busy), this lets a model under steady load run
    #: fuller batches; it costs those requests up to the wait. Default: 0 with one server process;
    #: with ``workers`` > 1, 1000 (see ServerConfig.workers).
    fill_wait_us: int = Field(0, ge=0)
    #: Batch sizes worth waiting for (within max_queue_delay_us) when one is nearly reached.
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    #: Requests waiting beyond this are refused at once with 503 + Retry-After.
    max_queue_size: int = Field(1024, ge=1)
    #: Most rows one request may carry; a request with more is refused with 400 naming the limit.
    #: None (default): max_batch_size, as Triton refuses a request larger than its max_batch_size.
    #: Raised above max_batch_size, a larger request runs as a batch of its own (the instance
    #: computes nothing else meanwhile), and the instance's onnxruntime memory arena gives back
    #: what that batch took once it is answered.
    max_request_rows: int | None = Field(None, ge=1)
    #: Rows waiting, all requests together, beyond which a request is refused at once with 503 +
    #: Retry-After. max_queue_size counts requests, whatever their size: this bounds the memory
    #: the queue holds. A request finding the queue empty is always taken (within max_request_rows).
    max_queue_rows: int = Field(8192, ge=1)
    #: Longest a request may wait in the queue, in ms. A request still queued after that long is
    #: answered 503 + Retry-After and leaves the queue, and a request the queue already holds more
    #: work than that for (its rows ahead, in batches, times the recent batch compute time) is
    #: refused on arrival (counting one batch computing ahead of it too): under overload admitted
    #: requests wait at most this long. The queue then holds this bound less one batch's time of
    #: work: set it to at least twice a full batch's compute time (under load), or batches run
    #: less than full and throughput drops. None (default, as Triton's queue policy): no bound.
    max_queue_wait_ms: float | None = Field(None, gt=0)
    #: Deadline applied to requests that give none (a request may lower it, never raise it).
    default_timeout_ms: float | None = Field(None, gt=0)
    #: Priority levels 1..N, 1 served first; requests without a priority get default_priority_level.
    priority_levels: int = Field(1, ge=1)
    default_priority_level: int | None = None
    #: For models whose inputs declare a pad value: requests of different lengths share a batch
    #: while it computes at most this many input elements per element sent (1.0: equal lengths
    #: only). Higher merges more and wastes more; see the batcher for the measurements behind 1.1.
    max_padding_ratio: float = Field(1.1, ge=1.0)

    @model_validator(mode="after")
    def _check(self) -> BatchingConfig:
        if self.default_priority_level is None:
            self.default_priority_level = self.priority_levels
        if not 1 <= self.default_priority_level <= self.priority_levels:
            raise ValueError("default_priority_level must be within 1..priority_levels")
        if any(s < 1 or s > self.max_batch_size for s in self.preferred_batch_sizes):
            raise ValueError("preferred_batch_sizes must lie within 1..max_batch_size")
        return self

    @property
    def request_rows(self) -> int:
        """The most rows one request may carry (max_request_rows, else max_batch_size)."""
        return self.max_request_rows if self.max_request_rows is not None else self.max_batch_size


class JobsConfig(BaseModel):
    """Asynchronous jobs (``Prefer: respond-async`` submits, ``/v1/jobs``): see docs/queue.md."""

    model_config = ConfigDict(extra="forbid")

    #: "embedded" (default): a SQLite queue inside ``tandem serve`` that runs the jobs itself; or
    #: ``redis://host:port/db``: serve only submits, ``tandem worker`` processes run the jobs.
    queue: str = "embedded"
    #: SQLite file of the embedded queue; default <repository>/.jobs.sqlite3 (beside the feedback store).
    store_path: Path | None = None
    #: Seconds a finished job's status and result are kept, then forgotten (404).
    result_ttl_s: float = Field(24 * 3600.0, gt=0)
    #: Unfinished jobs (queued or running) beyond which a submit is refused with 503 + Retry-After.
    max_queued: int = Field(100_000, ge=1)
    #: Largest request body a job may carry (bytes, after decoding); larger: 413.
    max_payload_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    #: Redis: seconds a claimed job may stay unacknowledged before another worker reclaims it
    #: (XAUTOCLAIM): longer than the slowest batch, short enough to retry a dead worker's jobs soon.
    claim_timeout_s: float = Field(60.0, gt=0)
    #: Redis key prefix (several deployments may share one Redis).
    redis_prefix: str = Field("tandem", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    #: Attempts (first included) at POSTing the final status document to a job's callback URL.
    callback_attempts: int = Field(3, ge=1, le=10)
    #: Seconds one callback attempt may take.
    callback_timeout_s: float = Field(10.0, gt=0)

    @field_validator("queue")
    @classmethod
    def _queue_url(cls, v: str) -> str:
        if v != "embedded" and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("jobs.queue must be 'embedded' or a redis:// (rediss://, unix://) URL")
        return v


class MonitoringConfig(DriftSettings):
    """Data drift and live quality monitoring of every served model (see docs/monitoring.md)."""

    #: At most this many rows of each executed batch are profiled (its first requests').
    rows_per_batch: int = Field(16, ge=1)
    #: Share of one core the profiling of one model may take; batches beyond it are skipped.
    max_cpu_share: float = Field(0.005, gt=0, le=1)
    #: How often scores are recomputed, gauges set, feedback read and the webhook considered (s).
    interval_s: float = Field(1.0, gt=0)
    #: Called with a JSON POST when a model starts drifting (and when it stops).
    webhook_url: str | None = Field(None, pattern=r"^https?://")
    webhook_attempts: int = Field(3, ge=1, le=10)
    webhook_timeout_s: float = Field(5.0, gt=0)
    #: Per model, the most drifted features given their own gauge (bounds label cardinality).
    top_features: int = Field(5, ge=0, le=50)


class ServerConfig(BaseSettings):
    """Everything ``tandem serve`` can be told. See the module docstring for sources."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_", env_nested_delimiter="__", extra="forbid")

    repository: Path
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    trusted_keys: list[Path] = Field(default_factory=list)
    #: Load bundles without checking their signature (hashes are still checked). Development only.
    insecure_skip_signature: bool = False
    #: Bearer tokens accepted; empty = no auth.
    api_keys: list[str] = Field(default_factory=list)
    #: Ordered execution providers; those this onnxruntime build lacks are skipped (and logged).
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    #: Sessions per model version, each pulling batches from the model's queue.
    instances: int = Field(1, ge=1)
    #: Server processes, each with its own event loop, sharing host:port via SO_REUSEPORT: more
    #: loops use more cores, and each process's session gets fewer intra-op threads, which then
    #: wait less for a thread that shares its core with a loop. With fill_wait_us 1000 (below),
    #: on 2 cores at 64 connections: +8% on the int8 digits model, +18% on the fp32 CNN; but
    #: -4% on a model bound by memory traffic, and a lone request computes on one thread
    #: (twice as slow on that model). Model load/unload over /v2/repository reaches every worker
    #: (through the supervisor, see control.py). With workers > 1, batching configs that do not
    #: set fill_wait_us get 1000: each worker's queue sees 1/N of the load, and without the wait
    #: its batches stay smaller (fp32 CNN, 2 workers: 11.8k vs 12.4k req/s at 64 connections,
    #: 8.3-8.6k vs 9.3-9.6k at 16; p99 7.7 vs ~10 ms at 64; concurrency 1 unchanged).
    workers: int = Field(1, ge=1)
    #: CPU cores the server may use; default: those the OS grants this process (its CPU affinity
    #: and cgroup CPU quota, e.g. a Kubernetes CPU limit), not the host's count (see cores.py).
    cores: int | None = Field(None, ge=1)
    #: onnxruntime intra-op threads per session; default: cores // (workers * instances), at least 1.
    intra_op_threads: int | None = Field(None, ge=1)
    #: When onnxruntime's intra-op threads may spin waiting for work. "never" (default): they
    #: sleep, leaving the cores to the event loop and the other instances. "always": they spin
    #: between runs too, so no core goes idle: on this 2-core VM that cut the digits CNN's
    #: latency at concurrency 1 from ~0.65 to ~0.45 ms (idle vCPUs are slow to wake), but cost up
    #: to half the throughput at 64 connections. "run": spin within a run only
    #: (session.force_spinning_stop); it starved the event loop during long runs and bought no
    #: measurable latency in the server.
    ort_spinning: Literal["never", "run", "always"] = "never"
    #: How many nice steps below the event loop the threads that compute run (onnxruntime's and
    #: the batcher's; Linux). The loop feeds them: at equal priority the kernel let it wait ~1 ms
    #: for a core behind them, and they then waited for work. With 2 single-thread instances on 2
    #: cores (instances=2, intra_op_threads=1) it took the fp32 digits CNN at 64 connections from
    #: 8.7-9.8k to 10.2-11.2k req/s. Relative to the server's own priority, so it only orders the server's
    #: threads among themselves when nothing else runs on its cores. 0: off.
    compute_nice: int = Field(10, ge=0, le=19)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    #: Per-model overrides of ``batching`` (keys: model names).
    model_batching: dict[str, BatchingConfig] = Field(default_factory=dict)
    #: Batch sizes each model runs once before the server reports ready (clipped to max_batch_size).
    warmup_batch_sizes: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    #: Largest request body accepted (after decompression), bytes.
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    #: Entries in the response cache (0 = off), keyed by model, version, outputs and input bytes.
    response_cache_size: int = Field(0, ge=0)
    #: Weighted split between versions of a model for requests naming no version:
    #: ``{"toy": {"1": 95, "2": 5}}``.
    canary: dict[str, dict[str, float]] = Field(default_factory=dict)
    #: Price of one call advertised in X-Tandem-Cost (None: header not sent).
    cost_per_call: float | None = Field(None, ge=0)
    #: SQLite file of the feedback store; default <repository>/.feedback.sqlite3.
    feedback_db: Path | None = None
    #: Asynchronous jobs: queue engine, store, result TTL, limits (see JobsConfig).
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    #: Data drift and live quality monitoring (see MonitoringConfig).
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    #: Seconds a request head may take from its first byte to its last. Then the client is answered
    #: 408 and its connection closed: a deliberately slow client (slowloris) holds a socket for at
    #: most this long, however it spaces its bytes.
    head_timeout_s: float = Field(10.0, gt=0)
    #: A request body gets ``read_timeout_s`` of grace, and beyond it must keep arriving at
    #: ``min_body_rate`` bytes/s on average (counted from the end of the head); a body that falls
    #: behind is answered 408 and its connection closed. A 64 MB body at the default rate may take
    #: ~18 min; a stalled one is cut after the grace.
    read_timeout_s: float = Field(60.0, gt=0)
    min_body_rate: int = Field(64 * 1024, ge=1)
    #: Seconds a connection may sit idle between requests before the server closes it, on every
    #: connection whichever HTTP stack serves it.
    keepalive_timeout_s: float = Field(75.0, gt=0)
    #: Open connections per server process; beyond it a new connection is answered 503 with
    #: ``Connection: close`` and closed (the process's descriptor limit is raised to fit).
    max_connections: int = Field(10_000, ge=1)
    #: Pipelined requests one connection may have in flight; the server stops reading that
    #: connection until answers go out. It also stops reading a connection whose client does not
    #: read its answers (the socket's write buffer past its high-water mark).
    max_requests_in_flight: int = Field(128, ge=1)
    #: Start even when the repository yields no loadable model (models are then loaded on demand
    #: over /v2/repository). Otherwise such a server exits non-zero naming the reasons.
    allow_empty: bool = False
    #: Seconds a graceful shutdown waits for accepted requests (received in full, or in the
    #: socket's buffer when the shutdown began) to be answered.
    shutdown_timeout_s: float = Field(30.0, gt=0)
    #: Seconds the server keeps serving after SIGTERM before it stops accepting, while
    #: /v2/health/ready answers 503 and every response closes its connection. Load balancers and
    #: Kubernetes endpoints take a few seconds to stop sending to a terminating server; without
    #: the delay, connections they still send are refused. 0 (default): stop accepting at once.
    #: A second SIGTERM/SIGINT ends the delay (one process; workers ignore it, see cli.py).
    shutdown_delay_s: float = Field(0.0, ge=0)
    access_log: bool = True
    #: Serve the infer routes through the lean HTTP/1.1 front door (cloud/front.py), everything
    #: else through aiohttp. Off: aiohttp serves every request (about half the throughput).
    front_door: bool = True
    #: Event loop: "auto" takes uvloop when it is installed (measured ~30% more requests/s than
    #: asyncio's loop on the front door), "asyncio" never does.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"

    @field_validator("canary")
    @classmethod
    def _weights(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for model, split in v.items():
            if not split or any(w < 0 for w in split.values()) or sum(split.values()) <= 0:
                raise ValueError(f"canary split for {model!r} needs non-negative weights with a positive sum")
        return v

    @model_validator(mode="after")
    def _fill_wait_with_workers(self) -> ServerConfig:
        if self.workers > 1:
            self.batching = _with_fill_wait(self.batching)
            self.model_batching = {m: _with_fill_wait(b) for m, b in self.model_batching.items()}
        return self

    def batching_for(self, model: str) -> BatchingConfig:
        return self.model_batching.get(model, self.batching)

    def available_cores(self) -> int:
        return self.cores if self.cores is not None else available_cores()

    def threads_per_session(self) -> int:
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        # Every session of every worker runs at once under load: share the cores among them all.
        return max(1, self.available_cores() // (self.workers * self.instances))

    def feedback_path(self) -> Path:
        return self.feedback_db if self.feedback_db is not None else Path(self.repository) / ".feedback.sqlite3"

    def jobs_path(self) -> Path:
        """The embedded job queue's SQLite file (beside the feedback store by default)."""
        return self.jobs.store_path if self.jobs.store_path is not None else Path(self.repository) / ".jobs.sqlite3"


#: fill_wait_us for batching configs that leave it unset when the server runs several workers.
_WORKERS_FILL_WAIT_US = 1000


def _with_fill_wait(b: BatchingConfig) -> BatchingConfig:
    if "fill_wait_us" in b.model_fields_set:
        return b
    return b.model_copy(update={"fill_wait_us": _WORKERS_FILL_WAIT_US})


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read config file {path}: {e}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            doc = tomllib.loads(text.decode())
        elif suffix in (".yaml", ".yml"):
            import yaml  # only needed for YAML files

            doc = yaml.safe_load(text)
        elif suffix == ".json":
            doc = json.loads(text)
        else:
            raise InvalidInput(f"config file {path} must end in .toml, .yaml, .yml or .json")
    except InvalidInput:
        raise
    except Exception as e:  # each parser has its own error types
        raise InvalidInput(f"config file {path} does not parse: {e}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InvalidInput(f"config file {path} must hold a mapping at the top level")
    return doc


def load_config(file: str | os.PathLike[str] | None = None, **overrides: Any) -> ServerConfig:
    """A ServerConfig from an optional file, the environment and explicit overrides (highest).

    ``overrides`` whose value is None are ignored, so CLI flags left unset fall through.
    """
    doc = _read_file(Path(file)) if file is not None else {}
    init = {k: v for k, v in overrides.items() if v is not None}
    try:
        return (_file_settings(doc) if doc else ServerConfig)(**init)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise InvalidInput(f"invalid server configuration at {loc or '(root)'}: {first['msg']}") from None


def _file_settings(doc: dict[str, Any]) -> type[ServerConfig]:
    """A ServerConfig whose sources are: init kwargs, then the environment, then the file."""

    class FileServerConfig(ServerConfig):
        @classmethod
        def settings_customise_sources(  # type: ignore[override]
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, doc))

    return FileServerConfig
