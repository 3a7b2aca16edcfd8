"""``tandem build SPEC``: a spec (directory, .py, TOML/YAML/JSON) -> a signed bundle in the repository."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_REPOSITORY = Path("artifacts/repository")
DEFAULT_KEY = Path("artifacts/keys/tandem.key")


def build(parser: argparse.ArgumentParser) -> None:
    """Build a signed bundle (export, distill, quantize, evaluate) from a build spec."""
    parser.add_argument("spec", help="a directory with spec.py, a .py file, a TOML/YAML/JSON build spec, or an .onnx "
                        "model to bundle as it is (its int8 variants are measured and the best one becomes the edge variant)")
    onnx_group = parser.add_argument_group("bundling an ONNX model (when SPEC is an .onnx file; no torch needed)")
    onnx_group.add_argument("--edge", type=Path, default=None,
                            help="the edge model's .onnx file (default: the model itself at int8)")
    onnx_group.add_argument("--name", default=None, help="bundle name (default: the file's name without .onnx)")
    onnx_group.add_argument("--task", choices=["classification", "embedding", "regression"], default="classification",
                            help="how variants are compared with the fp32 model (default: classification)")
    onnx_group.add_argument("--data", type=Path, default=None,
                            help="an .npz of inputs keyed by input name (and optionally labels 'y') to measure on; "
                                 "default: inputs generated from the model's signature")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY,
                        help=f"model repository to write REPO/<name>/<version>/ into (default: {DEFAULT_REPOSITORY})")
    parser.add_argument("--key", type=Path, default=DEFAULT_KEY,
                        help=f"Ed25519 private key to sign with (default: {DEFAULT_KEY}, generated if missing)")
    parser.add_argument("--version", dest="bundle_version", default=None,
                        help="bundle version (default: next integer after those in the repository)")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and a smaller search (for tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data split and training (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from tandem.shared import signing
    from tandem.shared.bundle import describe

    from .pipeline import build as build_bundle
    from .spec import load_spec

    spec = _onnx_spec(args) if str(args.spec).endswith(".onnx") else load_spec(args.spec)
    key_path: Path = args.key
    if not key_path.exists() and args.key == DEFAULT_KEY:
        priv, pub = signing.generate_keypair(key_path.parent)
        print(f"notice: no signing key at {key_path}; generated a new key pair {priv} and {pub} "
              "(give the .pub to servers and devices; keep the .key secret)")
    key = signing.load_private_key(key_path)
    result = build_bundle(spec, args.repository, key, version=args.bundle_version, quick=args.quick, seed=args.seed,
                          progress=not args.no_progress)
    print()
    print(describe(result.manifest), end="")
    print(f"bundle: {result.bundle_path}")
    print(f"report: {result.report_md} (plot {result.report_png})")
    print(f"built in {result.seconds:.1f} s")
    return 0


def _onnx_spec(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """A build spec for a model the user already has as ONNX."""
    import re

    from .errors import SpecError
    from .spec import BuildSpec, graph_inputs

    path = Path(args.spec)
    if not path.is_file():
        raise SpecError(f"ONNX model {path} does not exist")
    for decl in graph_inputs(path):  # loads the graph: a broken file is refused before anything else
        if decl.pad is not None:
            print(f"notice: input {decl.name} {decl.shape} is taken as padded with {decl.pad:g} (token ids and "
                  "masks); write a spec with `inputs` to declare otherwise")
    name = args.name or re.sub(r"[^A-Za-z0-9._-]", "-", path.stem).lstrip("._-") or "model"
    doc: dict = {"name": name, "teacher": str(path.resolve()), "task": {"kind": args.task},
                 "edge": {"kind": "onnx", "path": str(args.edge.resolve())} if args.edge else {"kind": "teacher"},
                 "source": str(path)}
    if args.data is not None:
        doc["load_data"] = _npz_loader(args.data)
    from pydantic import ValidationError

    try:
        return BuildSpec.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        raise SpecError(f"{path}: {'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None


def _npz_loader(path: Path):  # type: ignore[no-untyped-def]
    """load_data over an .npz of named inputs (and labels 'y'), split 40/30/30 in a seeded order."""
    import numpy as np

    from .errors import SpecError

    def load_data(seed: int = 0) -> dict:
        try:
            arrays = dict(np.load(path, allow_pickle=False))
        except Exception as e:
            raise SpecError(f"--data {path} is not a readable .npz file: {e}") from None
        y = arrays.pop("y", None)
        if not arrays:
            raise SpecError(f"--data {path} holds no inputs")
        n = len(next(iter(arrays.values())))
        if n < 10:
            raise SpecError(f"--data {path} has {n} rows; at least 10 are needed to split train/val/test")
        order = np.random.default_rng(seed).permutation(n)
        cuts = [order[: int(n * 0.4)], order[int(n * 0.4) : int(n * 0.7)], order[int(n * 0.7) :]]
        out = {}
        for split, idx in zip(("train", "val", "test"), cuts):
            x = {k: v[idx] for k, v in arrays.items()}
            out[split] = (x, y[idx]) if y is not None else x
        return out

    return load_data
