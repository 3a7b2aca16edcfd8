"""What runs the rows: the :class:`Compute` contract and the embedded engine's implementation
(one onnxruntime session of a bundle's variant), plus how a chunk's rows become model calls."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tandem.shared.bundle import MANIFEST_NAME, Bundle, load_bundle, read_manifest, version_key
from tandem.shared.errors import BundleError, InferenceFailed, InvalidInput, ModelNotFound, TandemError
from tandem.shared.tensors import dtype_of

from .formats import Rows

__all__ = ["Compute", "EngineCompute", "load_model", "scatter", "to_batches"]


# --- the model ----------------------------------------------------------------------------------


def load_model(
    model: str,
    *,
    repository: str | os.PathLike[str] | None = None,
    trusted_keys: Sequence[str | os.PathLike[str]] = (),
    verify_signature: bool = True,
    variant: str = "cloud",
) -> Bundle:
    """The bundle ``model`` names: a bundle directory, or with ``repository`` ``name`` (its latest
    version) or ``name:version`` in it. Its signature is checked against ``trusted_keys`` (unless
    ``verify_signature=False``) and the hashes of ``variant``'s files always."""
    if verify_signature and not trusted_keys:
        raise InvalidInput("give --trusted-key PUB.pem (or --insecure-skip-signature to load unsigned bundles knowingly)")
    path = Path(model)
    if (path / MANIFEST_NAME).is_file():
        directory = path
    elif repository is not None:
        name, _, version = model.partition(":")
        for part, what in ((name, "model name"), (version, "version")):
            if part and (part in (".", "..") or "/" in part or "\\" in part or "\0" in part):
                raise InvalidInput(f"MODEL {model!r}: the {what} {part!r} is not a plain name")
        if not name:
            raise InvalidInput(f"MODEL {model!r}: give name or name:version")
        mdir = Path(repository) / name
        versions = sorted(
            (v.name for v in mdir.iterdir() if (v / MANIFEST_NAME).is_file()) if mdir.is_dir() else [], key=version_key
        )
        if not versions:
            raise ModelNotFound(f"no model {name!r} in the repository {repository} (no {name}/<version>/{MANIFEST_NAME})")
        if version and version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version!r} in {repository} (it has {', '.join(versions)})")
        directory = mdir / (version or versions[-1])
    elif path.exists():
        raise InvalidInput(f"MODEL {model}: not a bundle directory (no {MANIFEST_NAME}); give a bundle directory, "
                           "or --repository REPO with MODEL as name or name:version")
    else:
        raise InvalidInput(f"MODEL {model}: no such bundle directory (with --repository REPO, MODEL is name or name:version)")
    try:
        bundle = load_bundle(directory, list(trusted_keys), verify_signature=verify_signature, variants=[variant])
        bundle.variant(variant)
    except KeyError as e:  # no such variant or role
        names = ", ".join(f"{v.name} ({v.role})" for v in read_manifest(directory)[1].variants)
        raise BundleError(f"{e.args[0] if e.args else e}; it has {names}") from None
    return bundle


class Compute(Protocol):
    """What runs the rows: the embedded engine, or a job queue."""

    #: What the results depend on (model, version, variant digest or queue URL): part of the plan.
    identity: dict[str, Any]
    #: (name, numpy dtype, rank) of each model input, in the model's order.
    inputs: list[tuple[str, np.dtype, int]]
    output_names: list[str]

    def check(self, rows: dict[str, np.ndarray], where: str) -> None:
        """Raise InvalidInput (naming ``where``) if these rows do not fit the model."""

    def begin(self, run_id: str) -> None:
        """Called once per run with an id unique to the run's plan (stable across resumes)."""

    def run(self, chunk: int, rows: Rows, where: str) -> list[dict[str, np.ndarray]] | dict[str, np.ndarray]:
        """The outputs of ``rows``: stacked arrays by output name, or one dict per row."""

    def close(self) -> None: ...


class EngineCompute:
    """Rows through one onnxruntime session of the bundle's variant, ``batch_size`` rows per run."""

    def __init__(self, bundle: Bundle, variant: str, *, threads: int, batch_size: int) -> None:
        from ..engine import ModelEngine

        self.engine = ModelEngine(
            bundle.variant_path(variant),
            intra_op_threads=threads,
            declared_inputs=bundle.manifest.inputs,
            declared_outputs=bundle.manifest.outputs,
        )
        if not self.engine.batchable:
            raise InvalidInput(
                f"model {bundle.name}: tandem batch needs a dynamic batch (first) axis on every input and output; "
                f"this model's inputs are {[t.declared for t in self.engine.inputs]}"
            )
        self.batch_size = batch_size
        v = bundle.variant(variant)
        self.identity = {"model": bundle.name, "version": bundle.version, "variant": v.name, "variant_sha256": v.sha256}
        self.inputs = [(t.name, dtype_of(t.datatype), len(t.shape)) for t in self.engine.inputs]
        self.output_names = list(self.engine.output_names)

    def check(self, rows: dict[str, np.ndarray], where: str) -> None:
        try:
            self.engine.check_inputs(rows)
        except TandemError as e:
            raise type(e)(f"{where}: {e.message}") from None

    def begin(self, run_id: str) -> None:
        pass

    def run(self, chunk: int, rows: Rows, where: str) -> list[dict[str, np.ndarray]] | dict[str, np.ndarray]:
        if isinstance(rows, dict):
            return self._run_stacked(rows, where)
        batches, idx = to_batches(rows, self.batch_size)
        results = []
        for feeds in batches:
            self.check(feeds, where)
            results.append(self.engine.run(0, feeds))
        return scatter(results, idx, len(rows), self.output_names)

    def _run_stacked(self, rows: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        """Rows of one shape: checked once (the batches differ only in length), then straight
        through the session, which for a small model is most of the cost of a batch."""
        self.check(rows, where)
        run, names, bs = self.engine.sessions[0].run, self.output_names, self.batch_size
        items = list(rows.items())
        n = len(items[0][1])
        parts: list[list[np.ndarray]] = [[] for _ in names]
        try:
            for s in range(0, n, bs):
                for part, out in zip(parts, run(names, {k: v[s : s + bs] for k, v in items})):
                    part.append(out)
        except Exception as e:  # onnxruntime's errors are not a public hierarchy
            raise InferenceFailed(f"{where}: inference failed: {e}") from None
        return {k: np.concatenate(part) for k, part in zip(names, parts)}

    def close(self) -> None:
        pass


def to_batches(rows: Rows, batch_size: int) -> tuple[list[dict[str, np.ndarray]], list[list[int]] | None]:
    """The model calls for a chunk's rows: consecutive slices of ``batch_size`` rows, or for rows of
    differing shapes, each window of ``batch_size`` rows grouped by shape (with the rows' indices)."""
    if isinstance(rows, dict):
        n = len(next(iter(rows.values())))
        return [{k: v[s : s + batch_size] for k, v in rows.items()} for s in range(0, n, batch_size)], None
    batches, idx = [], []
    for s in range(0, len(rows), batch_size):
        for group, feeds in _groups(rows, range(s, min(s + batch_size, len(rows)))):
            batches.append(feeds)
            idx.append(group)
    return batches, idx


def scatter(results: Sequence[Mapping[str, np.ndarray]], idx: list[list[int]] | None, n: int,
             names: list[str]) -> list[dict[str, np.ndarray]] | dict[str, np.ndarray]:
    """The outputs of :func:`to_batches`' calls back in row order."""
    if idx is None:
        return {k: np.concatenate([r[k] for r in results]) for k in names}
    out: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    for res, group in zip(results, idx):
        for j, i in enumerate(group):
            out[i] = {k: res[k][j] for k in names}
    return out


def _groups(rows: list[dict[str, np.ndarray]], window: range) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """Rows of ``window`` grouped by shape (first appearance order), each group stacked."""
    by_shape: dict[tuple[Any, ...], list[int]] = {}
    for i in window:
        key = tuple((k, v.shape) for k, v in rows[i].items())
        by_shape.setdefault(key, []).append(i)
    for idx in by_shape.values():
        yield idx, {k: np.stack([rows[i][k] for i in idx]) for k in rows[idx[0]]}
