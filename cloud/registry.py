"""Read-only model registry that edge devices pull their bundles from.

Serves the bundles of a model repository (``REPO/<model>/<version>/manifest.json`` ...) over HTTP::

    GET /v1/registry/models                                        {"models": [{"name", "versions", "latest"}]}
    GET /v1/registry/models/{m}                                    {"name", "versions", "latest"}
    GET /v1/registry/models/{m}/versions/{v}/manifest              raw manifest.json (ETag = its sha256)
    GET /v1/registry/models/{m}/versions/{v}/signature             raw manifest.sig
    GET /v1/registry/models/{m}/versions/{v}/files/{file}          a file listed in the manifest

``{v}`` may be ``latest``. File downloads carry ``ETag`` (the sha256 from the manifest, quoted),
``X-Tandem-Sha256`` and ``Accept-Ranges: bytes``; a single ``Range`` gives 206 (resumed downloads,
``If-Range`` honoured; several ranges or another unit: the whole file), ``If-None-Match`` gives 304.

The repository is scanned at request time; parsed manifests are cached by (mtime, size) so a new
version dropped into the directory is served at once without a restart. Signatures are not checked
here (devices verify them against their own trusted keys), but a version whose manifest does not
parse, or whose name/version disagree with its directory, is not served at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from tandem.shared.bundle import MANIFEST_NAME, SIGNATURE_NAME, Manifest, parse_manifest, safe_join, version_key
from tandem.shared.errors import BundleError, HashMismatch, InvalidInput, ModelNotFound, NotFound, TandemError

__all__ = ["Registry"]

_log = logging.getLogger(__name__)

PREFIX = "/v1/registry"
LATEST = "latest"
_CHUNK = 256 * 1024
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True, slots=True)
class _Version:
    directory: Path
    raw: bytes
    manifest: Manifest
    etag: str  # quoted sha256 of the manifest bytes
    stamp: tuple[int, int]  # (mtime_ns, size) of manifest.json when parsed


class Registry:
    """Serves the bundles under ``repository`` to devices (see the module docstring for routes)."""

    def __init__(self, repository: Path) -> None:
        self.repository = Path(repository)
        self._cache: dict[Path, _Version] = {}
        # Warn once per broken manifest state, not on every request that scans past it.
        self._warned: set[tuple[Path, tuple[int, int]]] = set()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(f"{PREFIX}/models", self._list_models)
        app.router.add_get(f"{PREFIX}/models/{{model}}", self._get_model)
        base = f"{PREFIX}/models/{{model}}/versions/{{version}}"
        app.router.add_get(f"{base}/manifest", self._get_manifest)
        app.router.add_get(f"{base}/signature", self._get_signature)
        # Manifest paths may contain "/" (sub-folders inside a bundle); safe_join guards them.
        app.router.add_get(f"{base}/files/{{file:.+}}", self._get_file)

    # --- repository scanning (runs in a thread: it touches the disk) ----------------------------

    def _models(self) -> dict[str, dict[str, _Version]]:
        """Every model with at least one servable version: {model: {version: _Version}}."""
        out: dict[str, dict[str, _Version]] = {}
        for name in self._subdirs(self.repository):
            versions = self._scan_model(name)
            if versions:
                out[name] = versions
        return out

    def _subdirs(self, directory: Path) -> list[str]:
        try:
            with os.scandir(directory) as it:
                return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _versions(self, model: str) -> dict[str, _Version]:
        # Only names that really exist in the directory are ever joined to a path: a request for
        # "..", "%2e%2e" or any other crafted name simply is not found.
        if model not in self._subdirs(self.repository):
            return {}
        return self._scan_model(model)

    def _scan_model(self, model: str) -> dict[str, _Version]:
        out = {}
        for version in self._subdirs(self.repository / model):
            v = self._load(self.repository / model / version, model, version)
            if v is not None:
                out[version] = v
        return out

    def _load(self, directory: Path, model: str, version: str) -> _Version | None:
        mpath = directory / MANIFEST_NAME
        try:
            st = mpath.stat()
        except OSError:
            return None  # not a bundle (yet): entries without manifest.json are ignored
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(directory)
        if cached is not None and cached.stamp == stamp:
            return cached
        try:
            raw = mpath.read_bytes()
            manifest = parse_manifest(raw, str(mpath))
            if (manifest.name, manifest.version) != (model, version):
                raise BundleError(
                    f"{mpath} describes {manifest.name}:{manifest.version}, not {model}:{version} as its path says"
                )
        except (OSError, BundleError) as e:
            self._cache.pop(directory, None)
            if (directory, stamp) not in self._warned:
                self._warned.add((directory, stamp))
                _log.warning("registry: not serving %s: %s", directory, e)
            return None
        entry = _Version(directory, raw, manifest, f'"{hashlib.sha256(raw).hexdigest()}"', stamp)
        self._cache[directory] = entry
        return entry

    def _resolve(self, model: str, version: str) -> _Version:
        versions = self._versions(model)
        if not versions:
            raise ModelNotFound(f"model {model!r} is not in the registry")
        if version == LATEST:
            version = max(versions, key=version_key)
        entry = versions.get(version)
        if entry is None:
            raise NotFound(f"model {model!r} has no version {version!r} (versions: {', '.join(_sorted(versions))})")
        return entry

    # --- handlers -------------------------------------------------------------------------------

    async def _list_models(self, request: web.Request) -> web.StreamResponse:
        models = await asyncio.to_thread(self._models)
        return web.json_response({"models": [_summary(name, vs) for name, vs in sorted(models.items())]})

    async def _get_model(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        versions = await asyncio.to_thread(self._versions, model)
        if not versions:
            return _error(ModelNotFound(f"model {model!r} is not in the registry"))
        return web.json_response(_summary(model, versions))

    async def _get_manifest(self, request: web.Request) -> web.StreamResponse:
        try:
            entry = await self._entry(request)
        except TandemError as e:
            return _error(e)
        headers = _version_headers(entry)
        headers["ETag"] = entry.etag
        if _etag_matches(request.headers.get("If-None-Match"), entry.etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=entry.raw, content_type="application/json", headers=headers)

    async def _get_signature(self, request: web.Request) -> web.StreamResponse:
        try:
            entry = await self._entry(request)
            sig = await asyncio.to_thread(_read_optional, entry.directory / SIGNATURE_NAME)
        except TandemError as e:
            return _error(e)
        if sig is None:
            v = entry.manifest
            return _error(NotFound(f"bundle {v.name}:{v.version} has no {SIGNATURE_NAME}"))
        return web.Response(body=sig, content_type="application/octet-stream", headers=_version_headers(entry))

    async def _get_file(self, request: web.Request) -> web.StreamResponse:
        try:
            entry = await self._entry(request)
            path, sha256, size = await asyncio.to_thread(self._file, entry, request.match_info["file"])
            start, end = _byte_range(request, f'"{sha256}"', size)
        except _RangeNotSatisfiable as e:
            refused = _error(e)
            refused.headers["Content-Range"] = f"bytes */{size}"
            return refused
        except TandemError as e:
            return _error(e)
        etag = f'"{sha256}"'
        headers = _version_headers(entry)
        headers.update({"ETag": etag, "X-Tandem-Sha256": sha256, "Accept-Ranges": "bytes"})
        if _etag_matches(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers=headers)
        partial = (start, end) != (0, size)
        if partial:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        resp = web.StreamResponse(status=206 if partial else 200, headers=headers)
        resp.content_type = "application/octet-stream"
        resp.content_length = end - start
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        # Chunked reads in a thread keep memory flat for large variants and the loop free.
        with await asyncio.to_thread(open, path, "rb") as f:
            await asyncio.to_thread(f.seek, start)
            remaining = end - start
            while remaining > 0:
                chunk = await asyncio.to_thread(f.read, min(_CHUNK, remaining))
                if not chunk:
                    raise ConnectionResetError(f"{path} shrank while being served")
                await resp.write(chunk)
                remaining -= len(chunk)
        await resp.write_eof()
        return resp

    async def _entry(self, request: web.Request) -> _Version:
        return await asyncio.to_thread(self._resolve, request.match_info["model"], request.match_info["version"])

    def _file(self, entry: _Version, name: str) -> tuple[Path, str, int]:
        listed = {rel: (digest, size) for rel, digest, size in entry.manifest.file_entries()}
        if name not in listed:
            m = entry.manifest
            raise NotFound(f"{name!r} is not a file of bundle {m.name}:{m.version} (files: {', '.join(sorted(listed))})")
        digest, size = listed[name]
        path = safe_join(entry.directory, name)
        try:
            actual = path.stat().st_size
        except OSError:
            raise NotFound(f"{name!r} of bundle {entry.manifest.name}:{entry.manifest.version} is missing on the server") from None
        if actual != size:
            # A half-copied or replaced file: refuse rather than serve bytes that fail the device's check.
            raise HashMismatch(f"{name!r} is {actual} bytes on the server; its manifest says {size}")
        return path, digest, size


# --- helpers ------------------------------------------------------------------------------------


def _sorted(versions: dict[str, _Version]) -> list[str]:
    return sorted(versions, key=version_key)


def _summary(name: str, versions: dict[str, _Version]) -> dict[str, object]:
    ordered = _sorted(versions)
    return {"name": name, "versions": ordered, "latest": ordered[-1]}


def _version_headers(entry: _Version) -> dict[str, str]:
    return {"X-Tandem-Model-Version": entry.manifest.version}


def _error(err: TandemError) -> web.Response:
    return web.json_response(err.to_dict(), status=err.status)


def _read_optional(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip() for t in header.split(",")]
    # Weak comparison (RFC 9110 13.1.2): W/"x" matches "x" for If-None-Match.
    return any(t == "*" or t.removeprefix("W/") == etag for t in tags)


class _RangeNotSatisfiable(TandemError):
    status = 416
    code = "range_not_satisfiable"


def _byte_range(request: web.Request, etag: str, size: int) -> tuple[int, int]:
    """[start, end) to send. One ``bytes=`` range is supported; ``If-Range`` with another ETag means
    the client's partial copy is stale, so it gets the whole file. A Range in another unit, or
    asking for several ranges, is ignored (the whole file, 200), as RFC 9110 lets a server do:
    rejecting it would fail a download the client could have had."""
    header = request.headers.get("Range")
    if header is None:
        return 0, size
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() != etag:
        return 0, size
    unit, _, ranges = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in ranges:
        return 0, size
    m = _RANGE_RE.match("bytes=" + ranges.strip())  # the unit, checked above, is case-insensitive (RFC 9110)
    if m is None:
        raise _RangeNotSatisfiable(f"Range {_cut(header)!r} is not supported: send one 'bytes=start-end' range")
    first, last = m.groups()
    if not first and not last:
        raise InvalidInput(f"Range {_cut(header)!r} names no bytes")
    if not first:  # suffix: the last N bytes
        n = _position(last)
        if n == 0:
            raise _RangeNotSatisfiable(f"Range {_cut(header)!r} asks for zero bytes", size=size)
        return max(0, size - n), size
    start = _position(first)
    end = min(_position(last) + 1, size) if last else size
    if start >= size or end <= start:
        raise _RangeNotSatisfiable(f"Range {_cut(header)!r} is outside the file's {size} bytes", size=size)
    return start, end


#: Digits beyond which a byte position lies past any file (2**63 has 19).
_MAX_DIGITS = 19


def _position(digits: str) -> int:
    """A byte position of a Range header; one of more digits than any file has bytes counts as
    2**63 (int() refuses strings of more than 4300 digits)."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= _MAX_DIGITS else 2**63


def _cut(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."
