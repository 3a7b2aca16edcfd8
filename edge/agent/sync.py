"""Talking to the cloud tier: polling the registry for new versions (with resumable downloads),
forwarding the outbox to the feedback endpoint, and submitting the jobs apps deferred.

Every network failure is an expected state on a device ("offline"): the updater records it and the
agent keeps serving what it has; the uploader keeps records in the outbox and retries with backoff.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tandem.shared import signing
from tandem.shared.bundle import MANIFEST_NAME, SIGNATURE_NAME, parse_manifest, safe_join, sha256_file
from tandem.shared.errors import (
    HashMismatch,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    TandemError,
    Unavailable,
    UnsafePath,
    error_from_body,
)

from .config import AgentConfig
from .outbox import Outbox
from .store import EDGE_ROLE, Activation, ModelStore, check_name, crash_point, is_valid_name

# What the cloud answers when it will never take a batch as sent: retrying it unchanged would block
# the queue forever, so the batch is sent record by record and a record refused alone is dropped.
_REFUSED = (InvalidInput, PayloadTooLarge)

log = logging.getLogger(__name__)

_CHUNK = 64 << 10
#: A partitioned link is silence, not an error: give up on one upload after this long.
_UPLOAD_TIMEOUT_S = 10.0
#: What a job submit answered when the cloud will never take it as sent (malformed, unknown model,
#: too large, its Idempotency-Key used by another request): retrying would block the outbox forever.
_JOB_REFUSED = frozenset({400, 404, 409, 413, 422})


class RegistryClient:
    """The cloud's read-only registry (``/v1/registry/...``) over one aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str | None = None) -> None:
        self._session = session
        self._base = base_url.rstrip("/") + "/v1/registry/models"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def model(self, name: str) -> dict[str, Any]:
        async with self._session.get(f"{self._base}/{name}", headers=self._headers) as r:
            await _raise_for(r)
            doc = await r.json()
        if not isinstance(doc, dict) or not isinstance(doc.get("versions"), list):
            raise Unavailable(f"registry answered {name} with an unexpected document")
        return doc

    async def fetch(self, name: str, version: str, what: str) -> bytes:
        async with self._session.get(f"{self._base}/{name}/versions/{version}/{what}", headers=self._headers) as r:
            await _raise_for(r)
            return await r.read()

    async def download(self, name: str, version: str, file: str, dest: Path, sha256: str, size: int) -> None:
        """Download ``file`` to ``dest`` through ``dest.part``, resuming a partial one with HTTP Range,
        and check its sha256 before it gets its final name."""
        # File work (hashing a model of hundreds of MB, fsync) runs in a thread: the loop also serves
        # the apps' local API.
        if await asyncio.to_thread(_already_there, dest, size, sha256):
            return
        part = dest.with_name(dest.name + ".part")
        have = await asyncio.to_thread(_part_size, part, size)
        headers = dict(self._headers)
        if 0 < have < size:
            headers["Range"] = f"bytes={have}-"
            # Resume only if the server's file is still the one the manifest describes; else 200, whole.
            headers["If-Range"] = f'"{sha256}"'
        if have < size:
            url = f"{self._base}/{name}/versions/{version}/files/{file}"
            async with self._session.get(url, headers=headers) as r:
                if r.status == 416:  # our range is stale (file changed): start over next time
                    part.unlink(missing_ok=True)
                    raise Unavailable(f"{file}: the server refused the resume range; restarting the download")
                await _raise_for(r)
                mode = "ab" if r.status == 206 else "wb"
                if mode == "ab":
                    log.info("resuming %s:%s %s at byte %d", name, version, file, have)
                f = await asyncio.to_thread(open, part, mode)
                try:
                    async for chunk in r.content.iter_chunked(_CHUNK):
                        await asyncio.to_thread(_append, f, chunk)
                        crash_point("download")
                    await asyncio.to_thread(os.fsync, f.fileno())
                finally:
                    f.close()
        actual = await asyncio.to_thread(sha256_file, part)
        if actual != sha256:
            part.unlink(missing_ok=True)
            raise HashMismatch(f"downloaded {file} has sha256 {actual[:16]}…; the manifest says {sha256[:16]}…")
        os.replace(part, dest)


def _already_there(dest: Path, size: int, sha256: str) -> bool:
    return dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == sha256


def _part_size(part: Path, size: int) -> int:
    """Bytes of ``part`` a download can resume from (a part longer than the file is dropped)."""
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        return 0
    return have


def _append(f: Any, chunk: bytes) -> None:
    f.write(chunk)
    f.flush()


async def _raise_for(r: aiohttp.ClientResponse) -> None:
    if r.status < 400:
        return
    try:
        body: Any = await r.json(content_type=None)
    except Exception:
        body = None
    raise error_from_body(r.status, body)


class Updater:
    """One poll of the registry per tracked model: download, verify, install, activate (or refuse)."""

    def __init__(self, config: AgentConfig, store: ModelStore, session: aiohttp.ClientSession,
                 on_activate: Callable[[Activation], Awaitable[None]],
                 on_refuse: Callable[[str, str | None, str, str], Awaitable[None]] | None = None) -> None:
        self.config = config
        self.store = store
        self.on_activate = on_activate
        #: Told (model, version, code, message) when a version is refused, to report it upstream.
        self.on_refuse = on_refuse
        self.registry = RegistryClient(session, config.cloud_url or "", config.api_key)
        self._keys = [signing.load_public_key(k) for k in config.trusted_keys]
        # One poll at a time: two would download into the same staging directory.
        self._lock = asyncio.Lock()

    async def poll_once(self) -> dict[str, str]:
        """{model: outcome} after checking every tracked model once."""
        async with self._lock:
            outcomes = {}
            for tracked in self.config.models:
                outcomes[tracked.name] = await self._update(tracked.name, tracked.version)
            return outcomes

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll_once()
            except Exception:  # never let the update loop die: the agent must keep polling
                log.exception("update poll failed")
            try:
                await asyncio.wait_for(stop.wait(), self.config.poll_interval_s)
            except TimeoutError:
                pass

    async def _update(self, name: str, wanted: str) -> str:
        store = self.store
        version: str | None = None
        try:
            check_name(name, "model name")
            info = await self.registry.model(name)
            version = str(info.get("latest")) if wanted == "latest" else wanted
            if version is None or version == "None":
                raise NotFound(f"the registry has no versions of {name}")
            # The registry's answer becomes a path under the data directory: it must be a plain name.
            check_name(version, f"the registry's version of {name}")
            if version not in [str(v) for v in info["versions"]]:
                raise NotFound(f"{name}:{version} is not in the registry (it has {info['versions']})")
            if version == store.active_version(name):
                store.record_attempt(name, version, "up-to-date")
                return "up-to-date"
            # Checked before anything is downloaded: a planted symlink refuses the update, not just the delete.
            staging = store.staging_dir(name, version)
            store.version_dir(name, version)
            raw = await self.registry.fetch(name, version, "manifest")
            sig = await self.registry.fetch(name, version, "signature")
        except UnsafePath as e:
            # Not the bundle's fault (nothing was downloaded): refused now, asked again next poll.
            await self._refuse(name, version if is_valid_name(version) else None, e,
                               message=f"{e.message}; not installing it")
            return "refused"
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            store.record_attempt(name, version, "offline", f"cloud unreachable: {e}")
            return "offline"
        except TandemError as e:
            outcome = "offline" if e.status >= 500 else "error"
            store.record_attempt(name, version, outcome, e.message, e.code)
            return outcome

        manifest_sha = hashlib.sha256(raw).hexdigest()
        if store.is_refused(name, version, manifest_sha):
            return "refused-before"
        try:
            # Nothing from the manifest is trusted (no path opened) before the signature verifies.
            signing.verify(raw, sig, self._keys)
            manifest = parse_manifest(raw, f"{name}:{version} manifest")
            if (manifest.name, manifest.version) != (name, version):
                raise TandemError(f"the registry served {manifest.name}:{manifest.version} for {name}:{version}")
            if version in store.installed(name) and version in store.history(name):
                activation = await asyncio.to_thread(store.activate, name, version)  # a kept version (pinned back)
            else:
                staging.mkdir(parents=True, exist_ok=True)
                for rel, digest, size in manifest.file_entries([EDGE_ROLE]):
                    dest = safe_join(staging, rel)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    await self.registry.download(name, version, rel, dest, digest, size)
                # Manifest and signature last: their presence marks a complete download.
                (staging / SIGNATURE_NAME).write_bytes(sig)
                (staging / MANIFEST_NAME).write_bytes(raw)
                activation = await asyncio.to_thread(store.install, staging, name, version)
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            store.record_attempt(name, version, "offline", f"download interrupted: {e}")
            return "offline"
        except TandemError as e:
            if e.status >= 500 and not isinstance(e, HashMismatch):
                store.record_attempt(name, version, "offline", e.message, e.code)
                return "offline"
            log.error("refused %s:%s: %s", name, version, e.message)
            self._remove_staging(name, version)
            await self._refuse(name, version, e, manifest_sha)
            return "refused"
        store.record_attempt(name, version, "activated", f"from {activation.previous or 'nothing'}")
        await self.on_activate(activation)
        return "activated"

    def _remove_staging(self, name: str, version: str) -> None:
        # The path is rebuilt (and re-checked) here: a symlink planted since must not be followed.
        try:
            staging = self.store.staging_dir(name, version)
        except UnsafePath as e:
            log.error("not removing the download of %s:%s: %s", name, version, e.message)
            return
        shutil.rmtree(staging, ignore_errors=True)

    async def _refuse(self, name: str, version: str | None, e: TandemError, manifest_sha: str | None = None,
                      message: str | None = None) -> None:
        """Record a refusal in the model's state (if its directory is usable) and report it upstream."""
        message = message or e.message
        log.error("refused an update of %r: %s", name, message)
        try:
            self.store.record_attempt(name, version, "refused", message, e.code, manifest_sha)
        except TandemError as e2:  # the model name or its directory itself is unsafe: the log and telemetry say it
            log.error("cannot record the refusal for %r: %s", name, e2.message)
        if self.on_refuse is not None:
            await self.on_refuse(name, version, e.code, message)


class Uploader:
    """Forwards the outbox to ``POST {cloud}/v1/feedback`` in order, in batches, with backoff."""

    def __init__(self, config: AgentConfig, outbox: Outbox, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.outbox = outbox
        self._session = session
        self._url = (config.cloud_url or "") + "/v1/feedback"
        self._headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.last_error: str | None = None

    async def flush(self) -> int:
        """Upload until the outbox is empty or the cloud fails; returns records acknowledged."""
        sent = 0
        await asyncio.to_thread(self.outbox.enforce_caps)  # the age cap applies even when nothing is appended
        while True:
            batch = await asyncio.to_thread(self.outbox.peek, self.config.upload_batch)
            if not batch:
                return sent
            if batch[0][1].get("kind") == "job":
                # Deferred jobs go to the job API one by one, in their place in the outbox's order.
                seq, rec = batch[0]
                if await self._submit_job(rec):
                    await asyncio.to_thread(self.outbox.ack, seq)
                else:
                    await asyncio.to_thread(self.outbox.reject, seq)
                sent += 1
                continue
            batch = batch[: next((i for i, (_, r) in enumerate(batch) if r.get("kind") == "job"), len(batch))]
            try:
                await self._post([r for _, r in batch])
            except _REFUSED:
                # The cloud refuses something in this batch (or its size): find it one by one so the rest still goes.
                for seq, rec in batch:
                    try:
                        await self._post([rec])
                    except _REFUSED as e:
                        log.error("the cloud refused outbox record %s (%s); dropping it", rec.get("id"), e.message)
                        await asyncio.to_thread(self.outbox.reject, seq)
                    else:
                        await asyncio.to_thread(self.outbox.ack, seq)
                    sent += 1
                continue
            # The cloud stored them (duplicates included: ids are idempotency keys), so drop them.
            await asyncio.to_thread(self.outbox.ack, batch[-1][0])
            sent += len(batch)

    async def _submit_job(self, rec: dict[str, Any]) -> bool:
        """Submit one deferred job (``Prefer: respond-async``, ``Idempotency-Key`` = the job's id):
        True once the cloud has it (202 new, 200 already there: a retry after a crash), False when it
        refuses it for good (dropped, counted); raises while the cloud is unreachable or failing."""
        from tandem.shared.jobs import (
            CALLBACK_HEADER,
            IDEMPOTENCY_KEY_HEADER,
            PREFER_HEADER,
            PREFERENCE_APPLIED_HEADER,
            PRIORITY_HEADER,
            RESPOND_ASYNC,
        )
        from tandem.shared.protocol import CONTENT_TYPE, infer_path

        payload = rec.get("payload") or {}
        headers = {**self._headers, "Content-Type": CONTENT_TYPE, PREFER_HEADER: RESPOND_ASYNC,
                   IDEMPOTENCY_KEY_HEADER: str(rec["id"])}
        if payload.get("priority") is not None:
            headers[PRIORITY_HEADER] = str(payload["priority"])
        if payload.get("callback"):
            headers[CALLBACK_HEADER] = str(payload["callback"])
        url = (self.config.cloud_url or "") + infer_path(rec["model"], rec.get("version"))
        async with self._session.post(url, data=base64.b64decode(payload["body"]), headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=_UPLOAD_TIMEOUT_S)) as r:
            if r.status in (200, 202) and RESPOND_ASYNC in r.headers.get(PREFERENCE_APPLIED_HEADER, ""):
                await r.read()
                log.info("deferred job %s submitted to the cloud (%d)", rec["id"], r.status)
                return True
            if r.status in (200, 202):  # answered at once, as a plain call: the result would be lost
                raise Unavailable(f"{url} does not take jobs (no {PREFERENCE_APPLIED_HEADER}: {RESPOND_ASYNC})")
            if r.status in _JOB_REFUSED:
                raw = await r.read()
                log.error("the cloud refused deferred job %s (HTTP %d: %s); dropping it", rec["id"], r.status,
                          raw[:200].decode("utf-8", "replace"))
                return False
            await _raise_for(r)
            raise Unavailable(f"job submit answered HTTP {r.status}")

    async def _post(self, records: list[dict[str, Any]]) -> None:
        async with self._session.post(self._url, json={"records": records}, headers=self._headers,
                                      timeout=aiohttp.ClientTimeout(total=_UPLOAD_TIMEOUT_S)) as r:
            await _raise_for(r)
            await r.read()

    async def run(self, stop: asyncio.Event) -> None:
        delay = self.config.upload_interval_s
        while not stop.is_set():
            try:
                await self.flush()
                self.last_error = None
                delay = self.config.upload_interval_s
            except (TimeoutError, aiohttp.ClientError, OSError, TandemError) as e:
                self.last_error = str(e) or type(e).__name__
                delay = min(max(delay * 2, self.config.upload_interval_s), self.config.upload_max_backoff_s)
                log.info("feedback upload failed (%s); retrying in %.1fs", self.last_error, delay)
            except Exception:
                log.exception("feedback upload crashed; retrying")
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
