"""The agent's per-model router settings: a bundle whose cascade confidence is ``custom`` (the app
supplies it) runs under the cascade with the function the config names, a per-model policy overrides
the agent's, and a bundle that cannot run under the configured policy is refused with a message that
says why — no traceback in the log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from agent_support import AgentProcess, TestCloud, wait_for, write_config
from tandem.shared.errors import InvalidInput
from tandem.shared.protocol import CONTENT_TYPE
from tandem.shared.tensors import decode_tensors, encode_tensors, packb, unpackb
from test_edge_tasks import make_regression_bundle

pytestmark = pytest.mark.timeout(120)

X = np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)


@pytest.fixture
async def cloud(tmp_path: Path, keys: tuple[Path, Path]):
    """A registry holding reg:1, a regression bundle calibrated with a ``custom`` confidence."""
    make_regression_bundle(tmp_path / "repo" / "reg" / "1", keys[0], confidence="custom")
    c = TestCloud(tmp_path / "repo", tmp_path / "feedback.sqlite")
    await c.start()
    yield c
    await c.close()


def confidence_module(directory: Path) -> dict[str, str]:
    """An importable module with the app's confidence function; the env that lets the agent see it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "reg_confidence.py").write_text(
        "import numpy as np\n"
        "def score(outputs):\n"
        "    return np.full(len(outputs['y']), 0.99)\n"
    )
    return {"PYTHONPATH": str(directory)}


async def infer(url: str) -> tuple[int, dict[str, Any]]:
    msg = {"inputs": encode_tensors({"x": X})}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/models/reg/infer", data=packb(msg), headers={"Content-Type": CONTENT_TYPE}) as r:
            body = unpackb(await r.read())
            if r.status == 200:
                body["outputs"] = decode_tensors(body["outputs"])
            return r.status, body


async def test_cascade_scores_a_custom_confidence_bundle_with_the_configured_function(
    tmp_path: Path, keys: tuple[Path, Path], cloud: TestCloud
) -> None:
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "agent.json", cloud.url, keys[1], data, policy="cascade",
                       models=[{"name": "reg", "confidence": "reg_confidence:score"}])
    agent = AgentProcess(cfg, data, env=confidence_module(tmp_path / "app"))
    try:
        url = await agent.wait_serving(120)
        status, body = await infer(url)
        assert status == 200, body
        route = body["route"]
        assert route["policy"] == "cascade" and route["tier"] == "edge", route
        assert route["confidence"] == pytest.approx(0.99)
        assert route["estimates"]["confidence"] == "custom"
        assert body["outputs"]["y"].shape == (2, 1)
    finally:
        agent.stop()
    assert "Traceback" not in agent.log_path.read_text()


async def test_a_per_model_policy_overrides_the_agents(tmp_path: Path, keys: tuple[Path, Path], cloud: TestCloud) -> None:
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "agent.json", cloud.url, keys[1], data, policy="cascade",
                       models=[{"name": "reg", "policy": "edge-only"}])
    agent = AgentProcess(cfg, data)
    try:
        url = await agent.wait_serving(120)
        status, body = await infer(url)
        assert status == 200, body
        assert (body["route"]["policy"], body["route"]["tier"]) == ("edge-only", "edge")
    finally:
        agent.stop()


@pytest.mark.parametrize(("confidence", "says"), [
    (None, "the cascade needs a confidence"),
    ("no_such_module_xyz:score", "module 'no_such_module_xyz' cannot be imported"),
    ("reg_confidence:missing", "has no function 'missing'"),
])
async def test_a_bundle_the_cascade_cannot_score_is_refused_with_the_reason(
    tmp_path: Path, keys: tuple[Path, Path], cloud: TestCloud, confidence: str | None, says: str
) -> None:
    data = tmp_path / "data"
    model: dict[str, Any] = {"name": "reg"}
    if confidence:
        model["confidence"] = confidence
    cfg = write_config(tmp_path / "agent.json", cloud.url, keys[1], data, policy="cascade", models=[model])
    agent = AgentProcess(cfg, data, env=confidence_module(tmp_path / "app"))
    try:
        await agent.wait_ready(120)
        await wait_for(lambda: says in agent.log(), 60, f"the agent to log {says!r}")
        status, body = await infer(agent.url or "")
        assert status in (404, 503), body  # nothing active: the version was refused, not half-served
    finally:
        agent.stop()
    assert "Traceback" not in agent.log_path.read_text()


def test_a_malformed_confidence_reference_is_a_config_error(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    from tandem.edge.agent.config import load_config

    cfg = write_config(tmp_path / "agent.json", None, keys[1], tmp_path / "data",
                       models=[{"name": "reg", "confidence": "not a reference"}])
    with pytest.raises(InvalidInput, match="expected package.module:function"):
        load_config(cfg)
