"""The device registry over real HTTP on 127.0.0.1, serving real signed bundles from a repository dir."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from support import make_bundle
from tandem.cloud.registry import Registry
from tandem.shared.bundle import MANIFEST_NAME, SIGNATURE_NAME, load_bundle, read_manifest
from tandem.shared.errors import ModelNotFound, NotFound, error_from_body

BASE = "/v1/registry/models"


@pytest.fixture
def repo(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    root = tmp_path / "repo"
    for version in ("1", "2", "10"):
        make_bundle(root / "toy" / version, keys[0], name="toy", version=version, seed=int(version))
    make_bundle(root / "other" / "1.9", keys[0], name="other", version="1.9")
    (root / "other" / "1.10").mkdir(parents=True)  # no manifest.json yet: ignored
    broken = root / "toy" / "11"
    shutil.copytree(root / "toy" / "10", broken)
    (broken / MANIFEST_NAME).write_text("{not json")  # does not parse: never served
    (root / "onlybroken" / "1").mkdir(parents=True)
    (root / "onlybroken" / "1" / MANIFEST_NAME).write_text("[]")
    (root / "README.txt").write_text("not a model")
    return root


@pytest.fixture
async def client(repo: Path) -> AsyncIterator[TestClient]:
    app = web.Application()
    Registry(repo).add_routes(app)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


async def _json(resp, status: int = 200) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json()


async def test_lists_models_and_versions_in_version_order(client: TestClient) -> None:
    doc = await _json(await client.get(BASE))
    assert doc == {
        "models": [
            {"name": "other", "versions": ["1.9"], "latest": "1.9"},
            {"name": "toy", "versions": ["1", "2", "10"], "latest": "10"},
        ]
    }
    assert await _json(await client.get(f"{BASE}/toy")) == {"name": "toy", "versions": ["1", "2", "10"], "latest": "10"}


@pytest.mark.parametrize(
    "path, cls, words",
    [
        (f"{BASE}/nope", ModelNotFound, "nope"),
        (f"{BASE}/onlybroken", ModelNotFound, "onlybroken"),
        (f"{BASE}/nope/versions/1/manifest", ModelNotFound, "nope"),
        (f"{BASE}/toy/versions/3/manifest", NotFound, "no version '3'"),
        (f"{BASE}/toy/versions/11/manifest", NotFound, "no version '11'"),  # broken manifest
        (f"{BASE}/toy/versions/%2E%2E/manifest", NotFound, "'..'"),
        (f"{BASE}/%2E%2E/versions/toy/manifest", ModelNotFound, "'..'"),
        (f"{BASE}/toy/versions/1/files/unlisted.onnx", NotFound, "not a file of bundle toy:1"),
        (f"{BASE}/toy/versions/1/files/{MANIFEST_NAME}", NotFound, "not a file"),
        (f"{BASE}/toy/versions/1/files/..%2F..%2F..%2Fetc%2Fpasswd", NotFound, "not a file"),
        (f"{BASE}/toy/versions/1/files/%2Fetc%2Fpasswd", NotFound, "not a file"),
    ],
)
async def test_unknown_things_are_404_with_an_error_body(client: TestClient, path: str, cls: type, words: str) -> None:
    # encoded=True: send the escapes as they are, not a client-side normalised path.
    resp = await client.session.get(URL(str(client.make_url("/")).rstrip("/") + path, encoded=True))
    body = await _json(resp, 404)
    err = error_from_body(resp.status, body)
    assert type(err) is cls and words in err.message, body


async def test_manifest_and_signature_are_the_bytes_on_disk(client: TestClient, repo: Path, keys) -> None:
    raw, _ = read_manifest(repo / "toy" / "2")
    resp = await client.get(f"{BASE}/toy/versions/2/manifest")
    assert resp.status == 200
    assert await resp.read() == raw
    etag = f'"{hashlib.sha256(raw).hexdigest()}"'
    assert resp.headers["ETag"] == etag
    assert resp.headers["X-Tandem-Model-Version"] == "2"

    again = await client.get(f"{BASE}/toy/versions/2/manifest", headers={"If-None-Match": etag})
    assert again.status == 304 and await again.read() == b""

    sig = await client.get(f"{BASE}/toy/versions/2/signature")
    assert sig.status == 200
    assert await sig.read() == (repo / "toy" / "2" / SIGNATURE_NAME).read_bytes()

    latest = await client.get(f"{BASE}/toy/versions/latest/manifest")
    assert json.loads(await latest.read())["version"] == "10"
    assert latest.headers["X-Tandem-Model-Version"] == "10"


async def test_a_device_can_download_and_verify_a_whole_bundle(client: TestClient, tmp_path: Path, keys) -> None:
    """Everything the registry hands out reassembles into a bundle that passes load_bundle."""
    out = tmp_path / "device"
    out.mkdir()
    manifest = await (await client.get(f"{BASE}/toy/versions/latest/manifest")).read()
    (out / MANIFEST_NAME).write_bytes(manifest)
    (out / SIGNATURE_NAME).write_bytes(await (await client.get(f"{BASE}/toy/versions/10/signature")).read())
    for rel in [v["file"] for v in json.loads(manifest)["variants"]] + [json.loads(manifest)["samples"]["file"]]:
        resp = await client.get(f"{BASE}/toy/versions/10/files/{rel}")
        assert resp.status == 200
        body = await resp.read()
        assert resp.headers["X-Tandem-Sha256"] == hashlib.sha256(body).hexdigest()
        assert resp.headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()}"'
        assert resp.headers["Accept-Ranges"] == "bytes"
        (out / rel).write_bytes(body)
    bundle = load_bundle(out, keys[1])
    assert bundle.version == "10"


async def test_resumed_download_with_range(client: TestClient, repo: Path) -> None:
    path = f"{BASE}/toy/versions/1/files/cloud-fp32.onnx"
    whole = (repo / "toy" / "1" / "cloud-fp32.onnx").read_bytes()
    size = len(whole)
    digest = hashlib.sha256(whole).hexdigest()

    # The first attempt dies half way: read only half the body, then drop the connection.
    resp = await client.get(path)
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == size
    first = await resp.content.readexactly(size // 2)
    resp.close()

    etag = resp.headers["ETag"]
    rest = await client.get(path, headers={"Range": f"bytes={len(first)}-", "If-Range": etag})
    assert rest.status == 206
    assert rest.headers["Content-Range"] == f"bytes {len(first)}-{size - 1}/{size}"
    assert rest.headers["ETag"] == etag
    body = first + await rest.read()
    assert hashlib.sha256(body).hexdigest() == digest

    middle = await client.get(path, headers={"Range": "bytes=10-19"})
    assert middle.status == 206 and await middle.read() == whole[10:20]
    shouted = await client.get(path, headers={"Range": "Bytes=10-19"})
    assert shouted.status == 206 and await shouted.read() == whole[10:20]
    suffix = await client.get(path, headers={"Range": "bytes=-7"})
    assert suffix.status == 206 and await suffix.read() == whole[-7:]
    past_end = await client.get(path, headers={"Range": f"bytes=100-{size + 1000}"})
    assert past_end.status == 206 and await past_end.read() == whole[100:]

    # A partial copy of some other file (stale ETag) gets the whole current file instead.
    stale = await client.get(path, headers={"Range": "bytes=100-", "If-Range": '"0000"'})
    assert stale.status == 200 and await stale.read() == whole

    unsatisfiable = await client.get(path, headers={"Range": f"bytes={size}-"})
    assert unsatisfiable.status == 416
    assert unsatisfiable.headers["Content-Range"] == f"bytes */{size}"
    assert "outside" in (await unsatisfiable.json())["error"]
    for ignored in ("bytes=0-1,5-6", "items=0-1"):  # several ranges, another unit: the whole file
        whole_again = await client.get(path, headers={"Range": ignored})
        assert whole_again.status == 200 and await whole_again.read() == whole, ignored
    malformed = await client.get(path, headers={"Range": "bytes=abc"})
    assert malformed.status == 416 and "one 'bytes=start-end' range" in (await malformed.json())["error"]

    cached = await client.get(path, headers={"If-None-Match": f'"{digest}"'})
    assert cached.status == 304 and await cached.read() == b""
    head = await client.head(path)
    assert head.status == 200 and int(head.headers["Content-Length"]) == size and await head.read() == b""


async def test_repository_changes_are_seen_without_restart(client: TestClient, repo: Path, keys) -> None:
    make_bundle(repo / "toy" / "12", keys[0], name="toy", version="12")
    assert (await _json(await client.get(f"{BASE}/toy")))["latest"] == "12"
    make_bundle(repo / "fresh" / "1", keys[0], name="fresh", version="1")
    assert [m["name"] for m in (await _json(await client.get(BASE)))["models"]] == ["fresh", "other", "toy"]

    # A manifest that claims to be another version than its directory is not served.
    wrong = repo / "toy" / "13"
    make_bundle(wrong, keys[0], name="toy", version="14")
    assert "13" not in (await _json(await client.get(f"{BASE}/toy")))["versions"]

    # Repairing a broken manifest in place makes the version appear (mtime-checked cache).
    good, _ = read_manifest(repo / "toy" / "10")
    (repo / "toy" / "11" / MANIFEST_NAME).write_bytes(good.replace(b'"version": "10"', b'"version": "11"'))
    assert (await _json(await client.get(f"{BASE}/toy")))["latest"] == "12"
    assert "11" in (await _json(await client.get(f"{BASE}/toy")))["versions"]

    # A file that no longer matches its manifest (half-copied) is refused, not served.
    (repo / "toy" / "2" / "edge-fp32.onnx").write_bytes(b"truncated")
    resp = await client.get(f"{BASE}/toy/versions/2/files/edge-fp32.onnx")
    body = await _json(resp, 422)
    assert body["code"] == "hash_mismatch" and "manifest says" in body["error"]
    (repo / "toy" / "2" / "edge-fp32.onnx").unlink()
    body = await _json(await client.get(f"{BASE}/toy/versions/2/files/edge-fp32.onnx"), 404)
    assert "missing on the server" in body["error"]


async def test_empty_or_missing_repository(tmp_path: Path) -> None:
    app = web.Application()
    Registry(tmp_path / "does-not-exist").add_routes(app)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        assert await _json(await c.get(BASE)) == {"models": []}
        assert (await _json(await c.get(f"{BASE}/toy"), 404))["code"] == "model_not_found"
