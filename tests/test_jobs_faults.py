"""Faults, with counts: a worker SIGKILLed mid-batch, Redis restarted (AOF on), ``tandem serve``
killed and restarted with jobs pending on the embedded queue. Every accepted job must end with
exactly one result (the right one: each job's input is distinct and y = 2x), none lost.

The counts of each run are printed (``pytest -s`` shows them)."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import redis_support
from cloud_support import ServerThread, request
from jobs_support import (
    ASYNC,
    make_jobs_repository,
    slow_body,
    start_tandem,
    stop,
    submit,
    wait_done,
    wait_for,
    wait_line,
)
from redis_support import RedisServer
from support import free_port
from tandem.shared import protocol as p
from test_jobs_redis import Workers, _config, _redis, _stream_backlog

redis_server = redis_support.redis_server  # the fixture: a real redis-server per test

@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    return make_jobs_repository(tmp_path_factory.mktemp("jobs-faults") / "repo", keys[0])


def _check_results(url: str, jobs: dict[str, float], timeout: float = 300.0) -> None:
    """Every job succeeded, and its result is its own: y = 2 * its value."""
    for job_id, value in jobs.items():
        doc = wait_done(url, job_id, timeout=timeout)
        assert doc["status"] == "succeeded", doc
        status, _, body = request(url, "GET", f"/v1/jobs/{job_id}/result")
        assert status == 200
        np.testing.assert_array_equal(p.InferResponse.from_wire(body).outputs["y"], np.full((1, 8), 2 * value, np.float32))


def _consumer_pending(redis: RedisServer, name: str) -> int:
    r = _redis(redis)
    try:
        total = 0
        for n in range(10):
            s = f"tandem:stream:{n}"
            if r.exists(s):
                for c in r.xpending(s, "tandem-workers")["consumers"]:
                    if c["name"] in (name, name.encode()):
                        total += int(c["pending"])
        return total
    finally:
        r.close()


def _stats(redis: RedisServer) -> dict[str, int]:
    r = _redis(redis)
    try:
        return {k.decode(): int(v) for k, v in r.hgetall("tandem:stats").items()}
    finally:
        r.close()


def test_sigkill_a_worker_mid_batch_loses_nothing(
    repo: Path, keys: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path
) -> None:
    w = Workers(repo, keys, redis_server, tmp_path)
    try:
        with ServerThread(_config(repo, keys, redis_server)) as s:
            jobs: dict[str, float] = {}
            for i in range(60):
                status, _, doc = submit(s.url, p.infer_path("slow"), slow_body(float(i + 1), work=60))
                assert status == 202
                jobs[doc["id"]] = float(i + 1)
            victim = w.start("victim", "--claim", "4")
            wait_for(lambda: _consumer_pending(redis_server, "victim") > 0, 120, "the victim to hold claimed jobs")
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
            held = _consumer_pending(redis_server, "victim")
            w.start("survivor", "--claim", "4")
            _check_results(s.url, jobs)
            wait_for(lambda: _stream_backlog(redis_server) == (0, 0), 120, "every entry acknowledged")
            stats = _stats(redis_server)
            print(f"\nSIGKILL worker: accepted {len(jobs)}, entries held by the killed worker {held}, "
                  f"results stored {stats.get('results', 0)}, re-runs absorbed {stats.get('repeats', 0)}, succeeded {len(jobs)}")
            assert held > 0
            assert stats.get("results", 0) == len(jobs)  # exactly one result per job
    finally:
        w.stop_all()


def test_restart_redis_while_jobs_run_loses_nothing(
    repo: Path, keys: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path
) -> None:
    w = Workers(repo, keys, redis_server, tmp_path)
    try:
        with ServerThread(_config(repo, keys, redis_server)) as s:
            jobs: dict[str, float] = {}
            for i in range(40):
                status, _, doc = submit(s.url, p.infer_path("slow"), slow_body(float(i + 1), work=60))
                assert status == 202
                jobs[doc["id"]] = float(i + 1)
            w.start("w1", "--claim", "2")
            wait_for(lambda: _stats(redis_server).get("results", 0) > 0, 120, "the first results")
            done_before = _stats(redis_server).get("results", 0)
            redis_server.stop()  # SIGTERM: Redis writes its AOF and exits
            refused = 0
            for i in range(3):
                status, headers, _ = request(s.url, "POST", p.infer_path("slow"), slow_body(100.0 + i), ASYNC)
                assert status == 503 and headers["Retry-After"]
                refused += 1
            redis_server.start()
            for i in range(10):  # accepted after the restart
                status, _, doc = submit(s.url, p.infer_path("slow"), slow_body(float(200 + i), work=1))
                assert status == 202
                jobs[doc["id"]] = float(200 + i)
            _check_results(s.url, jobs)
            wait_for(lambda: _stream_backlog(redis_server) == (0, 0), 120, "every entry acknowledged")
            stats = _stats(redis_server)
            print(f"\nRedis restart: accepted {len(jobs)}, finished before the restart {done_before}, refused while down {refused}, results stored "
                  f"{stats.get('results', 0)}, re-runs absorbed {stats.get('repeats', 0)}, succeeded {len(jobs)}")
            assert stats.get("results", 0) == len(jobs)
    finally:
        w.stop_all()


def test_restart_serve_with_jobs_pending_on_the_embedded_queue(repo: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    store = tmp_path / "jobs.sqlite3"
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"jobs": {"store_path": str(store)}, "access_log": False}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--repository", str(repo), "--trusted-key", str(keys[1]), "--port", str(port), "--config", str(config)]
    log = tmp_path / "serve1.log"
    proc = start_tandem(args, log)
    try:
        wait_line(proc, log, "ready ", timeout=180)
        jobs: dict[str, float] = {}
        for i in range(40):
            status, _, doc = submit(url, p.infer_path("slow"), slow_body(float(i + 1), work=400))
            assert status == 202
            jobs[doc["id"]] = float(i + 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        db = sqlite3.connect(store)
        try:
            before = dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        finally:
            db.close()
        unfinished = before.get("queued", 0) + before.get("running", 0)
        log = tmp_path / "serve2.log"
        proc = start_tandem(args, log)
        wait_line(proc, log, "ready ", timeout=180)
        _check_results(url, jobs)
        db = sqlite3.connect(store)
        try:
            rows = db.execute("SELECT id, status, COUNT(*) OVER (PARTITION BY id) FROM jobs").fetchall()
        finally:
            db.close()
        assert sorted(r[0] for r in rows) == sorted(jobs) and all(r[1] == "succeeded" and r[2] == 1 for r in rows)
        print(f"\nserve SIGKILL + restart (embedded): accepted {len(jobs)}, unfinished at the kill {unfinished} "
              f"({before}), succeeded after the restart {len(rows)}, rows per job 1")
        assert unfinished > 0
    finally:
        stop(proc)
