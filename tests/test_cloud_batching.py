"""The dynamic batcher through the real server: batches form, mixed shapes, bounded queue, deadlines, priorities."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from cloud_support import ServerThread, make_repository, slow_inputs
from support import make_mlp_onnx
from tandem.cloud.batcher import Batcher
from tandem.cloud.config import BatchingConfig, ServerConfig
from tandem.cloud.engine import ModelEngine
from tandem.shared import protocol as p
from tandem.shared.tensors import unpackb

BLOCK = 150  # rounds of work that keep the slow model's only instance busy (~0.25 s here)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), keys[0], toy_versions=())


async def _server(repo: Path, keys: tuple[Path, Path], **kw: Any) -> ServerThread:
    config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, warmup_batch_sizes=[1], **kw)
    return await asyncio.to_thread(ServerThread(config).start)


async def _infer(session: aiohttp.ClientSession, s: ServerThread, model: str, inputs: dict[str, np.ndarray] | np.ndarray,
                 headers: dict[str, str] | None = None, **req: Any) -> tuple[int, Any, dict[str, str], float]:
    if isinstance(inputs, np.ndarray):
        inputs = {"x": inputs}
    async with session.post(s.url + p.infer_path(model), data=p.InferRequest(inputs, **req).to_wire(), headers=headers) as r:
        raw = await r.read()
        done = time.perf_counter()
        doc = p.InferResponse.from_wire(raw) if r.status == 200 else unpackb(raw)
        return r.status, doc, dict(r.headers), done


async def _wait_queue(s: ServerThread, model: str, pending: int, depth: int) -> None:
    """Wait until the server holds ``pending`` requests of which ``depth`` wait in the queue."""
    batcher = s.state.repository.get(model, "1").batcher
    for _ in range(2000):
        if batcher.pending == pending and batcher.depth == depth:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"queue never reached pending={pending} depth={depth}: {batcher.pending}/{batcher.depth}")


def _metric(s: ServerThread, name: str, model: str) -> float:
    text = s.state.metrics.render().decode()
    m = re.search(rf'^{name}{{model="{model}",version="1"}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_concurrent_requests_form_batches_and_get_their_own_rows(repo: Path, keys: tuple[Path, Path]) -> None:
    s = await _server(repo, keys)
    try:
        async with aiohttp.ClientSession() as session:
            blocker = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(BLOCK)))
            await _wait_queue(s, "slow", 1, 0)  # the only instance is busy: what arrives now queues up
            xs = [slow_inputs(1, value=i) for i in range(24)]
            results = await asyncio.gather(*(_infer(session, s, "slow", x) for x in xs))
            assert (await blocker)[0] == 200
        sizes = [int(h[p.HEADER_BATCH_SIZE]) for _, _, h, _ in results]
        for x, (status, resp, _, _) in zip(xs, results):
            assert status == 200
            np.testing.assert_array_equal(resp.outputs["y"], x["x"] * 2)  # each request gets its own slice
        assert max(sizes) > 1, sizes
        count, execs = _metric(s, "tandem_inference_count_total", "slow"), _metric(s, "tandem_inference_exec_count_total", "slow")
        assert count == 25 and execs < 25  # mean batch size = count / exec > 1
    finally:
        await asyncio.to_thread(s.stop)


async def test_mixed_non_batch_shapes_are_all_answered(repo: Path, keys: tuple[Path, Path]) -> None:
    s = await _server(repo, keys)
    try:
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal((int(rng.integers(1, 4)), int(n))).astype(np.float32) for n in rng.integers(1, 6, 40)]
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(_infer(session, s, "varlen", x) for x in xs))
        for x, (status, resp, _, _) in zip(xs, results):
            assert status == 200, resp
            np.testing.assert_allclose(resp.outputs["mean"], x.mean(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    finally:
        await asyncio.to_thread(s.stop)


async def test_a_cnn_is_batched_and_each_request_gets_what_session_run_gives(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    # The bench's compute-bound model (support.make_conv_onnx), small: Conv layers through the batcher.
    from support import make_bundle, run_onnx

    bundle = make_bundle(tmp_path / "cnn" / "1", keys[0], name="cnn", cloud_conv=(8, 2))
    s = await _server(tmp_path, keys)
    try:
        xs = [np.random.default_rng(i).standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(16)]
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(_infer(session, s, "cnn", {"input": x}) for x in xs))
        for x, (status, resp, _, _) in zip(xs, results):
            assert status == 200, resp
            np.testing.assert_allclose(resp.outputs["logits"], run_onnx(bundle / "cloud-fp32.onnx", x), rtol=1e-4, atol=1e-5)
    finally:
        await asyncio.to_thread(s.stop)


async def test_full_queue_refuses_at_once_with_retry_after(repo: Path, keys: tuple[Path, Path]) -> None:
    # The blocker must outlast sending every request: on a loaded machine sending 8 took longer than
    # BLOCK, the queue drained meanwhile and more were accepted.
    long_block = BLOCK * 10
    batching = BatchingConfig(max_batch_size=1, max_queue_size=2)
    s = await _server(repo, keys, model_batching={"slow": batching})
    try:
        async with aiohttp.ClientSession() as session:
            blocker = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(long_block)))
            await _wait_queue(s, "slow", 1, 0)
            results = await asyncio.gather(*(_infer(session, s, "slow", slow_inputs(1)) for _ in range(8)))
            statuses = sorted(r[0] for r in results)
            assert statuses == [200] * 2 + [503] * 6, statuses  # 2 wait in the queue, the rest are refused
            last_ok = max(done for status, _, _, done in results if status == 200)
            for status, doc, headers, done in results:
                if status == 503:
                    assert doc["code"] == "overloaded" and "queue is full" in doc["error"]
                    assert int(headers[p.HEADER_RETRY_AFTER]) >= 1
                    assert done < last_ok  # refused at once, while the accepted ones still waited
            assert (await blocker)[0] == 200
            # v2 speaks the same refusal in JSON
            blocker = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(long_block)))
            await _wait_queue(s, "slow", 1, 0)
            body = json.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [1] * 8},
                                          {"name": "work", "shape": [1, 1], "datatype": "INT64", "data": [1]}]})
            responses = await asyncio.gather(*(session.post(s.url + "/v2/models/slow/infer", data=body) for _ in range(6)))
            assert sorted(r.status for r in responses) == [200] * 2 + [503] * 4
            for r in responses:
                doc = json.loads(await r.read())
                if r.status == 503:
                    assert "Retry-After" in r.headers and "queue is full" in doc["error"]
                r.release()
            await blocker
        text = s.state.metrics.render().decode()
        assert 'tandem_inference_request_failure_total{model="slow",reason="overloaded",version="1"} 10.0' in text
    finally:
        await asyncio.to_thread(s.stop)


async def test_expired_requests_are_dropped_before_compute(repo: Path, keys: tuple[Path, Path]) -> None:
    s = await _server(repo, keys, model_batching={"slow": BatchingConfig(max_batch_size=1)})
    try:
        async with aiohttp.ClientSession() as session:
            first = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(BLOCK)))
            await _wait_queue(s, "slow", 1, 0)  # the first request is computing now
            late = [_infer(session, s, "slow", slow_inputs(1), headers={p.HEADER_DEADLINE_MS: "5"}) for _ in range(3)]
            late.append(_infer(session, s, "slow", slow_inputs(1), deadline_ms=5.0))
            v2_body = json.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [1] * 8},
                                             {"name": "work", "shape": [1, 1], "datatype": "INT64", "data": [1]}],
                                  "parameters": {"timeout": 5000}})
            v2_late = asyncio.ensure_future(session.post(s.url + "/v2/models/slow/infer", data=v2_body))
            late_tasks = [asyncio.ensure_future(c) for c in late]
            # Each is answered at its deadline while the first still computes (no wait for a slot).
            results = await asyncio.gather(*late_tasks)
            v2_resp = await v2_late
            assert v2_resp.status == 504 and "deadline" in json.loads(await v2_resp.read())["error"]
            assert (await first)[0] == 200
        for status, doc, headers, _ in results:
            assert status == 504 and doc["code"] == "deadline_exceeded", doc
            assert p.HEADER_COMPUTE_US not in headers
        assert _metric(s, "tandem_inference_exec_count_total", "slow") == 1  # only the first one ran
    finally:
        await asyncio.to_thread(s.stop)


async def test_higher_priority_is_served_first(repo: Path, keys: tuple[Path, Path]) -> None:
    batching = BatchingConfig(max_batch_size=1, priority_levels=2)
    s = await _server(repo, keys, model_batching={"slow": batching})
    try:
        async with aiohttp.ClientSession() as session:
            first = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(BLOCK)))
            await _wait_queue(s, "slow", 1, 0)
            low = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(1), priority=2))
            await _wait_queue(s, "slow", 2, 1)
            high = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(1), priority=1))
            (_, _, _, t_low), (_, _, _, t_high), _ = await asyncio.gather(low, high, first)
            assert t_high < t_low
            status, doc, _, _ = await _infer(session, s, "slow", slow_inputs(1), priority=3)
            assert status == 400 and "priority" in doc["error"]
    finally:
        await asyncio.to_thread(s.stop)


async def test_queue_delay_lets_a_batch_fill(repo: Path, keys: tuple[Path, Path]) -> None:
    # A long delay: the batch must go as soon as it is full, not when the delay ends, and a loaded
    # CI box must not make the fourth request miss it.
    batching = BatchingConfig(max_batch_size=4, max_queue_delay_us=2_000_000)
    s = await _server(repo, keys, model_batching={"varlen": batching})
    try:
        x = np.ones((1, 3), np.float32)
        async with aiohttp.ClientSession() as session:
            async def later(i: int) -> Any:
                await asyncio.sleep(0.02 * i)
                return await _infer(session, s, "varlen", x)

            t0 = time.monotonic()
            results = await asyncio.gather(*(later(i) for i in range(4)))
            elapsed = time.monotonic() - t0
        assert [int(h[p.HEADER_BATCH_SIZE]) for _, _, h, _ in results] == [4, 4, 4, 4]
        assert elapsed < 1.5  # sent when full, well before the 2 s delay
    finally:
        await asyncio.to_thread(s.stop)


async def test_fill_wait_never_delays_a_lone_client(repo: Path, keys: tuple[Path, Path]) -> None:
    """fill_wait_us waits only under load: a client alone (each request sent once the last is
    answered) never waits for company that cannot come."""
    s = await _server(repo, keys, model_batching={"slow": BatchingConfig(max_batch_size=4, fill_wait_us=400_000)})
    try:
        async with aiohttp.ClientSession() as session:
            t0 = time.perf_counter()
            for i in range(5):
                status, resp, headers, _ = await _infer(session, s, "slow", slow_inputs(1, value=i))
                assert status == 200 and headers[p.HEADER_BATCH_SIZE] == "1"
                np.testing.assert_array_equal(resp.outputs["y"], slow_inputs(1, value=i)["x"] * 2)
            elapsed = time.perf_counter() - t0
        assert elapsed < 0.4, elapsed  # one wait alone would be 0.4 s
    finally:
        await asyncio.to_thread(s.stop)


async def test_fill_wait_under_load_waits_for_the_clients_just_answered(repo: Path, keys: tuple[Path, Path]) -> None:
    """After a batch that ran while another request queued, the instance waits (up to
    fill_wait_us) for the clients it just answered to send again, and runs them together with the
    queued one instead of running that one alone."""
    s = await _server(repo, keys, model_batching={"slow": BatchingConfig(max_batch_size=4, fill_wait_us=400_000)})
    try:
        async with aiohttp.ClientSession() as session:

            async def client(i: int) -> tuple[int, Any, dict[str, str], float]:
                first = await _infer(session, s, "slow", slow_inputs(BLOCK, value=i))
                assert first[0] == 200
                return await _infer(session, s, "slow", slow_inputs(1, value=i))  # sent again once answered

            blocker = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(BLOCK)))
            await _wait_queue(s, "slow", 1, 0)
            clients = [asyncio.ensure_future(client(i)) for i in range(3)]
            await _wait_queue(s, "slow", 4, 3)  # the three queue behind the blocker ...
            await _wait_queue(s, "slow", 3, 0)  # ... and run as one batch after it
            lone = asyncio.ensure_future(_infer(session, s, "slow", slow_inputs(1, value=9)))
            await _wait_queue(s, "slow", 4, 1)  # queued while they compute: load is present
            status, resp, headers, _ = await lone
            again = await asyncio.gather(*clients)
            assert (await blocker)[0] == 200
        assert status == 200
        np.testing.assert_array_equal(resp.outputs["y"], slow_inputs(1, value=9)["x"] * 2)
        # Without the wait it would have run alone (the instance was free and it was all that was queued).
        assert int(headers[p.HEADER_BATCH_SIZE]) >= 3, headers[p.HEADER_BATCH_SIZE]
        for i, (st, r, _, _) in enumerate(again):
            assert st == 200
            np.testing.assert_array_equal(r.outputs["y"], slow_inputs(1, value=i)["x"] * 2)
    finally:
        await asyncio.to_thread(s.stop)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
async def test_the_threads_that_compute_run_below_the_event_loop(tmp_path: Path) -> None:
    def nices() -> dict[int, int]:
        return {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}

    onnx_path = make_mlp_onnx(tmp_path / "m.onnx")
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    before = nices()
    engine = ModelEngine(onnx_path, instances=1, intra_op_threads=2, nice=5)
    pool = {tid: n for tid, n in nices().items() if tid not in before}  # onnxruntime's intra-op thread(s)
    assert pool and set(pool.values()) == {min(19, base + 5)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller is untouched

    batcher = Batcher(engine, BatchingConfig(), name="m")
    try:
        (thread,) = batcher._threads
        for _ in range(100):
            if thread.native_id is not None:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == min(19, base + 5)
        out = await batcher.submit({"input": np.ones((1, 64), np.float32)}, 1)
        assert out.outputs["logits"].shape == (1, 10)
    finally:
        await batcher.close()


def test_checked_input_signatures_are_remembered_and_refusals_are_not(tmp_path: Path) -> None:
    from cloud_support import make_varlen_onnx
    from tandem.cloud import engine as engine_module
    from tandem.shared.errors import TandemError

    engine = ModelEngine(make_mlp_onnx(tmp_path / "m.onnx"), instances=1, intra_op_threads=1)
    ok = {"input": np.ones((3, 64), np.float32)}
    for _ in range(2):  # checked, then remembered: the same answer
        assert engine.check_inputs(ok) == 3
    for bad in (
        {"input": np.ones((3, 64), np.float64)},
        {"input": np.ones((3, 63), np.float32)},
        {"input": np.ones((3, 64), np.dtype(">f4"))},
        {"input": np.ones((0, 64), np.float32)},
        {"inputs": np.ones((3, 64), np.float32)},
        {"input": np.ones((3, 64), np.float32), "extra": np.ones((3, 64), np.float32)},
    ):
        for _ in range(2):  # refused every time, never remembered as checked
            with pytest.raises(TandemError):
                engine.check_inputs(bad)
    varlen = ModelEngine(make_varlen_onnx(tmp_path / "v.onnx"), instances=1, intra_op_threads=1)
    x = varlen.inputs[0]
    for n in range(1, engine_module._MAX_ACCEPTED + 10):  # a dynamic dimension: as many signatures as lengths
        shape = [1 if d is None and i == 0 else n if d is None else d for i, d in enumerate(x.shape)]
        assert varlen.check_inputs({x.name: np.ones(shape, varlen._dtypes[x.name])}) == 1
    assert len(varlen._accepted) <= engine_module._MAX_ACCEPTED
