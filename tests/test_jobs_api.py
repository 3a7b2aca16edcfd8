"""The asynchronous job API on the embedded queue: round trips in both protocols, idempotency,
priorities, callbacks, result expiry and bad input, against a real server over real sockets."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import numpy as np
import pytest
from aiohttp import web

from cloud_support import ServerThread, request
from jobs_support import (
    ASYNC,
    digits_body,
    job_status,
    make_jobs_repository,
    slow_body,
    submit,
    wait_done,
    wait_for,
)
from support import free_port
from tandem.cloud.config import load_config
from tandem.cloud.job_queue import JobRecord, SqliteJobQueue, request_hash
from tandem.shared import protocol as p
from tandem.shared.jobs import new_job_id
from tandem.shared.tensors import unpackb

#: Rounds of the slow model's request that holds it busy while a test queues jobs behind it:
#: about 3 s here (more on a loaded machine), longer than any run of submits in these tests takes.
HOLD_WORK = 3000


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    return make_jobs_repository(tmp_path_factory.mktemp("jobs") / "repo", keys[0])


def _config(repo: Path, keys: tuple[Path, Path], tmp_path: Path, **overrides: Any) -> Any:
    jobs = {"store_path": tmp_path / "jobs.sqlite3", **overrides.pop("jobs", {})}
    return load_config(repository=repo, trusted_keys=[keys[1]], port=free_port(), access_log=False, jobs=jobs, **overrides)


@pytest.fixture
def server(repo: Path, keys: tuple[Path, Path], tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(_config(repo, keys, tmp_path)) as s:
        yield s


def _result(url: str, job_id: str) -> tuple[int, dict[str, str], bytes]:
    return request(url, "GET", f"/v1/jobs/{job_id}/result")


# --- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [None, "1"])
def test_native_submit_answers_202_and_the_result_is_the_synchronous_answer(server: ServerThread, version: str | None) -> None:
    _, body = digits_body(3)
    sync_status, sync_headers, sync_body = request(server.url, "POST", p.infer_path("digits", version), body)
    assert sync_status == 200
    status, headers, doc = submit(server.url, p.infer_path("digits", version), body)
    assert status == 202, doc
    assert headers["Location"] == f"/v1/jobs/{doc['id']}"
    assert headers["Preference-Applied"] == "respond-async"
    assert headers["Content-Type"].startswith("application/json")
    assert doc["model"] == "digits" and doc["version"] == "1" and doc["status"] in ("queued", "running", "succeeded")
    assert doc["priority"] == 0 and doc["error"] is None and isinstance(doc["created"], float)
    done = wait_done(server.url, doc["id"])
    assert done["status"] == "succeeded" and done["result"] == f"/v1/jobs/{doc['id']}/result"
    assert done["started"] >= done["created"] and done["finished"] >= done["started"]
    assert done["expires"] == pytest.approx(done["finished"] + 24 * 3600, abs=1)
    rstatus, rheaders, rbody = _result(server.url, doc["id"])
    assert rstatus == 200 and rheaders["Content-Type"] == sync_headers["Content-Type"] == p.CONTENT_TYPE
    got, want = unpackb(rbody), unpackb(sync_body)
    assert got["model_name"] == want["model_name"] and got["model_version"] == want["model_version"]
    np.testing.assert_allclose(
        p.InferResponse.from_wire(rbody).outputs["logits"], p.InferResponse.from_wire(sync_body).outputs["logits"], rtol=1e-5, atol=1e-6
    )


def test_v2_json_and_binary_submits_answer_as_v2(server: ServerThread) -> None:
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    doc = {"id": "r1", "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64], "data": x.ravel().tolist()}]}
    body = json.dumps(doc).encode()
    sync = request(server.url, "POST", "/v2/models/digits/infer", body, {"Content-Type": "application/json"})
    status, headers, sub = submit(server.url, "/v2/models/digits/versions/1/infer", body, {"Content-Type": "application/json"})
    assert status == 202 and headers["Location"] == f"/v1/jobs/{sub['id']}"
    wait_done(server.url, sub["id"])
    rstatus, rheaders, rbody = _result(server.url, sub["id"])
    assert rstatus == 200 and rheaders["Content-Type"] == sync[1]["Content-Type"]
    got, want = json.loads(rbody), json.loads(sync[2])
    assert got["id"] == want["id"] == "r1" and got["model_name"] == "digits"
    np.testing.assert_allclose(got["outputs"][0]["data"], want["outputs"][0]["data"], rtol=1e-5, atol=1e-6)

    # The binary tensor extension: header length travels with the job, the answer is binary too.
    head = json.dumps({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64], "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }).encode()
    hdrs = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    sync = request(server.url, "POST", "/v2/models/digits/infer", head + x.tobytes(), hdrs)
    assert sync[0] == 200
    status, _, sub = submit(server.url, "/v2/models/digits/infer", head + x.tobytes(), hdrs)
    assert status == 202
    wait_done(server.url, sub["id"])
    rstatus, rheaders, rbody = _result(server.url, sub["id"])
    assert rstatus == 200
    n = int(rheaders["Inference-Header-Content-Length"])
    assert n == int(sync[1]["Inference-Header-Content-Length"])
    got_head = json.loads(rbody[:n])
    assert got_head["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4
    np.testing.assert_allclose(np.frombuffer(rbody[n:], np.float32), np.frombuffer(sync[2][n:], np.float32), rtol=1e-5, atol=1e-6)


def test_a_job_failing_at_run_time_answers_the_synchronous_error(server: ServerThread) -> None:
    """A stored job whose request no longer runs (here: a version since unloaded) fails with the
    status and body the synchronous call would answer, msgpack on the native protocol."""
    from tandem.cloud.job_routes import JOBS_KEY

    service = server.app[JOBS_KEY]
    _, body = digits_body(1)
    job = JobRecord(
        id=new_job_id(), model="digits", version="9", protocol="v1", body=body, header_length=None, rows=1,
        priority=0, created=time.time(), body_hash=request_hash("v1", "digits", "9", None, body),
    )
    server.call(service.queue.put(job, 100))
    done = wait_done(server.url, job.id)
    assert done["status"] == "failed" and done["error"]["code"] == "model_not_found" and done["error"]["status"] == 404
    status, headers, raw = _result(server.url, job.id)
    sync = request(server.url, "POST", p.infer_path("digits", "9"), body)
    assert status == sync[0] == 404 and headers["Content-Type"] == sync[1]["Content-Type"] == p.CONTENT_TYPE
    assert unpackb(raw) == unpackb(sync[2])


def test_priority_header_is_the_jobs_priority(server: ServerThread) -> None:
    _, body = digits_body(1)
    status, _, doc = submit(server.url, p.infer_path("digits"), body, {"X-Tandem-Priority": "9"})
    assert status == 202 and doc["priority"] == 9
    assert wait_done(server.url, doc["id"])["status"] == "succeeded"


def test_many_jobs_coalesce_into_full_batches(server: ServerThread) -> None:
    """Jobs queued together run in batches of up to max_batch_size rows, each answered its own rows."""
    state = server.state
    served = state.repository.get("slow")
    ids = []
    # Hold the model with online work so the jobs queue up, then let them go together.
    hold = threading.Thread(target=request, args=(server.url, "POST", p.infer_path("slow"), slow_body(0.0, work=HOLD_WORK)))
    hold.start()
    wait_for(lambda: served.batcher.pending > 0, 60, "the holding request to run")
    values = [float(i + 1) for i in range(40)]
    for v in values:
        status, _, doc = submit(server.url, p.infer_path("slow"), slow_body(v))
        assert status == 202
        ids.append(doc["id"])
    hold.join(120)
    sizes = set()
    for v, job_id in zip(values, ids):
        wait_done(server.url, job_id)
        rstatus, rheaders, rbody = _result(server.url, job_id)
        assert rstatus == 200
        np.testing.assert_array_equal(p.InferResponse.from_wire(rbody).outputs["y"], np.full((1, 8), 2 * v, np.float32))
        sizes.add(int(rheaders[p.HEADER_BATCH_SIZE]))
    assert max(sizes) > 1, sizes  # several jobs shared a batch


# --- idempotency --------------------------------------------------------------------------------


def test_idempotency_key_returns_the_same_job_and_refuses_another_body(server: ServerThread, tmp_path: Path) -> None:
    _, body = digits_body(1, seed=5)
    key = {"Idempotency-Key": "order-17:a.b_c"}
    s1, h1, d1 = submit(server.url, p.infer_path("digits"), body, key)
    s2, h2, d2 = submit(server.url, p.infer_path("digits"), body, key)
    assert s1 == 202 and s2 in (200, 202) and d2["id"] == d1["id"] and h2["Location"] == h1["Location"]
    wait_done(server.url, d1["id"])
    s3, _, d3 = submit(server.url, p.infer_path("digits"), body, key)
    assert s3 == 200 and d3["id"] == d1["id"] and d3["status"] == "succeeded"
    _, other = digits_body(1, seed=6)
    s4, _, d4 = submit(server.url, p.infer_path("digits"), other, key)
    assert s4 == 409 and d4["code"] == "idempotency_conflict"
    # The same key on another model is another job.
    s5, _, d5 = submit(server.url, p.infer_path("slow"), slow_body(1.0), key)
    assert s5 == 202 and d5["id"] != d1["id"]
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    try:
        (n,) = db.execute("SELECT COUNT(*) FROM jobs WHERE idem_key = ?", ("order-17:a.b_c",)).fetchone()
    finally:
        db.close()
    assert n == 2


# --- priorities -----------------------------------------------------------------------------------


def test_embedded_queue_claims_higher_priority_first_then_oldest(tmp_path: Path) -> None:
    async def main() -> list[str]:
        q = SqliteJobQueue(tmp_path / "q.sqlite3")
        try:
            order = [(0, "a"), (5, "b"), (0, "c"), (9, "d"), (5, "e")]
            ids = {}
            for prio, tag in order:
                job = JobRecord(
                    id=new_job_id(), model="m", version=None, protocol="v1", body=b"x", header_length=None, rows=1,
                    priority=prio, created=time.time(), body_hash=request_hash("v1", "m", None, None, tag.encode()),
                )
                ids[job.id] = tag
                await q.put(job, 100)
            claimed = []
            for _ in range(5):
                claimed.extend(ids[j.id] for j in await q.claim(1, 0))
            assert await q.claim(1, 0) == []
            return claimed
        finally:
            await q.close()

    assert asyncio.run(main()) == ["d", "b", "e", "a", "c"]


def test_online_requests_run_before_queued_jobs(server: ServerThread) -> None:
    """An online request waits behind at most one job batch, however many jobs are queued."""
    served = server.state.repository.get("slow")
    hold = threading.Thread(target=request, args=(server.url, "POST", p.infer_path("slow"), slow_body(0.0, work=HOLD_WORK)))
    hold.start()
    wait_for(lambda: served.batcher.pending > 0, 60, "the holding request to run")
    ids = [submit(server.url, p.infer_path("slow"), slow_body(float(i), work=300, rows=16))[2]["id"] for i in range(6)]
    online: dict[str, float] = {}

    def call() -> None:
        status = request(server.url, "POST", p.infer_path("slow"), slow_body(7.0, work=1), timeout=120)[0]
        online["status"], online["at"] = status, time.time()

    t = threading.Thread(target=call)
    t.start()
    t.join(120)
    hold.join(120)
    docs = [wait_done(server.url, i) for i in ids]
    assert online["status"] == 200
    # Six jobs of 16 rows make at least three batches; the online request went before all but one.
    after = [d for d in docs if d["finished"] > online["at"]]
    assert len(after) >= 2, (online["at"], [d["finished"] for d in docs])


# --- callbacks -----------------------------------------------------------------------------------


class _Receiver:
    """A tiny aiohttp server on 127.0.0.1 that records POSTed JSON, failing the first ``fail`` times."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.calls: list[Any] = []
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: Any = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.calls.append(await request.json())
        if len(self.calls) <= self.fail:
            return web.Response(status=503)
        return web.Response(status=204)

    def __enter__(self) -> Self:
        self.thread.start()

        async def start() -> None:
            app = web.Application()
            app.router.add_post("/hook", self._handle)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


def test_callback_receives_the_final_status_document_with_retries(server: ServerThread) -> None:
    with _Receiver(fail=2) as hook:
        _, body = digits_body(1)
        status, _, doc = submit(server.url, p.infer_path("digits"), body, {"X-Tandem-Callback": hook.url})
        assert status == 202
        wait_for(lambda: len(hook.calls) >= 3, 60, "the third callback attempt")
        time.sleep(0.5)  # nothing more may come after the accepted attempt
        assert len(hook.calls) == 3
        final = hook.calls[-1]
        assert final["id"] == doc["id"] and final["status"] == "succeeded" and final["result"] == f"/v1/jobs/{doc['id']}/result"


# --- expiry ----------------------------------------------------------------------------------------


def test_results_expire_after_the_ttl(repo: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    with ServerThread(_config(repo, keys, tmp_path, jobs={"result_ttl_s": 1.0})) as s:
        _, body = digits_body(1)
        _, _, doc = submit(s.url, p.infer_path("digits"), body)
        done = wait_done(s.url, doc["id"])
        assert done["expires"] == pytest.approx(done["finished"] + 1.0, abs=0.01)
        wait_for(lambda: job_status(s.url, doc["id"])[0] == 404, 60, "the job to expire")
        assert _result(s.url, doc["id"])[0] == 404
        assert request(s.url, "DELETE", f"/v1/jobs/{doc['id']}")[0] == 404


# --- delete ------------------------------------------------------------------------------------------


def test_delete_forgets_a_finished_job_and_cancels_a_queued_one(server: ServerThread) -> None:
    _, body = digits_body(1)
    _, _, doc = submit(server.url, p.infer_path("digits"), body)
    wait_done(server.url, doc["id"])
    assert request(server.url, "DELETE", f"/v1/jobs/{doc['id']}")[0] == 204
    assert job_status(server.url, doc["id"])[0] == 404
    assert request(server.url, "DELETE", f"/v1/jobs/{doc['id']}")[0] == 404

    served = server.state.repository.get("slow")
    hold = threading.Thread(target=request, args=(server.url, "POST", p.infer_path("slow"), slow_body(0.0, work=HOLD_WORK)))
    hold.start()
    wait_for(lambda: served.batcher.pending > 0, 60, "the holding request to run")
    # Two claimed groups may wait on the held model; the third submit stays queued in the store.
    first = [submit(server.url, p.infer_path("slow"), slow_body(1.0))[2]["id"] for _ in range(2)]
    time.sleep(0.3)
    _, _, queued = submit(server.url, p.infer_path("slow"), slow_body(3.0))
    if job_status(server.url, queued["id"])[1]["status"] == "queued":
        status, headers, raw = _result(server.url, queued["id"])
        assert status == 202 and headers["Retry-After"] == "1" and json.loads(raw)["status"] in ("queued", "running")
    assert request(server.url, "DELETE", f"/v1/jobs/{queued['id']}")[0] == 204
    hold.join(120)
    for i in first:
        wait_done(server.url, i)
    assert job_status(server.url, queued["id"])[0] == 404


# --- bad input ------------------------------------------------------------------------------------------


def test_bad_ids_answer_404_and_400_with_the_usual_body(server: ServerThread) -> None:
    for path in ("/v1/jobs/" + "0" * 32, "/v1/jobs/" + "0" * 32 + "/result"):
        status, headers, raw = request(server.url, "GET", path)
        assert status == 404 and json.loads(raw)["code"] == "not_found" and headers["Content-Type"] == "application/json"
    for bad in ("xyz", "0" * 31, "0" * 33, "G" * 32, "..%2F..%2Fetc"):
        status, _, raw = request(server.url, "GET", f"/v1/jobs/{bad}")
        assert status == 400 and json.loads(raw)["code"] == "invalid_input", (bad, raw)
        assert request(server.url, "DELETE", f"/v1/jobs/{bad}")[0] == 400
    assert request(server.url, "DELETE", "/v1/jobs/" + "0" * 32)[0] == 404


def _count_jobs(tmp_path: Path) -> int:
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    try:
        return db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    finally:
        db.close()


def test_malformed_submits_answer_as_the_synchronous_call_and_make_no_job(server: ServerThread, tmp_path: Path) -> None:
    before = _count_jobs(tmp_path)
    _, good = digits_body(1)
    cases = [
        (p.infer_path("nope"), good, {}, 404, "model_not_found"),
        (p.infer_path("digits", "7"), good, {}, 404, "model_not_found"),
        (p.infer_path("digits"), b"\xc1garbage", {}, 400, None),
        (p.infer_path("digits"), p.InferRequest({"input": np.ones((1, 63), np.float32)}).to_wire(), {}, 400, "invalid_input"),
        (p.infer_path("digits"), p.InferRequest({"input": np.ones((1, 64), np.float64)}).to_wire(), {}, 400, "bad_tensor"),
        (p.infer_path("digits"), p.InferRequest({"input": np.ones((1, 64), np.float32)}, outputs=["nope"]).to_wire(), {}, 400, "invalid_input"),
        (p.infer_path("digits"), p.InferRequest({"input": np.ones((33, 64), np.float32)}).to_wire(), {}, 400, "invalid_input"),
        (p.infer_path("digits"), good, {"X-Tandem-Callback": "ftp://example.com/x"}, 400, "invalid_input"),
        (p.infer_path("digits"), good, {"X-Tandem-Callback": "file:///etc/passwd"}, 400, "invalid_input"),
        (p.infer_path("digits"), good, {"X-Tandem-Callback": "not a url"}, 400, "invalid_input"),
        (p.infer_path("digits"), good, {"Idempotency-Key": "bad key!"}, 400, "invalid_input"),
        (p.infer_path("digits"), good, {"Idempotency-Key": "k" * 129}, 400, "invalid_input"),
        (p.infer_path("digits"), good, {"X-Tandem-Priority": "high"}, 400, "invalid_input"),
        (p.infer_path("digits"), good, {"X-Tandem-Priority": "10"}, 400, "invalid_input"),
        (p.infer_path("digits"), good, {"X-Tandem-Priority": "-1"}, 400, "invalid_input"),
        ("/v2/models/digits/infer", b"{not json", {}, 400, None),
        ("/v2/models/digits/infer", b'{"inputs": []}', {}, 400, None),
    ]
    for path, body, headers, want, code in cases:
        status, h, raw = request(server.url, "POST", path, body, {**ASYNC, **headers})
        assert status == want, (path, headers, status, raw)
        doc = unpackb(raw) if path.startswith("/v1/") else json.loads(raw)
        assert "error" in doc and (code is None or doc["code"] == code), (path, headers, doc)
        if path.startswith("/v1/models/"):
            assert h["Content-Type"] == p.CONTENT_TYPE  # the native route's error body, as the sync call
    assert _count_jobs(tmp_path) == before


def test_oversize_payload_is_refused_413(repo: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    with ServerThread(_config(repo, keys, tmp_path, jobs={"max_payload_bytes": 4096})) as s:
        body = p.InferRequest({"input": np.ones((32, 64), np.float32)}).to_wire()  # ~8 KB
        assert len(body) > 4096
        status, _, raw = request(s.url, "POST", p.infer_path("digits"), body, ASYNC)
        assert status == 413 and unpackb(raw)["code"] == "payload_too_large"
        assert request(s.url, "POST", p.infer_path("digits"), body)[0] == 200  # the online limit is another
        assert _count_jobs(tmp_path) == 0


def test_queue_bound_answers_503_with_retry_after(repo: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    with ServerThread(_config(repo, keys, tmp_path, jobs={"max_queued": 2})) as s:
        served = s.state.repository.get("slow")
        hold = threading.Thread(target=request, args=(s.url, "POST", p.infer_path("slow"), slow_body(0.0, work=HOLD_WORK)))
        hold.start()
        wait_for(lambda: served.batcher.pending > 0, 60, "the holding request to run")
        statuses = [request(s.url, "POST", p.infer_path("slow"), slow_body(1.0), ASYNC) for _ in range(3)]
        hold.join(120)
        assert [st for st, _, _ in statuses[:2]] == [202, 202]
        status, headers, raw = statuses[2]
        assert status == 503 and headers["Retry-After"] and unpackb(raw)["code"] == "overloaded"


def test_job_routes_need_the_api_key(repo: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    with ServerThread(_config(repo, keys, tmp_path, api_keys=["sekrit"])) as s:
        _, body = digits_body(1)
        auth = {"Authorization": "Bearer sekrit"}
        assert request(s.url, "POST", p.infer_path("digits"), body, ASYNC)[0] == 401
        status, _, doc = submit(s.url, p.infer_path("digits"), body, auth)
        assert status == 202
        assert request(s.url, "GET", f"/v1/jobs/{doc['id']}")[0] == 401
        assert request(s.url, "GET", f"/v1/jobs/{doc['id']}/result")[0] == 401
        assert request(s.url, "DELETE", f"/v1/jobs/{doc['id']}")[0] == 401
        assert wait_done(s.url, doc["id"], headers=auth)["status"] == "succeeded"
        assert request(s.url, "GET", f"/v1/jobs/{doc['id']}/result", headers=auth)[0] == 200


def test_the_store_is_never_created_in_a_missing_directory(repo: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    from tandem.shared.errors import InvalidInput

    missing = tmp_path / "nope" / "jobs.sqlite3"
    with pytest.raises(InvalidInput, match="does not exist"):
        ServerThread(_config(repo, keys, tmp_path, jobs={"store_path": missing}))
    assert not missing.parent.exists()
