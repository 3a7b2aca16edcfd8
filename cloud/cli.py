"""``tandem serve``: parse the arguments; the server's lifecycle is cloud/server.py's.

Cheap to import: aiohttp, onnxruntime and the server modules are imported inside ``_run``.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["serve", "batch", "worker"]


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
    parser.add_argument(
        "--allow-empty", action="store_true", default=None,
        help="start even if the repository yields no loadable model (load models later over /v2/repository)",
    )
    parser.add_argument(
        "--jobs-queue", default=None, metavar="URL",
        help="queue of asynchronous jobs: 'embedded' (default: SQLite beside the repository, run here) or "
        "redis://host:port/db (run by tandem worker processes)",
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
        allow_empty=args.allow_empty,
        providers=[s.strip() for s in args.providers.split(",") if s.strip()] if args.providers else None,
    )
    config = _with_jobs_queue(config, args.jobs_queue)
    if not config.insecure_skip_signature and not config.trusted_keys:
        from tandem.shared.errors import InvalidInput

        raise InvalidInput("give --trusted-key PUB.pem (or --insecure-skip-signature to load unsigned bundles knowingly)")
    from .server import main

    return main(config)


def batch(parser: argparse.ArgumentParser) -> None:
    """Run a model over a file of inputs offline, resumably (.npy, .npz, Parquet, JSONL)."""
    parser.add_argument(
        "model", metavar="MODEL",
        help="a bundle directory, or with --repository: NAME or NAME:VERSION in it (with --queue: the served model)",
    )
    parser.add_argument("input", metavar="INPUT", help="rows to run: .npy, .npz, .jsonl/.ndjson or .parquet/.pq")
    parser.add_argument(
        "output", metavar="OUTPUT",
        help="results in input order: .npy/.npz for array inputs, .jsonl/.parquet for table inputs",
    )
    parser.add_argument("--repository", default=None, help="model repository: REPO/<model>/<version>/ bundles")
    parser.add_argument("--trusted-key", action="append", dest="trusted_keys", metavar="PUB.pem", default=[],
                        help="public key that may sign the bundle (repeatable)")
    parser.add_argument("--insecure-skip-signature", action="store_true",
                        help="load the bundle without checking its signature (hashes are still checked)")
    parser.add_argument("--variant", default="cloud", help="the bundle variant to run: a role or a name (default cloud)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per inference call or job (default 64)")
    parser.add_argument("--chunk-rows", type=int, default=None,
                        help="rows per saved chunk: the most an interrupted run computes again (default: about 2 s of "
                        "compute, measured on the first rows; 8192 with --queue)")
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime intra-op threads (default: the cores this process may use)")
    parser.add_argument("--work-dir", default=None, help="where chunks and the journal live (default .OUTPUT.tandem-batch)")
    parser.add_argument("--restart", action="store_true", help="discard an unfinished run's work and start over")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    parser.add_argument("--queue", default=None, metavar="URL",
                        help="submit the rows as jobs to the tandem serve at URL instead of running them here")
    parser.add_argument("--api-key", default=None, help="bearer token for --queue")
    parser.add_argument("--priority", type=int, default=None, help="job priority with --queue (0..9)")
    parser.set_defaults(run=_batch)


def _batch(args: argparse.Namespace) -> int:
    from .batch import main

    return main(args)


def _with_jobs_queue(config: Any, url: str | None) -> Any:
    """``config`` with ``jobs.queue`` set to ``url`` (checked like the config file's), if given."""
    if url is None:
        return config
    from pydantic import ValidationError

    from tandem.shared.errors import InvalidInput

    from .config import JobsConfig

    try:
        jobs = JobsConfig.model_validate({**config.jobs.model_dump(), "queue": url})
    except ValidationError as e:
        raise InvalidInput(f"--jobs-queue / --queue: {e.errors()[0]['msg']}") from None
    return config.model_copy(update={"jobs": jobs})


def worker(parser: argparse.ArgumentParser) -> None:
    """Run the jobs of a Redis job queue with the models of a repository (any number of workers, any machines)."""
    parser.add_argument("--queue", required=True, metavar="URL", help="the job queue: redis://host:port/db")
    parser.add_argument("--repository", required=False, help="model repository: REPO/<model>/<version>/ bundles")
    parser.add_argument("--trusted-key", action="append", dest="trusted_keys", metavar="PUB.pem", help="public key that may sign bundles (repeatable)")
    parser.add_argument("--insecure-skip-signature", action="store_true", default=None, help="load bundles without checking signatures (hashes are still checked)")
    parser.add_argument("--name", default=None, help="consumer name in the queue's group (default: host-pid); unique per live worker")
    parser.add_argument("--config", default=None, help="config file (.toml, .yaml, .json): batching, instances, jobs.* (claim timeout, result TTL)")
    parser.add_argument("--instances", type=int, default=None, help="onnxruntime sessions per model version")
    # 64: worker._CLAIM (not imported here: this module stays cheap to import; a test ties the two)
    parser.add_argument("--claim", type=int, default=64, help="jobs claimed from the queue at once (default 64); they run in batches of the model's max_batch_size")
    parser.set_defaults(run=_worker)


def _worker(args: argparse.Namespace) -> int:
    from .config import load_config

    config = load_config(
        args.config, repository=args.repository, trusted_keys=args.trusted_keys,
        insecure_skip_signature=args.insecure_skip_signature, instances=args.instances,
    )
    config = _with_jobs_queue(config, args.queue)
    if not config.insecure_skip_signature and not config.trusted_keys:
        from tandem.shared.errors import InvalidInput

        raise InvalidInput("give --trusted-key PUB.pem (or --insecure-skip-signature to load unsigned bundles knowingly)")
    from .worker import run_worker

    return run_worker(config, config.jobs.queue, name=args.name, claim=args.claim)
