"""The job API on Redis Streams: ``tandem serve`` submits, real ``tandem worker`` processes run the
jobs, against a real redis-server (AOF on) started for each test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import redis_support
from cloud_support import ServerThread, request
from jobs_support import (
    ASYNC,
    digits_body,
    job_status,
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
from tandem.cloud.config import load_config
from tandem.shared import protocol as p
from tandem.shared.tensors import unpackb

redis_server = redis_support.redis_server  # the fixture: a real redis-server per test

CLAIM_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    return make_jobs_repository(tmp_path_factory.mktemp("jobs-redis") / "repo", keys[0])


def _config(repo: Path, keys: tuple[Path, Path], redis: RedisServer, **jobs: Any) -> Any:
    return load_config(
        repository=repo, trusted_keys=[keys[1]], port=free_port(), access_log=False,
        jobs={"queue": redis.url, "claim_timeout_s": CLAIM_TIMEOUT_S, **jobs},
    )


def _config_file(tmp_path: Path, **jobs: Any) -> Path:
    path = tmp_path / "worker.json"
    path.write_text(json.dumps({"jobs": {"claim_timeout_s": CLAIM_TIMEOUT_S, **jobs}}))
    return path


class Workers:
    """``tandem worker`` processes of one test (stopped at its end)."""

    def __init__(self, repo: Path, keys: tuple[Path, Path], redis: RedisServer, tmp_path: Path) -> None:
        self.repo, self.keys, self.redis, self.tmp_path = repo, keys, redis, tmp_path
        self.procs: dict[str, Any] = {}

    def start(self, name: str, *extra: str, **jobs: Any) -> Any:
        log = self.tmp_path / f"{name}.log"
        proc = start_tandem(
            ["worker", "--queue", self.redis.url, "--repository", str(self.repo), "--trusted-key", str(self.keys[1]),
             "--name", name, "--config", str(_config_file(self.tmp_path, **jobs)), *extra],
            log,
        )
        self.procs[name] = proc
        wait_line(proc, log, "worker ", timeout=180)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop(proc)


@pytest.fixture
def workers(repo: Path, keys: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(repo, keys, redis_server, tmp_path)
    try:
        yield w
    finally:
        w.stop_all()


@pytest.fixture
def server(repo: Path, keys: tuple[Path, Path], redis_server: RedisServer) -> Iterator[ServerThread]:
    with ServerThread(_config(repo, keys, redis_server)) as s:
        yield s


def _redis(redis: RedisServer) -> Any:
    import redis as redis_lib

    return redis_lib.Redis.from_url(redis.url)


def _stream_backlog(redis: RedisServer) -> tuple[int, int]:
    """(entries in the job streams, entries pending in the group) over every priority."""
    r = _redis(redis)
    try:
        streams = [f"tandem:stream:{n}" for n in range(10)]
        length = sum(r.xlen(s) for s in streams)
        pending = sum(r.xpending(s, "tandem-workers")["pending"] for s in streams if r.exists(s))
        return length, pending
    finally:
        r.close()


def test_round_trips_in_both_protocols_through_a_worker(server: ServerThread, workers: Workers) -> None:
    workers.start("w1")
    x, body = digits_body(4)
    sync = request(server.url, "POST", p.infer_path("digits"), body)
    status, headers, doc = submit(server.url, p.infer_path("digits"), body)
    assert status == 202 and headers["Location"] == f"/v1/jobs/{doc['id']}" and headers["Preference-Applied"] == "respond-async"
    done = wait_done(server.url, doc["id"])
    assert done["status"] == "succeeded" and done["version"] == "1"
    rstatus, rheaders, rbody = request(server.url, "GET", f"/v1/jobs/{doc['id']}/result")
    assert rstatus == 200 and rheaders["Content-Type"] == p.CONTENT_TYPE
    np.testing.assert_allclose(
        p.InferResponse.from_wire(rbody).outputs["logits"], p.InferResponse.from_wire(sync[2]).outputs["logits"], rtol=1e-5, atol=1e-6
    )
    v2 = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 64], "data": x.ravel().tolist()}]}).encode()
    status, _, doc2 = submit(server.url, "/v2/models/digits/versions/1/infer", v2)
    assert status == 202
    wait_done(server.url, doc2["id"])
    rstatus, rheaders, rbody = request(server.url, "GET", f"/v1/jobs/{doc2['id']}/result")
    assert rstatus == 200 and rheaders["Content-Type"].startswith("application/json")
    np.testing.assert_allclose(
        np.array(json.loads(rbody)["outputs"][0]["data"]).reshape(4, 10),
        p.InferResponse.from_wire(sync[2]).outputs["logits"], rtol=1e-5, atol=1e-6,
    )


def test_a_worker_runs_its_claimed_jobs_as_one_batch_and_answers_each_as_the_sync_call(
    server: ServerThread, workers: Workers
) -> None:
    """Jobs queued before the worker starts are claimed as one group and coalesced into one batch
    (4 + 3 + 5 + 2 + 4 rows): each answer is still the job's own, as its synchronous call gives it."""
    sizes = [4, 3, 5, 2, 4]
    bodies = [p.InferRequest({"input": digits_body(n, seed=20 + i)[0]}, id="mine" if i == 1 else None).to_wire()
              for i, n in enumerate(sizes)]
    ids = [submit(server.url, p.infer_path("digits"), body)[2]["id"] for body in bodies[:-1]]
    x, _ = digits_body(sizes[-1], seed=20 + len(sizes) - 1)
    v2_body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}).encode()
    ids.append(submit(server.url, "/v2/models/digits/versions/1/infer", v2_body)[2]["id"])
    workers.start("w1")
    for i, job_id in enumerate(ids):
        assert wait_done(server.url, job_id)["status"] == "succeeded"
        status, headers, raw = request(server.url, "GET", f"/v1/jobs/{job_id}/result")
        assert status == 200 and headers[p.HEADER_BATCH_SIZE] == str(sum(sizes)), headers
        assert headers[p.HEADER_MODEL_VERSION] == "1"
        sync = p.InferResponse.from_wire(request(server.url, "POST", p.infer_path("digits"), bodies[i] if i < len(bodies) - 1 else
                                                 p.InferRequest({"input": x}).to_wire())[2])
        if i < len(sizes) - 1:
            assert headers["Content-Type"] == p.CONTENT_TYPE
            answer = p.InferResponse.from_wire(raw)
            assert answer.id == ("mine" if i == 1 else job_id) and answer.model_name == "digits"
            got = answer.outputs["logits"]
        else:
            assert headers["Content-Type"].startswith("application/json")
            got = np.array(json.loads(raw)["outputs"][0]["data"], np.float32).reshape(sizes[-1], 10)
        assert got.shape == (sizes[i], 10)
        np.testing.assert_allclose(got, sync.outputs["logits"], rtol=1e-5, atol=1e-6)


def test_request_bodies_leave_redis_with_their_jobs_and_jobs_stored_the_older_way_still_run(
    server: ServerThread, workers: Workers, redis_server: RedisServer
) -> None:
    """A body lives in its own key until its job finishes or is deleted; a job an older producer
    stored with its body in the job's hash is run all the same."""
    r = _redis(redis_server)
    try:
        _, body = digits_body(3, seed=31)
        kept = submit(server.url, p.infer_path("digits"), body)[2]["id"]
        dropped = submit(server.url, p.infer_path("digits"), body)[2]["id"]
        assert r.get(f"tandem:body:{kept}") == body and r.exists(f"tandem:body:{dropped}") == 1
        assert request(server.url, "DELETE", f"/v1/jobs/{dropped}")[0] == 204
        assert r.exists(f"tandem:body:{dropped}") == 0
        older = "0123456789abcdef0123456789abcdef"
        meta = {"model": "digits", "version": None, "protocol": "v1", "header_length": None, "rows": 3, "priority": 0,
                "created": 1.0, "body_hash": "x", "idempotency_key": None, "callback": None}
        r.hset(f"tandem:job:{older}", mapping={"meta": json.dumps(meta), "body": body, "status": "queued", "served_version": "1"})
        r.xadd("tandem:stream:0", {"id": older})
        workers.start("w1")
        sync = p.InferResponse.from_wire(request(server.url, "POST", p.infer_path("digits"), body)[2]).outputs["logits"]
        for job_id in (kept, older):
            assert wait_done(server.url, job_id)["status"] == "succeeded"
            status, _, raw = request(server.url, "GET", f"/v1/jobs/{job_id}/result")
            assert status == 200
            np.testing.assert_allclose(p.InferResponse.from_wire(raw).outputs["logits"], sync, rtol=1e-5, atol=1e-6)
        assert r.keys("tandem:body:*") == [] and r.hget(f"tandem:job:{older}", "body") == b""
        assert _stream_backlog(redis_server) == (0, 0)
    finally:
        r.close()


def test_idempotency_key_on_redis(server: ServerThread, workers: Workers, redis_server: RedisServer) -> None:
    _, body = digits_body(1, seed=3)
    key = {"Idempotency-Key": "batch-9"}
    s1, _, d1 = submit(server.url, p.infer_path("digits"), body, key)
    s2, _, d2 = submit(server.url, p.infer_path("digits"), body, key)
    assert s1 == 202 and s2 == 200 and d1["id"] == d2["id"]
    s3, _, d3 = submit(server.url, p.infer_path("digits"), digits_body(1, seed=4)[1], key)
    assert s3 == 409 and d3["code"] == "idempotency_conflict"
    assert _stream_backlog(redis_server)[0] == 1  # one job queued, not two
    workers.start("w1")
    assert wait_done(server.url, d1["id"])["status"] == "succeeded"
    s4, _, d4 = submit(server.url, p.infer_path("digits"), body, key)
    assert s4 == 200 and d4["id"] == d1["id"] and d4["status"] == "succeeded"


def test_higher_priority_jobs_run_first(server: ServerThread, workers: Workers) -> None:
    low = [submit(server.url, p.infer_path("slow"), slow_body(float(i)), {"X-Tandem-Priority": "1"})[2]["id"] for i in range(4)]
    high = [submit(server.url, p.infer_path("slow"), slow_body(float(i)), {"X-Tandem-Priority": "8"})[2]["id"] for i in range(4)]
    workers.start("w1", "--claim", "1")
    lows = [wait_done(server.url, i) for i in low]
    highs = [wait_done(server.url, i) for i in high]
    assert max(d["started"] for d in highs) <= min(d["started"] for d in lows)
    # Among equal priorities, the oldest first.
    assert [d["started"] for d in lows] == sorted(d["started"] for d in lows)


def test_delete_cancels_a_queued_job_which_no_worker_then_runs(server: ServerThread, workers: Workers, redis_server: RedisServer) -> None:
    _, _, doc = submit(server.url, p.infer_path("slow"), slow_body(5.0))
    assert request(server.url, "DELETE", f"/v1/jobs/{doc['id']}")[0] == 204
    assert job_status(server.url, doc["id"])[0] == 404
    workers.start("w1")
    _, _, other = submit(server.url, p.infer_path("slow"), slow_body(6.0))
    wait_done(server.url, other["id"])
    assert job_status(server.url, doc["id"])[0] == 404
    wait_for(lambda: _stream_backlog(redis_server) == (0, 0), 60, "the stream to empty")


def test_results_expire_on_redis(repo: Path, keys: tuple[Path, Path], redis_server: RedisServer, workers: Workers) -> None:
    workers.start("w1", result_ttl_s=1.0)
    with ServerThread(_config(repo, keys, redis_server, result_ttl_s=1.0)) as s:
        _, _, doc = submit(s.url, p.infer_path("digits"), digits_body(1)[1])
        wait_done(s.url, doc["id"])
        wait_for(lambda: job_status(s.url, doc["id"])[0] == 404, 60, "the job to expire")


def test_redis_down_answers_503_with_retry_after_and_loses_no_accepted_job(
    server: ServerThread, workers: Workers, redis_server: RedisServer
) -> None:
    _, _, accepted = submit(server.url, p.infer_path("slow"), slow_body(9.0))
    redis_server.stop()
    status, headers, raw = request(server.url, "POST", p.infer_path("slow"), slow_body(1.0), ASYNC)
    assert status == 503 and headers["Retry-After"] and unpackb(raw)["code"] == "unavailable"
    status, headers, raw = request(server.url, "GET", f"/v1/jobs/{accepted['id']}")
    assert status == 503 and headers["Retry-After"] and json.loads(raw)["code"] == "unavailable"
    redis_server.start()
    workers.start("w1")
    assert wait_done(server.url, accepted["id"])["status"] == "succeeded"
    rbody = request(server.url, "GET", f"/v1/jobs/{accepted['id']}/result")[2]
    np.testing.assert_array_equal(p.InferResponse.from_wire(rbody).outputs["y"], np.full((1, 8), 18.0, np.float32))


def test_worker_posts_the_callback(server: ServerThread, workers: Workers) -> None:
    from test_jobs_api import _Receiver

    workers.start("w1")
    with _Receiver() as hook:
        _, _, doc = submit(server.url, p.infer_path("digits"), digits_body(1)[1], {"X-Tandem-Callback": hook.url})
        wait_for(lambda: hook.calls, 60, "the callback")
        assert hook.calls[0]["id"] == doc["id"] and hook.calls[0]["status"] == "succeeded"


def test_worker_refuses_bad_arguments_clearly(repo: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    cases = [
        (["--queue", "embedded", "--repository", str(repo), "--trusted-key", str(keys[1])], "redis://"),
        (["--queue", "redis://127.0.0.1:1/0", "--repository", str(tmp_path / "missing"), "--trusted-key", str(keys[1])], "does not exist"),
        (["--queue", "redis://127.0.0.1:1/0", "--repository", str(repo)], "--trusted-key"),
        (["--queue", f"redis://127.0.0.1:{free_port()}/0", "--repository", str(repo), "--trusted-key", str(keys[1])], "unreachable"),
    ]
    for i, (args, needle) in enumerate(cases):
        log = tmp_path / f"bad{i}.log"
        proc = start_tandem(["worker", *args], log)
        code = proc.wait(180)
        text = log.read_text()
        assert code != 0 and needle in text and "Traceback" not in text, (args, text)


def test_worker_stops_on_sigterm_after_storing_what_it_holds(server: ServerThread, workers: Workers, redis_server: RedisServer) -> None:
    proc = workers.start("w1")
    ids = [submit(server.url, p.infer_path("slow"), slow_body(float(i), work=20))[2]["id"] for i in range(10)]
    wait_for(lambda: _stream_backlog(redis_server)[1] > 0 or all(job_status(server.url, i)[1]["status"] == "succeeded" for i in ids),
             60, "the worker to claim jobs")
    assert stop(proc) == 0
    log = (workers.tmp_path / "w1.log").read_text()
    assert "stopped after" in log and "Traceback" not in log
    # What it claimed it finished and acknowledged: nothing pending; anything left is still queued.
    assert _stream_backlog(redis_server)[1] == 0
    workers.start("w2")
    for i in ids:
        assert wait_done(server.url, i)["status"] == "succeeded"


def test_serve_cli_with_jobs_queue_is_a_producer(repo: Path, keys: tuple[Path, Path], redis_server: RedisServer, workers: Workers, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_tandem(
        ["serve", "--repository", str(repo), "--trusted-key", str(keys[1]), "--port", str(port), "--jobs-queue", redis_server.url],
        log,
    )
    try:
        wait_line(proc, log, "ready ", timeout=180)
        url = f"http://127.0.0.1:{port}"
        _, _, doc = submit(url, p.infer_path("slow"), slow_body(4.0))
        assert _stream_backlog(redis_server)[0] == 1  # in Redis, not run by serve
        workers.start("w1")
        assert wait_done(url, doc["id"])["status"] == "succeeded"
    finally:
        assert stop(proc) == 0
    bad = tmp_path / "bad.log"
    code = start_tandem(["serve", "--repository", str(repo), "--trusted-key", str(keys[1]), "--jobs-queue", "ftp://x"], bad).wait(120)
    assert code != 0 and "jobs.queue must be" in bad.read_text() and "Traceback" not in bad.read_text()
