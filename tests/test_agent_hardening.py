"""The agent against a hostile network and a hostile local web page.

- a registry that answers with paths instead of versions must not make the agent touch anything
  outside its data directory, and neither may a symlink planted in it;
- the local API answers apps on this device only: not a foreign Host (DNS rebinding), not a foreign
  Origin (a web page), not a body type a form or a text/plain fetch can send, and not without the
  local token when one is configured;
- one agent per data directory; a busy port is one clear line; status says "starting" in between.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from agent_support import AgentProcess, HostileRegistry, infer, publish, run_cli, tree_snapshot, write_config
from tandem.edge.agent.config import load_config
from tandem.edge.agent.daemon import Agent, _bind_unix_socket
from tandem.edge.agent.lock import DataDirLock, lock_holder
from tandem.edge.agent.store import ModelStore
from tandem.shared import signing
from tandem.shared.errors import InvalidInput, UnsafePath
from tandem.shared.protocol import CONTENT_TYPE
from tandem.shared.tensors import encode_tensors, packb, unpackb

# --- a hostile registry -------------------------------------------------------------------------


@pytest.fixture
async def registry():
    r = HostileRegistry()
    await r.start()
    yield r
    await r.close()


def _layout(tmp_path: Path) -> tuple[Path, Path]:
    """DATA deep under tmp_path, with sentinels beside it, above it and in a sibling tree."""
    data = tmp_path / "deep" / "er" / "data"
    data.mkdir(parents=True)
    (tmp_path / "deep" / "er" / "keep.txt").write_text("beside the data dir")
    (tmp_path / "deep" / "keep").mkdir()
    (tmp_path / "deep" / "keep" / "x.txt").write_text("above it")
    outside = tmp_path / "outside"
    (outside / "2").mkdir(parents=True)
    (outside / "2" / "keep.txt").write_text("elsewhere")
    (outside / "5").mkdir()
    (outside / "5" / "keep.txt").write_text("elsewhere too")
    return data, outside


async def _agent(data: Path, keys: tuple[Path, Path], cloud_url: str) -> Agent:
    cfg = load_config(None, data_dir=data, trusted_keys=[keys[1]], models=[{"name": "toy"}], port=0,
                      cloud_url=cloud_url, unix_socket=False)
    a = Agent(cfg)
    await a.start(run_loops=False)
    return a


def _refusals(agent: Agent) -> list[dict]:
    return [r["payload"] for _, r in agent.outbox.peek(1000)
            if r["kind"] == "telemetry" and r["payload"].get("event") == "update_refused"]


# Staging was DATA/tmp/toy/<version>: each of these once pointed it at a directory outside DATA.
HOSTILE_VERSIONS = {
    "absolute": "{outside}",
    "absolute-version-dir": "{outside}/2",
    "dotdot-to-data": "../../..",
    "dotdot-above-data": "../../../..",
    "dotdot-to-outside": "../../../../../outside",
    "inner-dotdot": "1/../../../../../../outside",
    "percent-encoded": "%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2foutside",
    "percent-encoded-slash": "..%2f..%2f..%2f..%2f..%2foutside",
    "backslashes": "..\\..\\..\\..\\..\\outside",
    "nul": "2\x00/../../../../../outside",
    "dot": ".",
    "dotdot": "..",
    "empty": "",
    "newline": "2\n",
    "home": "~/outside",
    "leading-dash-dot": ".hidden",
}


@pytest.mark.parametrize("hostile", list(HOSTILE_VERSIONS.values()), ids=list(HOSTILE_VERSIONS))
async def test_a_registry_answering_with_a_path_gets_the_update_refused_and_nothing_outside_is_touched(
    tmp_path: Path, keys: tuple[Path, Path], registry: HostileRegistry, hostile: str
) -> None:
    data, outside = _layout(tmp_path)
    registry.latest = hostile.format(outside=outside)
    before = tree_snapshot(tmp_path, skip=data)
    agent = await _agent(data, keys, registry.url)
    try:
        for _ in range(2):  # refused on every poll, never "refused-before" by a cached verdict
            assert await agent.updater.poll_once() == {"toy": "refused"}  # type: ignore[union-attr]
        attempt = agent.store.state("toy")["last_attempt"]
        assert attempt["outcome"] == "refused" and attempt["code"] == "unsafe_path"
        assert repr(registry.latest) in attempt["message"] and "not a valid name" in attempt["message"]
        assert attempt["version"] is None  # the hostile string is not stored as a version
        assert [r["code"] for r in _refusals(agent)] == ["unsafe_path", "unsafe_path"]
        # Refused before anything was fetched with the hostile string in the URL.
        assert registry.fetched_bundle_files() == []
    finally:
        await agent.stop()
    assert tree_snapshot(tmp_path, skip=data) == before
    assert (data / "models" / "toy" / "state.json").is_file() and not (data / "tmp" / "toy").exists()


async def test_a_symlink_planted_in_staging_refuses_the_update_and_nothing_behind_it_is_removed(
    tmp_path: Path, keys: tuple[Path, Path], registry: HostileRegistry
) -> None:
    """The signature check fails (garbage manifest): the agent used to rmtree DATA/tmp/toy/2 through the link."""
    data, outside = _layout(tmp_path)
    (data / "tmp").mkdir()
    (data / "tmp" / "toy").symlink_to(outside, target_is_directory=True)
    registry.latest = "2"
    before = tree_snapshot(tmp_path, skip=data)
    agent = await _agent(data, keys, registry.url)
    try:
        assert await agent.updater.poll_once() == {"toy": "refused"}  # type: ignore[union-attr]
        attempt = agent.store.state("toy")["last_attempt"]
        assert attempt["code"] == "unsafe_path" and "symlink" in attempt["message"], attempt
        assert attempt["version"] == "2"
        assert registry.fetched_bundle_files() == []
        # Not remembered against the bundle: once the link is gone the same version installs again.
        assert "refused" not in agent.store.state("toy") or "2" not in agent.store.state("toy")["refused"]
    finally:
        await agent.stop()
    assert tree_snapshot(tmp_path, skip=data) == before
    assert (outside / "2" / "keep.txt").read_text() == "elsewhere"


async def test_a_symlinked_model_directory_is_neither_recovered_nor_written_through(
    tmp_path: Path, keys: tuple[Path, Path], registry: HostileRegistry
) -> None:
    """Recovery used to treat OUTSIDE/5 as an interrupted install and delete it when it failed to load."""
    data, outside = _layout(tmp_path)
    (data / "models").mkdir()
    (data / "models" / "toy").symlink_to(outside, target_is_directory=True)
    (data / "models" / "other").symlink_to(outside, target_is_directory=True)
    registry.latest = "2"
    before = tree_snapshot(tmp_path, skip=data)
    agent = await _agent(data, keys, registry.url)
    try:
        assert await agent.updater.poll_once() == {"toy": "refused"}  # type: ignore[union-attr]
        [refusal] = _refusals(agent)
        assert refusal["code"] == "unsafe_path" and "symlink" in refusal["message"]
        assert registry.fetched_bundle_files() == []
        async with aiohttp.ClientSession() as s:  # and it still serves
            async with s.get(agent.url + "/v2/health/live") as r:
                assert r.status == 200
    finally:
        await agent.stop()
    assert tree_snapshot(tmp_path, skip=data) == before
    assert not (outside / "state.json").exists()


async def test_a_symlinked_models_directory_stops_the_agent_before_it_touches_anything(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    data, outside = _layout(tmp_path)
    (data / "models").symlink_to(outside, target_is_directory=True)
    before = tree_snapshot(tmp_path, skip=data)
    cfg = load_config(None, data_dir=data, trusted_keys=[keys[1]], models=[{"name": "toy"}], port=0, unix_socket=False)
    with pytest.raises(UnsafePath, match="symlink"):
        Agent(cfg)
    assert tree_snapshot(tmp_path, skip=data) == before
    assert lock_holder(data) is None  # the failed start let go of the data directory


@pytest.mark.parametrize("model", [{"name": "../evil"}, {"name": "/abs"}, {"name": "a\\b"}, {"name": "toy", "version": "../1"},
                                   {"name": "toy", "version": "%2e%2e"}])
def test_config_refuses_model_names_and_versions_that_are_not_plain_names(model: dict) -> None:
    with pytest.raises(InvalidInput, match="not a valid model name or version"):
        load_config(None, models=[model], trusted_keys=["k.pub"])


# --- the local API and web pages ------------------------------------------------------------------


@pytest.fixture
async def agent(tmp_path: Path, keys: tuple[Path, Path], request: pytest.FixtureRequest):
    data = tmp_path / "data"
    bundle = publish(tmp_path / "repo", keys[0], "1")
    store = ModelStore(data, [signing.load_public_key(keys[1])])
    staging = store.staging_dir("toy", "1")
    shutil.copytree(bundle, staging)
    store.install(staging, "toy", "1")
    extra = getattr(request, "param", {})
    cfg = load_config(None, data_dir=data, trusted_keys=[keys[1]], models=[{"name": "toy"}], port=0,
                      policy="edge-only", **extra)
    a = Agent(cfg)
    await a.start(run_loops=False)
    yield a
    await a.stop()


def _feedback(label: int = 1) -> bytes:
    return json.dumps({"records": [{"kind": "feedback", "model": "toy", "label": label}]}).encode()


def _depth(agent: Agent) -> int:
    return agent.outbox.stats()["depth"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.1.evil.example", "localhost.evil.example:80",
                                  "[::1].evil.example", "127.0.0.1:80@evil.example", "localhost:abc", "0x7f000001",
                                  "[::1", ""])
async def test_a_foreign_host_is_refused_on_every_route(agent: Agent, host: str) -> None:
    """DNS rebinding: a page on evil.example, re-resolved to 127.0.0.1, sends Host: evil.example."""
    x = np.zeros((1, 64), np.float32)
    v2 = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": x.ravel().tolist()}]}
    async with aiohttp.ClientSession() as s:
        calls = [s.post(agent.url + "/v1/feedback", data=_feedback(), headers={"Host": host, "Content-Type": "application/json"}),
                 s.get(agent.url + "/v1/status", headers={"Host": host}),
                 s.get(agent.url + "/v1/models", headers={"Host": host}),
                 s.post(agent.url + "/v2/models/toy/infer", json=v2, headers={"Host": host})]
        for call in calls:
            async with call as r:
                body = await r.json()
                assert r.status == 403 and body["code"] == "forbidden", body
                assert "loopback" in body["error"] and repr(host) in body["error"]
        async with s.post(agent.url + "/v1/models/toy/infer", data=packb({"inputs": encode_tensors({"input": x})}),
                          headers={"Host": host, "Content-Type": CONTENT_TYPE}) as r:
            assert r.status == 403 and unpackb(await r.read())["code"] == "forbidden"  # msgpack on native routes
    assert _depth(agent) == 0 and agent.outbox.stats()["route_edge"] == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8765", "localhost", "LOCALHOST:1", "[::1]", "[::1]:8765", "127.0.0.2:9"])
async def test_loopback_hosts_are_served(agent: Agent, host: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(agent.url + "/v1/feedback", data=_feedback(), headers={"Host": host, "Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
    assert _depth(agent) == 1


async def test_the_unix_socket_is_served_whatever_the_host(agent: Agent) -> None:
    """No browser reaches a Unix socket; curl --unix-socket sends the URL's host."""
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(agent.config.socket_path))) as s:
        async with s.get("http://evil.example/v1/models") as r:
            assert r.status == 200
        async with s.post("http://agent/v1/feedback", data=_feedback(), headers={"Content-Type": "application/json",
                                                                                "Origin": "https://evil.example"}) as r:
            assert r.status == 403  # a foreign Origin is refused there too
    assert stat.S_IMODE(os.stat(agent.config.socket_path).st_mode) == 0o660


@pytest.mark.parametrize("origin", ["https://evil.example", "http://evil.example:8765", "null", "file://",
                                    "http://127.0.0.1.evil.example", "chrome-extension://abc", "http://localhost:bad"])
async def test_a_foreign_origin_is_refused(agent: Agent, origin: str) -> None:
    """A page elsewhere posting to http://127.0.0.1:8765 (CSRF): the browser sends its Origin."""
    async with aiohttp.ClientSession() as s:
        async with s.post(agent.url + "/v1/feedback", data=_feedback(),
                          headers={"Origin": origin, "Content-Type": "application/json"}) as r:
            body = await r.json()
            assert r.status == 403 and body["code"] == "forbidden" and "web origin" in body["error"], body
        async with s.get(agent.url + "/v1/status", headers={"Origin": origin}) as r:
            assert r.status == 403
    assert _depth(agent) == 0


async def test_a_loopback_origin_is_served(agent: Agent) -> None:
    async with aiohttp.ClientSession() as s:
        for origin in (agent.url, "http://localhost:3000", "http://[::1]:1"):
            async with s.post(agent.url + "/v1/feedback", data=_feedback(),
                              headers={"Origin": origin, "Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
    assert _depth(agent) == 3


@pytest.mark.parametrize("route, ctype", [
    ("/v1/feedback", "text/plain"),  # the original report: a page's fetch with a text/plain body
    ("/v1/feedback", "application/x-www-form-urlencoded"),
    ("/v1/feedback", "multipart/form-data; boundary=x"),
    ("/v1/feedback", None),  # fetch with an untyped Blob sends no Content-Type
    ("/v2/models/toy/infer", "text/plain"),
    ("/v2/models/toy/infer", None),
    ("/v1/models/toy/infer", "text/plain"),
    ("/v1/models/toy/infer", None),
])
async def test_write_routes_refuse_bodies_of_another_type(agent: Agent, route: str, ctype: str | None) -> None:
    x = np.zeros((1, 64), np.float32)
    if route == "/v1/feedback":
        body = _feedback()
    elif route.startswith("/v2"):
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}).encode()
    else:
        body = packb({"inputs": encode_tensors({"input": x})})
    async with aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as s:
        async with s.post(agent.url + route, data=body, headers={"Content-Type": ctype} if ctype else {}) as r:
            raw = await r.read()
            assert r.status == 400, raw
    err = unpackb(raw) if route.startswith("/v1/models") else json.loads(raw)
    assert err["code"] == "unsupported_media_type" and "Content-Type" in err["error"]
    assert _depth(agent) == 0 and agent.outbox.stats()["route_edge"] == 0


async def test_feedback_still_takes_json_and_msgpack(agent: Agent) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(agent.url + "/v1/feedback", data=_feedback(), headers={"Content-Type": "application/json; charset=utf-8"}) as r:
            assert r.status == 200
        for ctype in (CONTENT_TYPE, "application/x-msgpack"):
            async with s.post(agent.url + "/v1/feedback", data=packb(json.loads(_feedback())), headers={"Content-Type": ctype}) as r:
                assert r.status == 200
    assert _depth(agent) == 3


TOKEN = "0123456789abcdef-local"


@pytest.mark.parametrize("agent", [{"local_token": TOKEN}], indirect=True)
async def test_a_configured_local_token_is_required_everywhere_but_health(agent: Agent) -> None:
    x = np.zeros((1, 64), np.float32)
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/models", "/v1/status"):
            async with s.get(agent.url + path) as r:
                body = await r.json()
                assert r.status == 401 and body["code"] == "unauthorized" and "local token" in body["error"]
        async with s.post(agent.url + "/v1/feedback", data=_feedback(), headers={"Content-Type": "application/json"}) as r:
            assert r.status == 401
        async with s.post(agent.url + "/v1/feedback", data=_feedback(),
                          headers={"Content-Type": "application/json", "Authorization": "Bearer wrong-token-of-some-length"}) as r:
            assert r.status == 401 and "does not match" in (await r.json())["error"]
        status, _, body = await infer(s, agent.url, x)
        assert status == 401 and body["code"] == "unauthorized"
        for path in ("/v2/health/live", "/v2/health/ready"):
            async with s.get(agent.url + path) as r:
                assert r.status == 200
        async with s.post(agent.url + "/v1/feedback", data=_feedback(),
                          headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200
        async with s.post(agent.url + "/v1/feedback", data=_feedback(),
                          headers={"Content-Type": "application/json", "X-Tandem-Token": TOKEN}) as r:
            assert r.status == 200
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(agent.config.socket_path))) as s:
        async with s.get("http://agent/v1/models") as r:
            assert r.status == 401
        async with s.get("http://agent/v1/models", headers={"X-Tandem-Token": TOKEN}) as r:
            assert r.status == 200
    assert _depth(agent) == 2


def test_the_unix_socket_is_owner_and_group_only_from_bind(tmp_path: Path) -> None:
    """Made 0660 by the umask around bind(): there is no moment at which it is world-connectable."""
    old = os.umask(0)
    try:
        sock = _bind_unix_socket(tmp_path / "agent.sock")
        try:
            mode = stat.S_IMODE(os.stat(tmp_path / "agent.sock").st_mode)
            assert mode == 0o660, oct(mode)
        finally:
            sock.close()
        assert os.umask(0) == 0  # the process umask is back as it was
    finally:
        os.umask(old)


# --- one agent per data directory, a busy port, "starting" ------------------------------------------


def _config(tmp_path: Path, keys: tuple[Path, Path], name: str, data: Path, **extra) -> Path:
    return write_config(tmp_path / name, None, keys[1], data, models=[], **extra)


async def test_a_second_agent_on_the_same_data_directory_exits_and_leaves_the_first_alone(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    data = tmp_path / "data"
    first = AgentProcess(_config(tmp_path, keys, "a.json", data), data)
    try:
        url = await first.wait_ready()
        runtime = (data / "agent.json").read_text()
        sock_inode = os.stat(data / "agent.sock").st_ino
        second = AgentProcess(_config(tmp_path, keys, "b.json", data), data)
        try:
            assert await second.wait_exit() != 0
            lines = second.log().strip().splitlines()
        finally:
            second.stop()
        assert len(lines) == 1, lines
        assert lines[0] == (f"error: another agent (pid {first.proc.pid}) is already running on the data directory "
                            f"{data.resolve()}; stop it first or give this one another data_dir")
        # The first one's runtime file, socket and lock are untouched, and it still serves on both.
        assert (data / "agent.json").read_text() == runtime
        assert os.stat(data / "agent.sock").st_ino == sock_inode
        assert lock_holder(data) == first.proc.pid
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/v1/models") as r:
                assert r.status == 200
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(data / "agent.sock"))) as s:
            async with s.get("http://agent/v1/models") as r:
                assert r.status == 200
        status = run_cli("agent", "status", "--data", str(data))
        assert f"running at {url}" in status.stdout, status
    finally:
        assert first.stop() == 0
    status = run_cli("agent", "status", "--data", str(data))
    assert "not running" in status.stdout and not (data / "agent.sock").exists()


async def test_an_in_process_second_agent_is_refused_too(agent: Agent) -> None:
    from tandem.edge.agent.lock import AgentAlreadyRunning

    with pytest.raises(AgentAlreadyRunning, match=f"pid {os.getpid()}"):
        Agent(agent.config)
    async with aiohttp.ClientSession() as s:
        async with s.get(agent.url + "/v1/models") as r:
            assert r.status == 200


async def test_a_busy_port_is_one_clear_line_and_a_non_zero_exit(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    data = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = AgentProcess(_config(tmp_path, keys, "a.json", data, port=port), data)
        try:
            code = await proc.wait_exit()
            lines = proc.log().strip().splitlines()
        finally:
            proc.stop()
    assert code != 0
    assert lines == [f"error: the local API cannot listen on 127.0.0.1:{port}: another process is using that address; "
                     "set port (config file, TANDEM_AGENT_PORT or --port) to a free port, or 0 for any free one"], lines
    # It let go of everything: no runtime file, no socket, no lock; a new agent starts.
    assert not (data / "agent.json").exists() and not (data / "agent.sock").exists()
    assert lock_holder(data) is None
    again = AgentProcess(_config(tmp_path, keys, "b.json", data, port=0), data)
    try:
        await again.wait_ready()
    finally:
        assert again.stop() == 0


def test_status_says_starting_while_the_lock_is_held_without_a_runtime_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    lock = DataDirLock(data)
    lock.acquire()  # what an agent holds from its first moment, before it has written agent.json
    try:
        out = run_cli("agent", "status", "--data", str(data))
        assert out.returncode == 0 and f"(starting, pid {os.getpid()})" in out.stdout, out
        doc = json.loads(run_cli("agent", "status", "--data", str(data), "--json").stdout)
        assert doc["starting"] is True and doc["running"] is False and doc["starting_pid"] == os.getpid()
    finally:
        lock.release()
    assert "(not running)" in run_cli("agent", "status", "--data", str(data)).stdout


def test_a_leftover_runtime_file_with_a_live_pid_is_not_running(tmp_path: Path) -> None:
    """agent.json outlives a SIGKILLed agent and its pid may be reused: without the lock, nothing runs."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "agent.json").write_text(json.dumps({"pid": os.getpid(), "url": "http://127.0.0.1:1", "socket": None}))
    assert "(not running)" in run_cli("agent", "status", "--data", str(data)).stdout


async def test_status_polled_in_a_loop_never_makes_a_starting_agent_fail(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """status probes the lock with a shared flock; a starting agent retries its exclusive one meanwhile."""
    data = tmp_path / "data"
    data.mkdir()
    made = DataDirLock(data)
    made.acquire()  # so agent.lock exists from the first probe on
    made.release()
    stop = threading.Event()
    probes = 0

    def poll() -> None:
        nonlocal probes
        while not stop.is_set():
            lock_holder(data)
            probes += 1
            time.sleep(0.0005)

    t = threading.Thread(target=poll)
    t.start()
    try:
        for i in range(5):
            proc = AgentProcess(_config(tmp_path, keys, f"c{i}.json", data), data)
            try:
                await proc.wait_ready()
            finally:
                assert proc.stop() == 0
    finally:
        stop.set()
        t.join()
    assert probes > 100
