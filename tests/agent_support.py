"""Helpers for the agent tests: a cloud made of the real registry and feedback parts, agent
processes, and bundles that must be refused (tampered, wrongly signed, failing probation)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from support import free_port, make_bundle
from tandem.shared import signing
from tandem.shared.bundle import SAMPLES_NAME, read_manifest, read_samples, seal_bundle, write_samples
from tandem.shared.protocol import CONTENT_TYPE
from tandem.shared.tensors import decode_tensors, encode_tensors, packb, unpackb


class TestCloud:
    """The cloud tier's registry and feedback endpoints (tandem.cloud's own classes) on 127.0.0.1.

    ``stop()`` closes the listening socket (an outage); ``start()`` opens it again on the same port.
    ``range_requests`` counts file downloads that asked to resume, ``resumed`` those answered 206.
    """

    __test__ = False

    def __init__(self, repository: Path, db: Path) -> None:
        from tandem.cloud.feedback import FeedbackStore
        from tandem.cloud.registry import Registry

        self.repository = repository
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.range_requests = 0
        self.resumed = 0
        self.feedback = FeedbackStore(db)
        app = web.Application(middlewares=[self._count])
        Registry(repository).add_routes(app)
        self.feedback.add_routes(app)
        self._app = app
        self._runner: web.AppRunner | None = None

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if "Range" in request.headers:
            self.range_requests += 1
        resp = await handler(request)
        if resp.status == 206:
            self.resumed += 1
        return resp

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def close(self) -> None:
        await self.stop()
        self.feedback.close()

    async def records(self, **query: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = 0
        async with aiohttp.ClientSession() as s:
            while True:
                async with s.get(f"{self.url}/v1/feedback", params={**query, "after": after, "limit": 1000}) as r:
                    doc = await r.json()
                out += doc["records"]
                if not doc["records"] or doc.get("next_after") is None:
                    return out
                after = doc["next_after"]


def publish(repository: Path, private_key: Path, version: str, name: str = "toy", **kw: Any) -> Path:
    """A signed bundle at REPO/<name>/<version> (seeded by version so each version computes differently)."""
    return make_bundle(repository / name / version, private_key, name=name, version=version,
                       seed=int(version) if version.isdigit() else 7, **kw)


def reseal_with_wrong_samples(bundle_dir: Path, private_key: Path) -> None:
    """Correctly signed, but the recorded edge outputs do not match the edge model: fails probation."""
    raw, manifest = read_manifest(bundle_dir)
    inputs, outputs = read_samples(bundle_dir / SAMPLES_NAME)
    edge = manifest.variant("edge").name
    outputs[edge] = {k: v + 1.0 for k, v in outputs[edge].items()}
    write_samples(bundle_dir / SAMPLES_NAME, inputs, outputs)
    seal_bundle(bundle_dir, manifest, signing.load_private_key(private_key))


def tamper_edge_file(bundle_dir: Path) -> None:
    """Change the edge model's bytes after signing (same size): the sha256 no longer matches."""
    _, manifest = read_manifest(bundle_dir)
    p = bundle_dir / manifest.variant("edge").file
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF
    p.write_bytes(bytes(data))


def write_config(path: Path, cloud_url: str | None, public_key: Path, data_dir: Path, **extra: Any) -> Path:
    doc = {"cloud_url": cloud_url, "trusted_keys": [str(public_key)], "data_dir": str(data_dir),
           "models": [{"name": "toy"}], "port": 0, "poll_interval_s": 0.3, "upload_interval_s": 0.3,
           "policy": "edge-only"}
    doc.update(extra)
    path.write_text(json.dumps(doc))
    return path


class AgentProcess:
    """``tandem agent run`` as a real subprocess; logs go to ``<data>/../agent-<n>.log``."""

    _n = 0

    def __init__(self, config: Path, data_dir: Path, env: dict[str, str] | None = None) -> None:
        AgentProcess._n += 1
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"agent-{AgentProcess._n}.log"
        self._log = open(self.log_path, "wb")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_AGENT_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "tandem.shared.cli", "agent", "run", "--config", str(config)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        self.url: str | None = None

    async def wait_ready(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        runtime = self.data_dir / "agent.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                doc = json.loads(runtime.read_text())
                if doc.get("pid") == self.proc.pid:
                    self.url = doc["url"]
                    return self.url
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"agent not ready after {timeout}s:\n{self.log()}")

    async def wait_serving(self, timeout: float = 120.0) -> str:
        """Ready and every tracked model has an active version (``/v2/health/ready`` is 200)."""
        url = await self.wait_ready(timeout)

        async def ready() -> bool:
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/v2/health/ready") as r:
                    return r.status == 200

        await wait_for(ready, timeout, "the agent to have an active version")
        return url

    async def wait_exit(self, timeout: float = 120.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"agent still running after {timeout}s:\n{self.log()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


async def infer(session: aiohttp.ClientSession, url: str, x: np.ndarray, model: str = "toy",
                **parameters: Any) -> tuple[int, dict[str, Any], Any]:
    """POST a native msgpack infer; returns (status, headers, decoded body)."""
    msg: dict[str, Any] = {"inputs": encode_tensors({"input": x})}
    if parameters:
        msg["parameters"] = parameters
    async with session.post(f"{url}/v1/models/{model}/infer", data=packb(msg),
                            headers={"Content-Type": CONTENT_TYPE}) as r:
        body = unpackb(await r.read())
        if r.status == 200:
            body["outputs"] = decode_tensors(body["outputs"])
        return r.status, dict(r.headers), body


async def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate() if asyncio.iscoroutinefunction(predicate) else predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class HostileRegistry:
    """A registry on 127.0.0.1 that lies: ``latest`` is whatever the test sets (absolute paths, ``..``,
    encoded separators...), and every manifest and signature it serves is garbage that fails the
    signature check. ``requests`` lists every path asked for, undecoded."""

    __test__ = False

    def __init__(self) -> None:
        self.latest: Any = "1"
        self.requests: list[str] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.raw_path)
        parts = request.raw_path.split("/")
        if request.raw_path.startswith("/v1/registry/models/") and len(parts) == 5:
            return web.json_response({"name": parts[4], "latest": self.latest, "versions": [self.latest]})
        if "/versions/" in request.raw_path:
            return web.Response(body=b'{"not": "a manifest"}' if request.raw_path.endswith("manifest") else b"\0" * 64)
        return web.json_response({"accepted": 0, "ids": []})

    def fetched_bundle_files(self) -> list[str]:
        return [p for p in self.requests if "/versions/" in p]

    async def start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        await self._runner.cleanup()


def tree_snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every path under ``root`` (not following symlinks, ``skip`` left out) with a digest of what it is."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        if skip is not None and (d == skip or skip in d.parents):
            dirnames[:] = []
            continue
        for n in dirnames + filenames:
            p = d / n
            if skip is not None and p == skip:
                continue
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[str(p)] = "dir"
            else:
                out[str(p)] = "file:" + p.read_bytes().hex()[:64]
    return out


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``tandem ARGS`` as a subprocess (TANDEM_AGENT_* from the environment left out)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_AGENT_")}
    return subprocess.run([sys.executable, "-m", "tandem.shared.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
