"""``tandem keygen`` and ``tandem bundle {inspect,verify,pack,unpack}``: commands that need only shared/."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import signing
from .bundle import describe, load_bundle, pack_archive, read_manifest, unpack_archive


def keygen(parser: argparse.ArgumentParser) -> None:
    """Make an Ed25519 key pair for signing bundles (tandem.key, tandem.pub)."""
    parser.add_argument("--out", default=".", help="directory for tandem.key and tandem.pub (default: .)")

    def run(args: argparse.Namespace) -> int:
        priv, pub = signing.generate_keypair(args.out)
        key = signing.load_public_key(pub)
        print(f"private key: {priv} (keep it secret; never commit it)")
        print(f"public key:  {pub} (key id {signing.key_id(key)}; give it to servers and devices)")
        return 0

    parser.set_defaults(run=run)


def bundle(parser: argparse.ArgumentParser) -> None:
    """Inspect, verify, pack or unpack a bundle."""
    sub = parser.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "inspect", help="print a bundle's manifest summary (or --json)",
        description="Print what a bundle holds: its name and version, task, inputs and outputs, each "
                    "variant's role, precision, size, quality and latency, and its calibration. Reads the "
                    "manifest only; the signature is not checked (`tandem bundle verify` does that).")
    p.add_argument("path", help="a bundle directory (REPO/<name>/<version>) holding manifest.json")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.set_defaults(run=_inspect)

    p = sub.add_parser(
        "verify", help="check the signature and every file's sha256",
        description="Check that a bundle was signed by one of the trusted keys and that every file it lists "
                    "matches its sha256, as servers and devices do before loading it. Exits 1 naming the "
                    "first problem found.")
    p.add_argument("path", help="a bundle directory (REPO/<name>/<version>; unpack a .tandem archive first)")
    p.add_argument("--key", required=True, action="append",
                   help="a trusted Ed25519 public key file, e.g. tandem.pub from `tandem keygen` (repeatable)")
    p.set_defaults(run=_verify)

    p = sub.add_parser(
        "pack", help="write a bundle directory as one .tandem archive",
        description="Write a bundle directory as one .tandem archive (to copy or upload as a single file); "
                    "prints the archive's path. The signature travels inside it, so the unpacked directory "
                    "verifies as the original does.")
    p.add_argument("path", help="the bundle directory to pack")
    p.add_argument("--out", default=None, help="the archive to write (default: <name>-<version>.tandem beside the bundle)")
    p.set_defaults(run=lambda a: print(pack_archive(a.path, a.out)) or 0)

    p = sub.add_parser(
        "unpack", help="unpack a .tandem archive into a directory",
        description="Unpack a .tandem archive into DEST (created; refused if it is not empty) and print its "
                    "path. Members that are not regular files or would land outside DEST are refused.")
    p.add_argument("archive", help="the .tandem archive")
    p.add_argument("dest", help="the directory to unpack into (new or empty)")
    p.set_defaults(run=lambda a: print(unpack_archive(a.archive, a.dest)) or 0)


def _inspect(args: argparse.Namespace) -> int:
    _, manifest = read_manifest(args.path)
    if args.json:
        print(json.dumps(manifest.model_dump(mode="json"), indent=2))
    else:
        print(describe(manifest), end="")
    return 0


def _verify(args: argparse.Namespace) -> int:
    b = load_bundle(Path(args.path), args.key)
    files = sum(1 for _ in b.manifest.file_entries())
    print(f"OK {b.name}:{b.version}: signature by key {b.signer}, {files} files match their sha256")
    return 0
