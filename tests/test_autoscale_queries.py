"""The autoscalers' metric queries, run by a real Prometheus against a real ``tandem serve`` under load.

deploy/k8s/keda-scaledobject.yaml (KEDA) and prometheus-adapter-values.yaml (the HPA's custom
metric) name PromQL that only a Prometheus can check: this starts ``tandem serve`` and Prometheus on
127.0.0.1 (Prometheus scraping the server every second, with the ``namespace`` and ``pod`` labels the
usual kubernetes-pods scrape job adds), puts a bounded load on the server, and runs each query from
the manifests through Prometheus' HTTP API: each must give a non-empty, finite, non-negative number,
and one that saw the load (above zero while requests were pending).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml

from support import free_port, make_bundle, make_keys
from tandem.shared.protocol import CONTENT_TYPE, InferRequest, infer_path

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
NAMESPACE, POD = "tandem", "tandem-cloud-0"

pytestmark = [
    pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="needs Prometheus (.ci/run installs Debian's prometheus)"),
    pytest.mark.timeout(300),
]


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _wait(predicate: Any, timeout: float, what: str, procs: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for proc, log in procs:
            if proc.poll() is not None:
                pytest.fail(f"{what}: {proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if predicate():
                return
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(tandem serve URL, Prometheus URL), both on 127.0.0.1, Prometheus scraping the server."""
    tmp = tmp_path_factory.mktemp("autoscale")
    private, public = make_keys(tmp / "keys")
    make_bundle(tmp / "repo" / "toy" / "1", private, name="toy", version="1")
    serve_port, prom_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env.update(TANDEM_INTRA_OP_THREADS="1", TANDEM_WARMUP_BATCH_SIZES="[1]", TANDEM_ACCESS_LOG="false")
    serve_log = tmp / "serve.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "tandem.shared.cli", "serve", "--repository", str(tmp / "repo"), "--host", "127.0.0.1",
         "--port", str(serve_port), "--trusted-key", str(public)],
        env=env, stdout=serve_log.open("wb"), stderr=subprocess.STDOUT, cwd=tmp,
    )
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "tandem",
            "static_configs": [{"targets": [f"127.0.0.1:{serve_port}"], "labels": {"namespace": NAMESPACE, "pod": POD}}],
        }],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_log = tmp / "prometheus.log"
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=prom_log.open("wb"), stderr=subprocess.STDOUT, cwd=tmp,
    )
    procs = [(serve, serve_log), (prom, prom_log)]
    base, prom_url = f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{prom_port}"
    try:
        _wait(lambda: urllib.request.urlopen(base + "/v2/health/ready", timeout=5).status == 200, 120, "tandem serve", procs)
        _wait(lambda: urllib.request.urlopen(prom_url + "/-/ready", timeout=5).status == 200, 120, "Prometheus", procs)

        def scraped() -> bool:
            targets = _get_json(prom_url + "/api/v1/targets")["data"]["activeTargets"]
            return any(t["health"] == "up" for t in targets)

        _wait(scraped, 60, "Prometheus to scrape tandem serve", procs)
        yield base, prom_url
    finally:
        _stop(prom)
        _stop(serve)


async def _load(base: str, seconds: float, connections: int = 32, max_requests: int = 200_000) -> int:
    """Keep ``connections`` requests in flight for ``seconds`` (bounded in count too); returns how many
    were answered 200."""
    body = InferRequest({"input": np.random.default_rng(0).standard_normal((1, 64), dtype=np.float32)}).to_wire()
    url = base + infer_path("toy")
    deadline = time.monotonic() + seconds
    sent = ok = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent, ok
        while time.monotonic() < deadline and sent < max_requests:
            sent += 1
            async with session.post(url, data=body, headers={"Content-Type": CONTENT_TYPE}) as r:
                await r.read()
                ok += r.status == 200

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=connections)) as session:
        await asyncio.gather(*(client(session) for _ in range(connections)))
    return ok


def _query(prom_url: str, promql: str) -> list[dict[str, Any]]:
    answer = _get_json(prom_url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert answer["status"] == "success", answer
    assert answer["data"]["resultType"] == "vector", answer
    return answer["data"]["result"]


def _numbers(result: list[dict[str, Any]], promql: str) -> list[float]:
    assert result, f"{promql!r} gave an empty result"
    values = [float(sample["value"][1]) for sample in result]
    assert all(math.isfinite(v) and v >= 0 for v in values), (promql, values)
    return values


def manifest_queries() -> dict[str, str]:
    """Every PromQL query the scalers run, as they would run it (adapter templates rendered for one pod)."""
    queries = {}
    keda = yaml.safe_load((K8S / "keda-scaledobject.yaml").read_text())
    for i, trigger in enumerate(keda["spec"]["triggers"]):
        queries[f"keda trigger {i}"] = trigger["metadata"]["query"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    for i, rule in enumerate(adapter["rules"]["custom"]):
        # prometheus-adapter fills the template per request: the series, the HPA's object selector
        # (namespace and pod names) and the resource label it groups by.
        series = rule["name"]["as"]
        matchers = f'namespace="{NAMESPACE}",pod=~"{POD}"'
        queries[f"adapter rule {i}"] = (rule["metricsQuery"].replace("<<.Series>>", series)
                                        .replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod"))
    return queries


def test_the_manifests_queries_see_the_load(stack: tuple[str, str]) -> None:
    base, prom_url = stack
    queries = manifest_queries()
    assert {"keda trigger 0", "adapter rule 0"} <= set(queries), queries
    hpa = yaml.safe_load((K8S / "hpa.yaml").read_text())
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in {r["name"]["as"] for r in adapter["rules"]["custom"]}

    # Before load: every query already answers (the gauge exists per loaded model), with a number.
    for name, promql in queries.items():
        _wait(lambda q=promql: bool(_query(prom_url, q)), 30, f"{name} to return a sample", [])
        _numbers(_query(prom_url, promql), promql)

    # Under load, until Prometheus has scraped pending requests (at most three rounds of 8 s).
    for _ in range(3):
        answered = asyncio.run(_load(base, seconds=8))
        assert answered > 0
        time.sleep(2.5)  # past the next scrape and evaluation
        peak = _query(prom_url, f"max_over_time(({queries['keda trigger 0']})[1m:1s])")
        if peak and float(peak[0]["value"][1]) > 0:
            break
    for name, promql in queries.items():
        peak = _numbers(_query(prom_url, f"max_over_time(({promql})[1m:1s])"), promql)
        assert max(peak) > 0, f"{name}: {promql!r} never rose above 0 under load"
        assert max(peak) <= 32 + 1, f"{name}: {promql!r} peaked at {max(peak)} with 32 requests in flight"

    # The adapter's series query finds the series with the labels it maps to Kubernetes objects.
    for rule in adapter["rules"]["custom"]:
        answer = _get_json(prom_url + "/api/v1/series?" + urllib.parse.urlencode({"match[]": rule["seriesQuery"]}))
        assert answer["status"] == "success" and answer["data"], rule["seriesQuery"]
        for series in answer["data"]:
            assert series["namespace"] == NAMESPACE and series["pod"] == POD
    # Per pod, as the HPA reads it: one sample for the one pod.
    (sample,) = _query(prom_url, queries["adapter rule 0"])
    assert sample["metric"] == {"pod": POD}
