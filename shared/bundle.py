"""The bundle: one model, built once, with every variant, its measurements and a signature.

A bundle is a directory::

    manifest.json      what is here (pydantic :class:`Manifest`), with every file's sha256
    manifest.sig       Ed25519 signature over the exact bytes of manifest.json
    <variant>.onnx     one file per variant (cloud fp32/int8/fp16, edge, ...)
    samples.msgpack    a few inputs and the outputs each variant gave at build time

and, for transfer, a single-file archive (``.tandem``, an uncompressed tar of that directory).

:func:`load_bundle` verifies the signature against trusted keys (the default), parses the manifest,
rejects paths that escape the directory and checks every file's sha256 — it returns a whole
:class:`Bundle` or raises a specific :class:`~tandem.shared.errors.BundleError`; nothing half-loads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import signing
from .errors import (
    BundleError,
    BundleNotFound,
    HashMismatch,
    ManifestError,
    MissingFile,
    UnsafePath,
    UnsupportedSchema,
)
from .profile import ReferenceProfile
from .tensors import DATATYPE_TO_DTYPE, decode_tensors, encode_tensors, packb, unpackb

SCHEMA_VERSION = 2
#: Manifests this Tandem reads: version 1 lacks the task metric, pad values and confidence heads,
#: which all default to what version 1 meant (accuracy, never pad, max-softmax).
READABLE_SCHEMA_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
SAMPLES_NAME = "samples.msgpack"
ARCHIVE_SUFFIX = ".tandem"

#: What a model name, version or variant name may be (each becomes a path component).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)

Precision = Literal["fp32", "fp16", "int8-qdq", "int8-dynamic"]
#: How the edge scores its own answer: max softmax or top-2 margin over a classifier's scores, a
#: logistic "is the edge good enough here?" head trained at build time (:class:`ConfidenceHead`), or
#: a function the application supplies (``custom``; the bundle then only records its calibration).
Confidence = Literal["max_softmax", "margin", "head", "custom"]
TaskKind = Literal["classification", "regression", "embedding", "custom", "other"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class TensorSpec(_Model):
    """One input or output: name, Open Inference Protocol datatype, shape (str = symbolic dim).

    ``pad`` is the value a server may fill a dynamic non-batch axis with to batch requests of
    different lengths together (0 for token ids and attention masks); None means the tensor must
    never be padded, so only requests of equal shape share a batch.
    """

    name: str
    datatype: str
    shape: list[int | str]
    pad: float | None = None

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, v: str) -> str:
        if v not in DATATYPE_TO_DTYPE:
            raise ValueError(f"unknown datatype {v!r}")
        return v


class Task(_Model):
    """What the model computes and how its quality is measured.

    ``metric`` names the quality every variant is judged by (higher is better): ``accuracy`` for
    classification (against labels, else agreement with the reference variant's argmax), ``cosine``
    to the reference for embeddings, ``1 - relative error`` (``rel_quality``) for regression, or the
    name of the spec's own metric. ``tolerance`` turns the metric into a per-row verdict used by
    calibration and the router: a row is good when its cosine is at least ``tolerance`` (embedding)
    or its relative error at most ``tolerance`` (regression).
    """

    kind: TaskKind = "classification"
    labels: list[str] | None = None
    #: The output holding the scores/logits/embedding the task and the router read.
    output: str | None = None
    #: Whether ``output`` holds logits (softmax is applied for confidence) or probabilities.
    output_is_logits: bool = True
    metric: str = "accuracy"
    tolerance: float | None = None


class Hardware(_Model):
    cpu: str
    cores: int
    machine: str
    system: str
    providers: list[str] = Field(default_factory=list)
    flags: list[str] = Field(default_factory=list)


class VariantMetrics(_Model):
    """Measured, never assumed. Quality on the held-out split; latency on ``hardware``."""

    accuracy: float | None = None
    #: Agreement of argmax with the reference variant (models without labels, or as extra info).
    agreement: float | None = None
    cosine: float | None = None
    #: The task's metric (``Task.metric``; higher is better), the number every budget reads.
    quality: float | None = None
    #: Every other measure of quality the build took (e.g. ``top10_overlap``, ``rel_error``).
    metrics: dict[str, float] = Field(default_factory=dict)
    n_eval: int
    latency_p50_ms: float
    latency_p99_ms: float
    latency_batch_size: int = 1
    throughput_per_s: float
    throughput_batch_size: int
    intra_op_threads: int
    provider: str
    hardware: Hardware
    tool_versions: dict[str, str] = Field(default_factory=dict)


class Variant(_Model):
    name: str
    #: "cloud" and "edge" are the roles the tiers serve; others (e.g. "candidate") are kept for reference.
    role: str
    file: str
    sha256: str
    size_bytes: int
    precision: Precision
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    parent: str | None = None
    metrics: VariantMetrics | None = None
    notes: str | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"variant name {v!r} must match {_NAME_RE.pattern}")
        return v


class CalibrationPoint(_Model):
    """One threshold on the edge confidence. "Accuracy" here is the share of good rows by the task's
    per-row verdict (``Calibration.metric``): right label, or within the task's tolerance."""

    threshold: float
    #: Share of inputs whose edge confidence is >= threshold (kept on the edge).
    keep_share: float
    #: Edge accuracy on the kept inputs (None when none are kept).
    edge_accuracy_kept: float | None
    #: Accuracy of the whole cascade: edge on kept inputs, reference (cloud) variant on the rest.
    cascade_accuracy: float


class ConfidenceHead(_Model):
    """A logistic regression over features of the edge output, trained at build time to predict
    whether the edge's answer is good enough (``Task.tolerance``) against the cloud's:
    ``confidence = sigmoid(weights . ((features - mean) / scale) + bias)``.

    ``features`` is ``output`` (the output row itself, flattened) followed by ``norm`` (its L2 norm)
    and, for classification scores, ``max_softmax`` and ``margin``, in the order listed.
    """

    output: str
    features: list[Literal["output", "norm", "max_softmax", "margin"]]
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float

    @staticmethod
    def features_of(rows: np.ndarray, features: Sequence[str]) -> np.ndarray:
        """The head's input: ``features`` of each row of ``rows`` ([batch, ...]), side by side."""
        z = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
        parts: list[np.ndarray] = []
        for f in features:
            if f == "output":
                parts.append(z)
            elif f == "norm":
                parts.append(np.linalg.norm(z, axis=1, keepdims=True))
            else:
                p = np.exp(z - z.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                top = -np.sort(-p, axis=1)
                parts.append(top[:, :1] if f == "max_softmax" else top[:, :1] - top[:, 1:2])
        return np.concatenate(parts, axis=1)

    def score(self, rows: np.ndarray) -> np.ndarray:
        """Confidence per row of ``rows`` ([batch, ...] output), in [0, 1]."""
        x = self.features_of(rows, self.features)
        if x.shape[1] != len(self.weights):
            raise ValueError(f"confidence head expects {len(self.weights)} features from {self.output}, got {x.shape[1]}")
        logit = ((x - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.weights) + self.bias
        return 1.0 / (1.0 + np.exp(-logit))


class Calibration(_Model):
    variant: str
    reference: str
    confidence: Confidence = "max_softmax"
    split: str = "validation"
    n: int
    points: list[CalibrationPoint]
    #: The per-row verdict the points count: ``accuracy`` (label or reference argmax), or the task
    #: metric with its tolerance, e.g. ``cosine>=0.9``.
    metric: str = "accuracy"
    #: Set when ``confidence`` is ``head``.
    head: ConfidenceHead | None = None

    def threshold_for(self, target_accuracy: float) -> CalibrationPoint | None:
        """The point keeping the most inputs on the edge whose cascade accuracy meets the target."""
        ok = [p for p in self.points if p.cascade_accuracy >= target_accuracy]
        return max(ok, key=lambda p: (p.keep_share, -p.threshold)) if ok else None


class Samples(_Model):
    file: str
    sha256: str
    size_bytes: int
    count: int
    #: Largest absolute difference a device may see against the recorded outputs and still accept.
    atol: float = 1e-3


class Provenance(_Model):
    source: str
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    build_config: dict[str, Any] = Field(default_factory=dict)
    tool_versions: dict[str, str] = Field(default_factory=dict)
    hardware: Hardware | None = None


class Manifest(_Model):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    description: str | None = None
    task: Task = Field(default_factory=Task)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    variants: list[Variant]
    calibration: Calibration | None = None
    samples: Samples | None = None
    provenance: Provenance
    #: What the inputs and outputs looked like on the validation split (:mod:`.profile`): what
    #: the tiers' drift monitors compare live traffic with. Optional; a manifest without it omits
    #: the key, so its bytes are those of a manifest from before the field existed.
    profile: ReferenceProfile | None = None

    @field_validator("name", "version")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} must match {_NAME_RE.pattern}")
        return v

    def variant(self, role_or_name: str) -> Variant:
        """The variant with this name, else the first with this role; KeyError if none."""
        for v in self.variants:
            if v.name == role_or_name:
                return v
        for v in self.variants:
            if v.role == role_or_name:
                return v
        raise KeyError(f"bundle {self.name}:{self.version} has no variant or role {role_or_name!r}")

    def file_entries(self, variants: Sequence[str] | None = None) -> Iterator[tuple[str, str, int]]:
        """(relative path, sha256, size) of every file the manifest covers (or of only the named
        variants, by name or role, plus the samples)."""
        chosen = self.variants if variants is None else [self.variant(v) for v in variants]
        for v in chosen:
            yield v.file, v.sha256, v.size_bytes
        if self.samples is not None:
            yield self.samples.file, self.samples.sha256, self.samples.size_bytes

    def to_json(self) -> bytes:
        exclude = {"profile"} if self.profile is None else None
        return (self.model_dump_json(indent=2, exclude_none=False, exclude=exclude) + "\n").encode()


class Bundle:
    """A verified bundle on disk. Build with :func:`load_bundle`."""

    def __init__(self, path: Path, manifest: Manifest, signer: str | None) -> None:
        self.path = path
        self.manifest = manifest
        #: Key id that signed the manifest, or None when loaded with ``verify_signature=False``.
        self.signer = signer

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def variant(self, role_or_name: str) -> Variant:
        return self.manifest.variant(role_or_name)

    def variant_path(self, role_or_name: str) -> Path:
        return self.path / self.variant(role_or_name).file

    def load_samples(self) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
        """(inputs, {variant name: outputs}) recorded at build time."""
        if self.manifest.samples is None:
            return {}, {}
        return read_samples(self.path / self.manifest.samples.file)

    def __repr__(self) -> str:
        return f"Bundle({self.name}:{self.version} at {self.path})"


# --- helpers ------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_join(root: Path, relative: str) -> Path:
    """``root / relative``, refusing absolute paths, ``..``, and symlinks that lead outside root."""
    rel = PurePosixPath(relative)
    if not relative or rel.is_absolute() or ".." in rel.parts or "\\" in relative or relative.startswith("~"):
        raise UnsafePath(f"path {relative!r} escapes the bundle directory")
    target = (root / rel).resolve()
    root_resolved = root.resolve()
    if target != root_resolved and root_resolved not in target.parents:
        raise UnsafePath(f"path {relative!r} resolves outside the bundle directory")
    return target


def write_samples(
    path: str | os.PathLike[str], inputs: Mapping[str, np.ndarray], outputs: Mapping[str, Mapping[str, np.ndarray]]
) -> None:
    doc = {"inputs": encode_tensors(inputs), "outputs": {k: encode_tensors(v) for k, v in outputs.items()}}
    Path(path).write_bytes(packb(doc))


def read_samples(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    doc = unpackb(Path(path).read_bytes())
    if not isinstance(doc, dict) or "inputs" not in doc or "outputs" not in doc:
        raise BundleError(f"{path}: samples file must hold 'inputs' and 'outputs'")
    return decode_tensors(doc["inputs"]), {k: decode_tensors(v, f"outputs[{k}]") for k, v in doc["outputs"].items()}


# --- writing ------------------------------------------------------------------------------------


def file_digest(root: Path, relative: str) -> tuple[str, int]:
    """(sha256, size) of a file inside a bundle directory being built."""
    p = safe_join(root, relative)
    if not p.is_file():
        raise MissingFile(f"{relative} is not in {root}")
    return sha256_file(p), p.stat().st_size


def seal_bundle(directory: str | os.PathLike[str], manifest: Manifest, private_key: Ed25519PrivateKey) -> Manifest:
    """Fill in every file's sha256/size, write manifest.json and sign it. Returns the final manifest.

    The files named by ``manifest`` must already be in ``directory``; the ``sha256``/``size_bytes``
    fields given are overwritten with what is on disk.
    """
    root = Path(directory)
    m = manifest.model_copy(deep=True)
    for v in m.variants:
        v.sha256, v.size_bytes = file_digest(root, v.file)
    if m.samples is not None:
        m.samples.sha256, m.samples.size_bytes = file_digest(root, m.samples.file)
    data = m.to_json()
    _atomic_write(root / MANIFEST_NAME, data)
    _atomic_write(root / SIGNATURE_NAME, signing.sign(data, private_key))
    return m


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- loading ------------------------------------------------------------------------------------


def read_manifest(directory: str | os.PathLike[str]) -> tuple[bytes, Manifest]:
    """The raw bytes and parsed manifest, without any signature or hash check."""
    root = Path(directory)
    if not root.is_dir():
        raise BundleNotFound(f"bundle directory {root} does not exist")
    mpath = root / MANIFEST_NAME
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{mpath} is missing: not a Tandem bundle") from None
    return raw, parse_manifest(raw, str(mpath))


def parse_manifest(raw: bytes, where: str = MANIFEST_NAME) -> Manifest:
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{where} must hold a JSON object")
    sv = doc.get("schema_version")
    if sv not in READABLE_SCHEMA_VERSIONS:
        raise UnsupportedSchema(
            f"{where} has schema_version {sv!r}; this Tandem reads schema_version "
            + " or ".join(str(v) for v in READABLE_SCHEMA_VERSIONS)
        )
    try:
        return Manifest.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ManifestError(f"{where} does not match the manifest schema at {loc}: {first['msg']}") from None


def load_bundle(
    directory: str | os.PathLike[str],
    trusted_keys: Sequence[Ed25519PublicKey | str | os.PathLike[str]] | Ed25519PublicKey | str | os.PathLike[str] | None = None,
    *,
    verify_signature: bool = True,
    check_hashes: bool = True,
    variants: Sequence[str] | None = None,
) -> Bundle:
    """Load and verify a bundle directory.

    Signature verification against ``trusted_keys`` is the default; pass ``verify_signature=False``
    to skip it knowingly (tests, local development). File hashes are always checked unless
    ``check_hashes=False``. ``variants`` (names or roles) limits the file checks to those variants
    and the samples: a device that holds only the edge variant loads with ``variants=["edge"]``.
    """
    root = Path(directory)
    if root.is_file() and root.name.endswith(ARCHIVE_SUFFIX):
        raise BundleError(f"{root} is an archive: unpack it first with unpack_archive()")
    # Parse before verifying so that a broken manifest is reported as such; nothing from it is
    # trusted (no path is opened) until the signature has been checked.
    raw, manifest = read_manifest(root)
    signer = None
    if verify_signature:
        keys = _as_key_list(trusted_keys)
        sig_path = root / SIGNATURE_NAME
        sig = sig_path.read_bytes() if sig_path.is_file() else None
        signer = signing.verify(raw, sig, keys)
    for rel, digest, size in manifest.file_entries(variants):
        p = safe_join(root, rel)
        if not p.is_file():
            raise MissingFile(f"bundle file {rel} is missing from {root}")
        if check_hashes:
            actual_size = p.stat().st_size
            if actual_size != size:
                raise HashMismatch(f"bundle file {rel} is {actual_size} bytes; the manifest says {size}")
            actual = sha256_file(p)
            if actual != digest:
                raise HashMismatch(f"bundle file {rel} has sha256 {actual[:16]}…; the manifest says {digest[:16]}…")
    return Bundle(root.resolve(), manifest, signer)


def _as_key_list(trusted: Any) -> list[Ed25519PublicKey]:
    if trusted is None:
        return []
    if isinstance(trusted, (Ed25519PublicKey, str, os.PathLike, bytes)):
        trusted = [trusted]
    return [signing.load_public_key(k) for k in trusted]


# --- archives -----------------------------------------------------------------------------------


def pack_archive(directory: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write the bundle (manifest, signature and the files it covers, nothing else) as one tar file."""
    root = Path(directory)
    raw, manifest = read_manifest(root)
    out_path = Path(out) if out else root.with_name(f"{manifest.name}-{manifest.version}{ARCHIVE_SUFFIX}")
    names = [MANIFEST_NAME, SIGNATURE_NAME] + [rel for rel, _, _ in manifest.file_entries()]
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for name in names:
            p = safe_join(root, name)
            if p.is_file():
                tar.add(p, arcname=name, recursive=False)
    os.replace(tmp, out_path)
    return out_path


def unpack_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Unpack a ``.tandem`` archive into ``dest`` (created fresh); refuses unsafe members."""
    archive, dest = Path(archive), Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise BundleError(f"{dest} exists and is not empty; refusing to unpack over it")
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"{archive} is not a readable bundle archive: {e}") from None
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent if dest.parent.exists() else None))
    try:
        with tar:
            for member in tar.getmembers():
                if not (member.isfile() or member.isdir()):
                    raise UnsafePath(f"archive member {member.name!r} is not a regular file")
                safe_join(staging, member.name)
            tar.extractall(staging, filter="data")
        dest.mkdir(parents=True, exist_ok=True)
        for child in staging.iterdir():
            os.replace(child, dest / child.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def version_key(version: str) -> tuple[Any, ...]:
    """Natural sort key so that "10" > "9" and "1.10" > "1.9"."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[._-]", version))


def _quality(m: VariantMetrics) -> float | None:
    for v in (m.quality, m.accuracy, m.agreement):
        if v is not None:
            return v
    return None


def describe(bundle: Bundle | Manifest) -> str:
    """A human-readable summary (used by ``tandem bundle inspect``)."""
    m = bundle.manifest if isinstance(bundle, Bundle) else bundle
    out = io.StringIO()
    t = m.task
    out.write(f"{m.name}:{m.version}  ({t.kind}, quality = {t.metric}")
    if t.tolerance is not None:
        out.write(f", per-row tolerance {t.tolerance:g}")
    if t.labels:
        out.write(f", {len(t.labels)} labels")
    out.write(")\n")
    for spec in m.inputs:
        pad = f"  (pad {spec.pad:g})" if spec.pad is not None else ""
        out.write(f"  input  {spec.name}: {spec.datatype}{spec.shape}{pad}\n")
    for spec in m.outputs:
        out.write(f"  output {spec.name}: {spec.datatype}{spec.shape}\n")
    out.write(f"  {'variant':<22}{'role':<11}{'precision':<14}{'size':>10}{t.metric[:10]:>11}{'p50 ms':>9}{'p99 ms':>9}{'thr/s':>10}\n")
    for v in m.variants:
        q = p50 = p99 = thr = "-"
        if v.metrics:
            qv = _quality(v.metrics)
            q = f"{qv:.4f}" if qv is not None else "-"
            p50, p99, thr = f"{v.metrics.latency_p50_ms:.3f}", f"{v.metrics.latency_p99_ms:.3f}", f"{v.metrics.throughput_per_s:.0f}"
        out.write(f"  {v.name:<22}{v.role:<11}{v.precision:<14}{v.size_bytes / 1e6:>8.2f}MB{q:>11}{p50:>9}{p99:>9}{thr:>10}\n")
        extra = {k: val for k, val in (v.metrics.metrics if v.metrics else {}).items()}
        if extra:
            out.write("  " + " " * 22 + ", ".join(f"{k} {val:.4f}" for k, val in sorted(extra.items())) + "\n")
    if m.calibration:
        c = m.calibration
        out.write(f"  calibration: {c.variant} vs {c.reference} on {c.n} {c.split} inputs "
                  f"(confidence {c.confidence}, rows judged by {c.metric})\n")
    if m.samples:
        out.write(f"  samples: {m.samples.count} in {m.samples.file}\n")
    if m.profile:
        pr = m.profile
        out.write(f"  profile: {len(pr.inputs)} input features, outputs of {', '.join(sorted(pr.outputs)) or 'none'} "
                  f"on {pr.n} {pr.split} inputs\n")
    out.write(f"  built {m.provenance.created_at} from {m.provenance.source}\n")
    return out.getvalue()
