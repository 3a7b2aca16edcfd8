"""``tandem build SPEC``: a spec (directory, .py, TOML/YAML/JSON) -> a signed bundle in the repository."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_REPOSITORY = Path("artifacts/repository")
DEFAULT_KEY = Path("artifacts/keys/tandem.key")


def build(parser: argparse.ArgumentParser) -> None:
    """Build a signed bundle (export, distill, quantize, evaluate) from a build spec."""
    parser.add_argument("spec", help="a directory with spec.py, a .py file, or a TOML/YAML/JSON build spec")
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

    spec = load_spec(args.spec)
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
