"""Admission limits of the batcher through the real server: rows per request, rows in the queue,
deadlines answered while queued, refusals of work that cannot meet its deadline, the queue-wait
bound, and onnxruntime's memory after a large batch.

Timing: every check waits for events (the queue's state, an answer) and compares orders ("answered
while the blocker still computes"), with margins of seconds, never tight wall-clock bounds.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud_support import ServerThread, make_repository, slow_inputs
from support import save_onnx
from tandem.cloud.batcher import Batcher
from tandem.cloud.config import BatchingConfig, ServerConfig
from tandem.cloud.engine import ModelEngine
from tandem.shared import protocol as p
from tandem.shared.tensors import unpackb

BLOCK = 1200  # rounds of the slow model that hold its instance ~0.2 s here (more on a loaded machine)
LONG = 6000  # ~1 s here: 50x the deadlines below, and 3x the queue-wait bound


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), keys[0], toy_versions=("1",), varlen=False)


async def _server(repo: Path, keys: tuple[Path, Path], **kw: Any) -> ServerThread:
    config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, warmup_batch_sizes=[1], access_log=False, **kw)
    return await asyncio.to_thread(ServerThread(config).start)


async def _infer(
    session: aiohttp.ClientSession, s: ServerThread, model: str, inputs: dict[str, np.ndarray],
    headers: dict[str, str] | None = None, **req: Any,
) -> tuple[int, Any, dict[str, str], float]:
    async with session.post(s.url + p.infer_path(model), data=p.InferRequest(inputs, **req).to_wire(), headers=headers) as r:
        raw = await r.read()
        doc = p.InferResponse.from_wire(raw) if r.status == 200 else unpackb(raw)
        return r.status, doc, dict(r.headers), time.perf_counter()


def _v2_body(rows: int = 1, timeout_us: float | None = None) -> str:
    doc: dict[str, Any] = {"inputs": [{"name": "x", "shape": [rows, 8], "datatype": "FP32", "data": [1] * (8 * rows)},
                                      {"name": "work", "shape": [rows, 1], "datatype": "INT64", "data": [1] * rows}]}
    if timeout_us is not None:
        doc["parameters"] = {"timeout": timeout_us}
    return json.dumps(doc)


async def _wait_queue(s: ServerThread, model: str, pending: int, depth: int) -> None:
    """Wait until the server holds ``pending`` requests of which ``depth`` wait in the queue."""
    batcher = s.state.repository.get(model, "1").batcher
    for _ in range(4000):
        if batcher.pending == pending and batcher.depth == depth:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"queue never reached pending={pending} depth={depth}: {batcher.pending}/{batcher.depth}")


# --- rows per request, rows in the queue -----------------------------------------------------------


async def test_a_request_larger_than_max_batch_size_is_refused_naming_the_limit(repo: Path, keys: tuple[Path, Path]) -> None:
    s = await _server(repo, keys, model_batching={"slow": BatchingConfig(max_batch_size=4, max_request_rows=6)})
    try:
        async with aiohttp.ClientSession() as session:
            status, doc, _, _ = await _infer(session, s, "toy", {"input": np.ones((33, 64), np.float32)})
            assert status == 400 and doc["code"] == "invalid_input", doc
            assert "at most 32 rows (max_request_rows)" in doc["error"] and "this one has 33" in doc["error"], doc
            status, resp, _, _ = await _infer(session, s, "toy", {"input": np.ones((32, 64), np.float32)})
            assert status == 200 and resp.outputs["logits"].shape == (32, 10)
            # v2 speaks the same refusal in JSON
            body = {"inputs": [{"name": "input", "shape": [33, 64], "datatype": "FP32", "data": [0.5] * 33 * 64}]}
            async with session.post(s.url + "/v2/models/toy/infer", data=json.dumps(body)) as r:
                assert r.status == 400 and "at most 32 rows" in json.loads(await r.read())["error"]
            # Configured per model, beyond max_batch_size: runs as a batch of its own.
            status, resp, headers, _ = await _infer(session, s, "slow", slow_inputs(1, rows=6))
            assert status == 200 and headers[p.HEADER_BATCH_SIZE] == "6"
            status, doc, _, _ = await _infer(session, s, "slow", slow_inputs(1, rows=7))
            assert status == 400 and "at most 6 rows" in doc["error"], doc
            async with session.get(s.url + "/v2/models/slow/config") as r:
                config = json.loads(await r.read())
            assert config["max_batch_size"] == 4 and config["parameters"]["max_request_rows"] == 6
        assert s.state.repository.get("slow").batcher.pending == 0
    finally:
        await asyncio.to_thread(s.stop)


async def test_the_queue_is_bounded_in_rows(repo: Path, keys: tuple[Path, Path]) -> None:
    batching = BatchingConfig(max_batch_size=8, max_queue_rows=10)
    s = await _server(repo, keys, model_batching={"slow": batching})
    try:
        async with aiohttp.ClientSession() as session:
            blocker = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(BLOCK)))
            await _wait_queue(s, "slow", 1, 0)
            eight = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(1, rows=8)))
            await _wait_queue(s, "slow", 2, 1)
            status, doc, headers, refused_at = await _infer(session, s, "slow", slow_inputs(1, rows=4))
            assert status == 503 and doc["code"] == "overloaded", doc
            assert "queue is full (8 rows waiting, at most 10)" in doc["error"], doc
            assert int(headers[p.HEADER_RETRY_AFTER]) >= 1
            two = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(1, rows=2)))  # fits: 10 rows
            results = await asyncio.gather(blocker, eight, two)
            assert [r[0] for r in results] == [200, 200, 200]
            assert refused_at < results[0][3]  # refused at once, while the blocker still ran
    finally:
        await asyncio.to_thread(s.stop)


# --- deadlines while queued ------------------------------------------------------------------------


async def test_deadlines_are_answered_while_queued_and_free_their_place(repo: Path, keys: tuple[Path, Path]) -> None:
    """Behind a request that computes for seconds, 20 ms deadlines from the header, the body and
    v2's parameters.timeout are answered 504 while it still computes, and leave the queue then."""
    s = await _server(repo, keys, model_batching={"slow": BatchingConfig(max_batch_size=1)})
    try:
        async with aiohttp.ClientSession() as session:
            blocker = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(LONG)))
            await _wait_queue(s, "slow", 1, 0)  # computing, and no batch has finished: no estimate yet
            native = [_infer(session, s, "slow", slow_inputs(1), headers={p.HEADER_DEADLINE_MS: "20"}) for _ in range(3)]
            native.append(_infer(session, s, "slow", slow_inputs(1), deadline_ms=20.0))
            v2 = session.post(s.url + "/v2/models/slow/infer", data=_v2_body(timeout_us=20_000))
            results = await asyncio.gather(*native)
            async with v2 as r:
                v2_status, v2_doc, v2_at = r.status, json.loads(await r.read()), time.perf_counter()
            assert not blocker.done()  # every one of them was answered while the blocker computed
            batcher = s.state.repository.get("slow", "1").batcher
            assert (batcher.pending, batcher.depth) == (1, 0)  # their places are free
            status, _, _, done = await blocker
            assert status == 200
        for status, doc, headers, at in results:
            assert status == 504 and doc["code"] == "deadline_exceeded", doc
            assert p.HEADER_COMPUTE_US not in headers and at < done
        assert v2_status == 504 and "deadline" in v2_doc["error"] and v2_at < done
        text = s.state.metrics.render().decode()
        assert 'tandem_inference_exec_count_total{model="slow",version="1"} 1.0' in text  # only the blocker ran
    finally:
        await asyncio.to_thread(s.stop)


async def test_many_expired_requests_leave_no_trace_in_the_queue(tmp_path: Path, repo: Path) -> None:
    """Hundreds of requests time out behind a busy instance: all answered, counts back to 0, the
    deque compacted, and the next request is served."""
    from cloud_support import make_slow_onnx

    engine = ModelEngine(make_slow_onnx(tmp_path / "slow.onnx"), instances=1, intra_op_threads=1)
    batcher = Batcher(engine, BatchingConfig(max_batch_size=1, max_queue_size=1000), name="slow")
    try:
        blocker = batcher.submit(slow_inputs(LONG), 1)
        while batcher.depth:
            await asyncio.sleep(0.005)
        futures = [batcher.submit(slow_inputs(1), 1, timeout_s=0.02) for _ in range(500)]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        assert not blocker.done()
        assert all(type(o).__name__ == "DeadlineExceeded" for o in outcomes), {type(o).__name__ for o in outcomes}
        assert (batcher.depth, batcher.pending) == (0, 1)
        assert sum(map(len, batcher._queues)) < 500  # compacted as tombstones accumulated
        await blocker
        result = await batcher.submit(slow_inputs(1, value=3.0), 1)
        np.testing.assert_array_equal(result.outputs["y"], slow_inputs(1, value=3.0)["x"] * 2)
    finally:
        await batcher.close()


async def test_work_that_cannot_meet_its_deadline_is_refused_on_arrival(repo: Path, keys: tuple[Path, Path]) -> None:
    s = await _server(repo, keys, model_batching={"slow": BatchingConfig(max_batch_size=1)})
    try:
        async with aiohttp.ClientSession() as session:
            assert (await _infer(session, s, "slow", slow_inputs(BLOCK)))[0] == 200  # the server learns a batch's time
            blockers = [asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(BLOCK))) for _ in range(5)]
            await _wait_queue(s, "slow", 5, 4)  # one computes, ~1 s of work waits behind it
            status, doc, headers, refused_at = await _infer(session, s, "slow", slow_inputs(1), headers={p.HEADER_DEADLINE_MS: "100"})
            assert status == 503 and doc["code"] == "deadline_unreachable", doc
            assert "more than the request's deadline of 100 ms" in doc["error"], doc
            assert int(headers[p.HEADER_RETRY_AFTER]) >= 1
            async with session.post(s.url + "/v2/models/slow/infer", data=_v2_body(timeout_us=100_000)) as r:
                assert r.status == 503 and json.loads(await r.read())["code"] == "deadline_unreachable"
                assert "Retry-After" in r.headers
            # A deadline the queue can meet is admitted and served.
            patient = await _infer(session, s, "slow", slow_inputs(1), headers={p.HEADER_DEADLINE_MS: "60000"})
            assert patient[0] == 200
            results = await asyncio.gather(*blockers)
            assert all(r[0] == 200 for r in results)
            assert refused_at < results[-1][3]  # refused at once, not after the queue ahead ran
    finally:
        await asyncio.to_thread(s.stop)


# --- the queue-wait bound --------------------------------------------------------------------------


async def test_a_request_waits_in_the_queue_at_most_max_queue_wait_ms(repo: Path, keys: tuple[Path, Path]) -> None:
    batching = BatchingConfig(max_batch_size=1, max_queue_wait_ms=300)
    s = await _server(repo, keys, model_batching={"slow": batching})
    try:
        async with aiohttp.ClientSession() as session:
            blocker = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(LONG)))
            await _wait_queue(s, "slow", 1, 0)
            t0 = time.perf_counter()
            status, doc, headers, at = await _infer(session, s, "slow", slow_inputs(1))  # no deadline of its own
            assert not blocker.done()  # answered while the blocker computed
            assert status == 503 and doc["code"] == "overloaded", doc
            assert "the most max_queue_wait_ms allows" in doc["error"], doc
            assert int(headers[p.HEADER_RETRY_AFTER]) >= 1
            assert at - t0 >= 0.25  # it did wait (not refused: no batch time was known yet)
            # Its own deadline, shorter than the bound, still answers 504.
            status, doc, _, _ = await _infer(session, s, "slow", slow_inputs(1), headers={p.HEADER_DEADLINE_MS: "20"})
            assert status == 504 and doc["code"] == "deadline_exceeded", doc
            assert (await blocker)[0] == 200
            # Now the batch time is known (~1 s): behind one queued request, more than the bound's
            # worth of work waits, and a newcomer is refused on arrival (while that one waits).
            blocker = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(LONG)))
            await _wait_queue(s, "slow", 1, 0)
            queued = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(1), headers={p.HEADER_DEADLINE_MS: "60000"}))
            await _wait_queue(s, "slow", 2, 1)
            status, doc, headers, _ = await _infer(session, s, "slow", slow_inputs(1))
            assert status == 503 and "max_queue_wait_ms is 300" in doc["error"], doc
            assert not queued.done()
            assert (await queued)[0] == 503  # then shed at the bound itself, the blocker being longer
            assert (await blocker)[0] == 200
        assert s.state.repository.get("slow").batcher.pending == 0
    finally:
        await asyncio.to_thread(s.stop)


# --- memory after a large batch --------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _wide_onnx(path: Path, hidden: int = 2048) -> Path:
    """x FP32 [batch, 64] -> y FP32 [batch, 10] through a [batch, hidden] activation: 8 KB per row."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(rng.standard_normal((64, hidden)).astype(np.float32) / 8, "w1"),
         numpy_helper.from_array(rng.standard_normal((hidden, 10)).astype(np.float32) / 45, "w2")],
    )
    return save_onnx(graph, path)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
async def test_memory_returns_to_steady_state_after_a_large_batch(tmp_path: Path) -> None:
    """A 40,000-row request (max_request_rows raised) needs a ~330 MB activation; once it is
    answered, the process is back within a fraction of that of where it was."""
    engine = ModelEngine(_wide_onnx(tmp_path / "wide.onnx"), instances=1, intra_op_threads=2)
    engine.warm_up([1, 8, 32])
    batcher = Batcher(engine, BatchingConfig(max_batch_size=32, max_request_rows=40_000), name="wide")
    try:
        for _ in range(3):
            await batcher.submit({"x": np.ones((32, 64), np.float32)}, 32)
        gc.collect()
        before = _rss_mb()
        x = np.random.default_rng(1).standard_normal((40_000, 64)).astype(np.float32)
        result = await batcher.submit({"x": x}, 40_000)
        np.testing.assert_allclose(result.outputs["y"][:4], engine.run(0, {"x": x[:4]})["y"], rtol=1e-4, atol=1e-4)
        assert result.outputs["y"].shape == (40_000, 10)
        del result, x
        gc.collect()
        await batcher.submit({"x": np.ones((1, 64), np.float32)}, 1)  # the thread has shrunk the arena by now
        grown = _rss_mb() - before
        assert grown < 100, f"RSS grew by {grown:.0f} MB after the large batch"  # without the release: ~330 MB
        small = await batcher.submit({"x": np.ones((32, 64), np.float32)}, 32)  # normal batches still run
        assert small.outputs["y"].shape == (32, 10)
    finally:
        await batcher.close()
