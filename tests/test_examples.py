"""Each user's example, run for real: the embedding app, the device (agent + curl), the cloud scripts."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from agent_support import AgentProcess, free_port, publish, wait_for

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def cloud(tmp_path: Path, keys: tuple[Path, Path]):
    """The real cloud tier (tandem.cloud.app) in-process on 127.0.0.1, serving a toy "digits" bundle."""
    from tandem.cloud.app import create_app
    from tandem.cloud.config import ServerConfig

    repo = tmp_path / "repo"
    publish(repo, keys[0], "1", name="digits")
    port = free_port()
    cfg = ServerConfig(repository=repo, port=port, trusted_keys=[keys[1]], warmup_batch_sizes=[1],
                       access_log=False, cost_per_call=0.001)
    runner = web.AppRunner(create_app(cfg))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"

    async def ready() -> bool:
        async with aiohttp.ClientSession() as s, s.get(url + "/v2/health/ready") as r:
            return r.status == 200

    await wait_for(ready, 60, "the cloud tier to be ready", interval=0.1)
    yield url, repo
    await runner.cleanup()


async def _run(*argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                env={**os.environ, **(env or {})})
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(errors="replace")


async def test_app_example_embeds_the_hybrid_client_sync_and_async(cloud, keys: tuple[Path, Path]) -> None:
    url, repo = cloud
    code, out = await _run(sys.executable, str(EXAMPLES / "app" / "hybrid_app.py"), "--bundle", str(repo / "digits" / "1"),
                           "--trusted-key", str(keys[1]), "--cloud-url", url)
    assert code == 0, out
    assert "-- sync --" in out and "-- async, 8 calls in flight --" in out
    assert "tier=cloud" in out  # the cloud-only call went to the cloud
    assert "local_only" in out and out.count("ainfer #") == 8
    assert "CPUExecutionProvider" in out
    # Without a cloud every call is answered on the device.
    code, out = await _run(sys.executable, str(EXAMPLES / "app" / "hybrid_app.py"), "--bundle", str(repo / "digits" / "1"),
                           "--trusted-key", str(keys[1]))
    assert code == 0, out
    assert "tier=cloud" not in out and out.count("tier=edge") == 12


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_device_example_agent_with_config_file_and_curl_client(cloud, keys: tuple[Path, Path], tmp_path: Path) -> None:
    url, _ = cloud
    device = tmp_path / "device"
    shutil.copytree(EXAMPLES / "device", device, ignore=shutil.ignore_patterns("data", "keys"))
    (device / "keys").mkdir()
    shutil.copy(keys[1], device / "keys" / "tandem.pub")
    env = {"TANDEM_AGENT_CLOUD_URL": url, "TANDEM_AGENT_PORT": "0", "TANDEM_AGENT_POLL_INTERVAL_S": "0.5",
           "TANDEM_AGENT_UPLOAD_INTERVAL_S": "0.3"}
    agent = AgentProcess(device / "agent.toml", device / "data", env=env)
    try:
        agent_url = await agent.wait_serving()
        code, out = await _run("bash", str(device / "call_local_api.sh"), agent_url, str(device / "data" / "agent.sock"))
        assert code == 0, out + agent.log()
        assert '"model_name":"digits"' in out.replace(" ", "") and '"name":"logits"' in out.replace(" ", "")
        assert out.lower().count("x-tandem-tier:") == 2 and "x-tandem-tier: edge" in out.lower()
        assert '"accepted": 1' in out or '"accepted":1' in out
        code, status = await _run(sys.executable, "-m", "tandem.shared.cli", "agent", "status", "--config",
                                  str(device / "agent.toml"))
        assert code == 0 and "model digits: active 1" in status, status
        assert re.search(r"route mix: \d+ edge, \d+ cloud, 0 failed", status), status

        async def feedback_arrived() -> bool:
            async with aiohttp.ClientSession() as s, s.get(url + "/v1/feedback", params={"kind": "feedback"}) as r:
                return any(rec.get("request_id") == "curl-1" for rec in (await r.json())["records"])

        await wait_for(feedback_arrived, 20, "the curl feedback to reach the cloud", interval=0.2)
    finally:
        agent.stop()


async def test_cloud_example_run_local_serves_and_container_script_points_at_deploy(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    repo, keydir = tmp_path / "repo", tmp_path / "keys"
    keydir.mkdir()
    shutil.copy(keys[1], keydir / "tandem.pub")
    publish(repo, keys[0], "1", name="digits")
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(["bash", str(EXAMPLES / "cloud" / "run_local.sh"), str(repo), str(port)],
                            env={**os.environ, "TANDEM_KEYS": str(keydir)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        async def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/v2/health/ready") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(ready, 90, "run_local.sh to serve", interval=0.2)
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/v1/registry/models") as r:
            assert [m["name"] for m in (await r.json())["models"]] == ["digits"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    script = (EXAMPLES / "cloud" / "run_container.sh").read_text()
    assert subprocess.run(["bash", "-n", str(EXAMPLES / "cloud" / "run_container.sh")]).returncode == 0
    assert "deploy/Dockerfile" in script and (ROOT / "deploy" / "Dockerfile").is_file()
    assert "127.0.0.1:" in script  # published on loopback unless the operator says otherwise
    readme = (EXAMPLES / "cloud" / "README.md").read_text()
    for path in ("deploy/k8s", "deploy/kserve/inferenceservice.yaml"):
        assert path in readme and (ROOT / path).exists()
