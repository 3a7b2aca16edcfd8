"""The device's model store: installed versions, the atomic "active" pointer, probation, rollback.

Layout under the agent's data directory::

    models/<name>/<version>/   an installed bundle: manifest.json, manifest.sig, the edge variant, samples
    models/<name>/active.json  {"version", "history"}: the pointer apps are served from
    models/<name>/state.json   the last update attempt and its outcome, and versions refused
    tmp/<name>/<version>/      a download in progress (``*.part`` files are resumed)

Nothing is ever half-visible: a download is verified in ``tmp/``, renamed into ``models/`` in one
step, smoke-tested (probation) and only then activated by replacing ``active.json`` (written to a
temporary file, fsynced, ``os.replace``-d). A crash at any point leaves either the old pointer or the
new one; :meth:`ModelStore.recover` cleans up whatever a crash left behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.shared.bundle import NAME_PATTERN, Bundle, load_bundle, version_key
from tandem.shared.errors import BundleError, TandemError, UnsafePath

log = logging.getLogger(__name__)

EDGE_ROLE = "edge"
ACTIVE_NAME = "active.json"
STATE_NAME = "state.json"
#: Test hook: ``TANDEM_AGENT_TEST_CRASH_AT=download|activate`` makes the agent SIGKILL itself at
#: that point (mid-download after the first chunk; after the new version is in place but before the
#: pointer moves) so tests can prove restarts are consistent. Never set it in production.
CRASH_ENV = "TANDEM_AGENT_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        log.warning("test hook %s=%s: killing the agent now", CRASH_ENV, name)
        os.kill(os.getpid(), signal.SIGKILL)


class ProbationFailed(BundleError):
    """The new version's outputs on the bundle's samples differ from the ones recorded at build time."""

    code = "probation_failed"


_NAME_RE = re.compile(NAME_PATTERN)


def check_name(value: object, what: str) -> str:
    """``value`` if it is a valid model name or version, else :class:`UnsafePath`.

    Names and versions come from the registry and become path components under the data directory:
    anything but a plain name (``/abs``, ``..``, ``%2e%2e%2f``, NUL, backslash, newline) is refused
    before a path is built from it.
    """
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise UnsafePath(f"{what} {value!r} is not a valid name: it must match {NAME_PATTERN} "
                         "(letters, digits, '.', '_', '-'; no path separators)")
    return value


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def contained(root: Path, *parts: str) -> Path:
    """``root/part/...``, refusing invalid names and any symlink along the way.

    The agent never creates symlinks in its data directory, so one there was planted: following it
    could make a removal or a write land anywhere (outside the data directory, or on another version).
    """
    for part in parts:
        check_name(part, "path component")
    root_resolved = root.resolve()
    target = root_resolved.joinpath(*parts)
    real = target.resolve()
    if real != target:
        raise UnsafePath(f"{target} leads through a symlink to {real}; the agent does not follow symlinks "
                         "in its data directory and refuses to touch it")
    return target


def write_json_atomic(path: Path, doc: Any) -> None:
    """Replace ``path`` with ``doc`` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError):
        # Only written through write_json_atomic, so this is outside damage: treat as absent.
        log.warning("%s is unreadable; ignoring it", path)
        return default


def make_session(model_path: Path, intra_op_threads: int = 1) -> Any:
    """An onnxruntime CPU session sized not to oversubscribe a small device."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def probation(bundle: Bundle, intra_op_threads: int = 1) -> str:
    """Smoke-run the edge variant on the bundle's samples against the outputs recorded at build time.

    Returns a one-line summary; raises :class:`ProbationFailed` on any difference beyond the
    manifest's tolerance (or a model that does not run at all).
    """
    variant = bundle.variant(EDGE_ROLE)
    samples = bundle.manifest.samples
    try:
        session = make_session(bundle.path / variant.file, intra_op_threads)
    except Exception as e:
        raise ProbationFailed(f"{bundle.name}:{bundle.version}: the edge variant does not load: {e}") from None
    if samples is None:
        return "no samples in the bundle: load check only"
    inputs, recorded = bundle.load_samples()
    expected = recorded.get(variant.name)
    if expected is None:
        raise ProbationFailed(f"{bundle.name}:{bundle.version}: samples hold no outputs for {variant.name}")
    try:
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(names, {k: v for k, v in inputs.items()})))
    except Exception as e:
        raise ProbationFailed(f"{bundle.name}:{bundle.version}: the edge variant fails on its samples: {e}") from None
    for name, want in expected.items():
        have = got.get(name)
        if have is None or have.shape != want.shape:
            raise ProbationFailed(f"{bundle.name}:{bundle.version}: output {name!r} is missing or has another shape")
        diff = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
        if not diff <= samples.atol:
            raise ProbationFailed(
                f"{bundle.name}:{bundle.version}: output {name!r} differs from the recorded one by {diff:.3g} "
                f"(> atol {samples.atol:g}) on {samples.count} samples"
            )
    return f"{samples.count} samples match the recorded outputs (atol {samples.atol:g})"


@dataclass(frozen=True)
class Activation:
    name: str
    version: str
    path: Path
    previous: str | None


class ModelStore:
    """Installed versions of every tracked model under ``DATA/models``. Not thread-safe: one owner."""

    def __init__(self, data_dir: str | os.PathLike[str], trusted_keys: list[Any], keep_versions: int = 3,
                 intra_op_threads: int = 1) -> None:
        self.data_dir = Path(data_dir)
        self.models_dir = self.data_dir / "models"
        self.tmp_dir = self.data_dir / "tmp"
        self.trusted_keys = trusted_keys
        self.keep_versions = keep_versions
        self.intra_op_threads = intra_op_threads
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for d in (self.models_dir, self.tmp_dir):
            if d.is_symlink():
                raise UnsafePath(f"{d} is a symlink (to {d.resolve()}); the agent keeps its models only in real "
                                 "directories under its data directory")

    # --- reading ---------------------------------------------------------------------------------

    # Every path below is built with ``contained``: a name or version that is not a plain name, or a
    # symlink leading out of the data directory, raises UnsafePath before anything is read or removed.

    def model_dir(self, name: str) -> Path:
        return contained(self.models_dir, check_name(name, "model name"))

    def version_dir(self, name: str, version: str) -> Path:
        return contained(self.models_dir, check_name(name, "model name"), check_name(version, "version"))

    def _read_model_file(self, name: str, file: str) -> dict[str, Any]:
        try:
            path = self.model_dir(name) / file
        except UnsafePath as e:
            log.error("%s", e.message)
            return {}
        doc = read_json(path, {})
        return doc if isinstance(doc, dict) else {}

    def active_version(self, name: str) -> str | None:
        v = self._read_model_file(name, ACTIVE_NAME).get("version")
        return v if isinstance(v, str) else None

    def history(self, name: str) -> list[str]:
        h = self._read_model_file(name, ACTIVE_NAME).get("history", [])
        return [v for v in h if isinstance(v, str)] if isinstance(h, list) else []

    def active_path(self, name: str) -> Path | None:
        v = self.active_version(name)
        return self.version_dir(name, v) if v else None

    def installed(self, name: str) -> list[str]:
        """Installed versions: real directories with valid names (a planted symlink is not one)."""
        try:
            d = self.model_dir(name)
        except UnsafePath:
            return []
        if not d.is_dir():
            return []
        return sorted((p.name for p in d.iterdir()
                       if p.is_dir() and not p.is_symlink() and _NAME_RE.fullmatch(p.name)), key=version_key)

    def models(self) -> list[str]:
        return sorted(p.name for p in self.models_dir.iterdir()
                      if p.is_dir() and not p.is_symlink() and _NAME_RE.fullmatch(p.name))

    def state(self, name: str) -> dict[str, Any]:
        return self._read_model_file(name, STATE_NAME)

    def load(self, name: str, version: str) -> Bundle:
        """The installed version, re-verified (signature and the hashes of the files a device holds)."""
        return load_bundle(self.version_dir(name, version), self.trusted_keys, variants=[EDGE_ROLE])

    # --- state -----------------------------------------------------------------------------------

    def record_attempt(self, name: str, version: str | None, outcome: str, message: str = "",
                       code: str | None = None, manifest_sha256: str | None = None) -> None:
        """Remember the last update attempt; refused versions are remembered by manifest hash so the
        same bytes are not downloaded and refused again on every poll."""
        self.model_dir(name).mkdir(parents=True, exist_ok=True)
        state = self.state(name)
        state["last_attempt"] = {"at": time.time(), "version": version, "outcome": outcome,
                                 "message": message, "code": code}
        if outcome == "refused" and version and manifest_sha256:
            state.setdefault("refused", {})[version] = {"manifest_sha256": manifest_sha256, "code": code,
                                                        "message": message}
        if outcome not in ("up-to-date", "offline", "error"):
            state.setdefault("log", []).append(state["last_attempt"])
            state["log"] = state["log"][-20:]
        write_json_atomic(self.model_dir(name) / STATE_NAME, state)

    def is_refused(self, name: str, version: str, manifest_sha256: str) -> bool:
        r = self.state(name).get("refused", {}).get(version)
        return bool(r) and r.get("manifest_sha256") == manifest_sha256

    # --- installing --------------------------------------------------------------------------------

    def staging_dir(self, name: str, version: str) -> Path:
        return contained(self.tmp_dir, check_name(name, "model name"), check_name(version, "version"))

    def install(self, staging: Path, name: str, version: str) -> Activation:
        """Verify a complete download in ``staging``, move it into place, run probation, activate.

        On any failure the active version is untouched (that is the rollback) and the error is raised.
        """
        bundle = load_bundle(staging, self.trusted_keys, variants=[EDGE_ROLE])
        if (bundle.name, bundle.version) != (name, version):
            raise BundleError(
                f"the registry served {bundle.name}:{bundle.version} for {name}:{version}; refusing it"
            )
        target = self.version_dir(name, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            # A leftover of an earlier crashed or refused attempt; never the active version (the
            # caller does not reinstall that), so it is safe to replace.
            if version == self.active_version(name):
                raise BundleError(f"{name}:{version} is already active")
            shutil.rmtree(target)
        os.replace(staging, target)
        _fsync_dir(target.parent)
        return self.activate(name, version)

    def activate(self, name: str, version: str) -> Activation:
        """Probation-test an installed version and make it active; removes it if it fails."""
        crash_point("activate")
        path = self.version_dir(name, version)
        try:
            bundle = self.load(name, version)
            summary = probation(bundle, self.intra_op_threads)
        except TandemError:
            shutil.rmtree(path, ignore_errors=True)
            raise
        previous = self.active_version(name)
        history = [v for v in self.history(name) if v != version] + [version]
        write_json_atomic(self.model_dir(name) / ACTIVE_NAME,
                          {"version": version, "history": history, "activated_at": time.time(),
                           "probation": summary})
        log.info("activated %s:%s (previous %s): %s", name, version, previous, summary)
        self.prune(name)
        return Activation(name, version, path, previous)

    def rollback(self, name: str, reason: str) -> Activation | None:
        """Go back to the previous good version still on disk (e.g. the active one fails live)."""
        current = self.active_version(name)
        history = self.history(name)
        for v in reversed(history[:-1]):
            try:
                self.load(name, v)
            except TandemError:
                continue
            write_json_atomic(self.model_dir(name) / ACTIVE_NAME,
                              {"version": v, "history": [h for h in history if h != current],
                               "activated_at": time.time(), "rolled_back_from": current, "reason": reason})
            if current:
                self._remove_version(name, current)
            return Activation(name, v, self.version_dir(name, v), current)
        return None

    def prune(self, name: str) -> None:
        """Keep the newest ``keep_versions`` activated versions (the active one always); drop the rest."""
        history = self.history(name)
        keep = set(history[-self.keep_versions:])
        active = self.active_version(name)
        if active:
            keep.add(active)
        for v in self.installed(name):
            if v not in keep:
                self._remove_version(name, v)
        if len(history) > len([h for h in history if h in keep]):
            doc = read_json(self.model_dir(name) / ACTIVE_NAME, {})
            doc["history"] = [h for h in history if h in keep]
            write_json_atomic(self.model_dir(name) / ACTIVE_NAME, doc)

    def _remove_version(self, name: str, version: str) -> None:
        """Delete an installed version, but only a real directory inside the data directory."""
        try:
            path = self.version_dir(name, version)
        except UnsafePath as e:
            log.error("not removing %s:%s: %s", name, version, e.message)
            return
        shutil.rmtree(path, ignore_errors=True)

    # --- after a crash ---------------------------------------------------------------------------

    def recover(self) -> dict[str, str | None]:
        """Bring the store back to a consistent state after a restart; returns {name: active version}.

        The active version must verify, else the newest earlier good version is made active. A
        version directory that was moved in but never activated (crash mid-activation) is probed
        again: activated if it is newer than the active one and passes, else removed. Downloads in
        ``tmp/`` are left for the updater to resume.
        """
        result: dict[str, str | None] = {}
        for d in self.models_dir.iterdir():
            if not d.is_dir():
                continue
            name = d.name
            if d.is_symlink() or not _NAME_RE.fullmatch(name):
                # Not something the agent made: never follow it, never delete through it.
                log.error("ignoring %s: not a model directory the agent created (a symlink or an invalid name)", d)
                continue
            for leftover in d.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)
            active = self.active_version(name)
            if active is not None:
                try:
                    self.load(name, active)
                except TandemError as e:
                    log.error("active version %s:%s no longer verifies (%s); rolling back", name, active, e)
                    back = self.rollback(name, f"active version failed verification on start: {e.message}")
                    active = back.version if back else None
                    if back is None:
                        (d / ACTIVE_NAME).unlink(missing_ok=True)
            known = set(self.history(name))
            for v in self.installed(name):
                if v in known:
                    continue
                newer = active is None or version_key(v) > version_key(active)
                if newer:
                    try:
                        active = self.activate(name, v).version
                        self.record_attempt(name, v, "activated", "finished an interrupted activation on start")
                        continue
                    except TandemError as e:
                        self.record_attempt(name, v, "refused", e.message, e.code)
                self._remove_version(name, v)
            result[name] = active
        return result
