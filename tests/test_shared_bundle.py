from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from support import make_bundle, make_keys, run_onnx
from tandem.shared import signing
from tandem.shared.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    load_bundle,
    pack_archive,
    read_manifest,
    unpack_archive,
    version_key,
)
from tandem.shared.errors import (
    BadKey,
    BundleError,
    BundleNotFound,
    HashMismatch,
    ManifestError,
    MissingFile,
    MissingSignature,
    UnsafePath,
    UnsupportedSchema,
    UntrustedSignature,
)


def test_load_verifies_and_exposes_variants(toy_bundle: Path, keys: tuple[Path, Path]) -> None:
    b = load_bundle(toy_bundle, keys[1])
    assert b.name == "toy" and b.version == "1"
    assert b.signer == signing.key_id(signing.load_public_key(keys[1]))
    assert b.variant("edge").name == "edge-fp32" and b.variant("cloud-fp32").role == "cloud"
    inputs, outputs = b.load_samples()
    got = run_onnx(b.variant_path("edge"), inputs["input"])
    np.testing.assert_allclose(got, outputs["edge-fp32"]["logits"], atol=b.manifest.samples.atol)
    with pytest.raises(KeyError, match="no variant or role 'gpu'"):
        b.variant("gpu")


def test_signature_is_required_by_default(toy_bundle: Path) -> None:
    with pytest.raises(UntrustedSignature, match="no trusted public key"):
        load_bundle(toy_bundle)
    assert load_bundle(toy_bundle, verify_signature=False).signer is None


@pytest.mark.parametrize("target", ["cloud-fp32.onnx", "edge-fp32.onnx", "samples.msgpack"])
def test_one_byte_changed_in_any_file_is_refused(toy_bundle: Path, keys: tuple[Path, Path], target: str) -> None:
    p = toy_bundle / target
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(HashMismatch, match=f"{target} has sha256"):
        load_bundle(toy_bundle, keys[1])


def test_one_byte_changed_in_manifest_is_refused(toy_bundle: Path, keys: tuple[Path, Path]) -> None:
    p = toy_bundle / MANIFEST_NAME
    p.write_bytes(p.read_bytes().replace(b'"version": "1"', b'"version": "2"'))
    with pytest.raises(UntrustedSignature, match="changed after signing or was signed by another key"):
        load_bundle(toy_bundle, keys[1])


def test_removed_file_is_refused(toy_bundle: Path, keys: tuple[Path, Path]) -> None:
    (toy_bundle / "edge-fp32.onnx").unlink()
    with pytest.raises(MissingFile, match="edge-fp32.onnx is missing"):
        load_bundle(toy_bundle, keys[1])


def test_missing_signature_is_refused(toy_bundle: Path, keys: tuple[Path, Path]) -> None:
    (toy_bundle / SIGNATURE_NAME).unlink()
    with pytest.raises(MissingSignature, match="manifest.sig is missing"):
        load_bundle(toy_bundle, keys[1])


def test_other_key_is_refused(toy_bundle: Path, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    other_priv, other_pub = make_keys(tmp_path / "other")
    resigned = make_bundle(tmp_path / "resigned", other_priv)
    with pytest.raises(UntrustedSignature, match="signed by key"):
        load_bundle(resigned, keys[1])
    assert load_bundle(resigned, [keys[1], other_pub]).signer == signing.key_id(signing.load_public_key(other_pub))


def _rewrite_manifest(bundle: Path, priv: Path, edit) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads((bundle / MANIFEST_NAME).read_bytes())
    edit(doc)
    raw = json.dumps(doc).encode()
    (bundle / MANIFEST_NAME).write_bytes(raw)
    (bundle / SIGNATURE_NAME).write_bytes(signing.sign(raw, signing.load_private_key(priv)))


def test_path_escaping_the_bundle_is_refused(toy_bundle: Path, keys: tuple[Path, Path]) -> None:
    def edit(doc: dict) -> None:
        doc["variants"][0]["file"] = "../outside.onnx"

    _rewrite_manifest(toy_bundle, keys[0], edit)
    with pytest.raises(UnsafePath, match="escapes the bundle directory"):
        load_bundle(toy_bundle, keys[1])


def test_symlink_escaping_the_bundle_is_refused(toy_bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    shutil.copy(toy_bundle / "edge-fp32.onnx", outside)
    (toy_bundle / "edge-fp32.onnx").unlink()
    (toy_bundle / "edge-fp32.onnx").symlink_to(outside)
    with pytest.raises(UnsafePath, match="resolves outside"):
        load_bundle(toy_bundle, keys[1])


def test_unknown_schema_and_malformed_json(toy_bundle: Path, keys: tuple[Path, Path]) -> None:
    _rewrite_manifest(toy_bundle, keys[0], lambda d: d.update(schema_version=99))
    with pytest.raises(UnsupportedSchema, match="schema_version 99"):
        load_bundle(toy_bundle, keys[1])
    (toy_bundle / MANIFEST_NAME).write_bytes(b"{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_bundle(toy_bundle, keys[1])
    _rewrite_manifest_raw = json.dumps({"schema_version": 1, "name": "x"}).encode()
    (toy_bundle / MANIFEST_NAME).write_bytes(_rewrite_manifest_raw)
    with pytest.raises(ManifestError, match="does not match the manifest schema"):
        load_bundle(toy_bundle, keys[1])


def test_not_a_bundle(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    with pytest.raises(BundleNotFound):
        load_bundle(tmp_path / "nope", keys[1])
    with pytest.raises(ManifestError, match="not a Tandem bundle"):
        load_bundle(tmp_path, keys[1])
    with pytest.raises(BadKey, match="does not exist"):
        signing.load_public_key(tmp_path / "missing.pub")


def test_archive_round_trip_and_unsafe_members(toy_bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    (toy_bundle / "stray.txt").write_text("not part of the bundle")
    archive = pack_archive(toy_bundle, tmp_path / "toy.tandem")
    out = unpack_archive(archive, tmp_path / "unpacked")
    assert not (out / "stray.txt").exists()
    assert load_bundle(out, keys[1]).version == "1"
    with pytest.raises(BundleError, match="not empty"):
        unpack_archive(archive, out)

    evil = tmp_path / "evil.tandem"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 0
        tar.addfile(info)
    with pytest.raises(UnsafePath):
        unpack_archive(evil, tmp_path / "evil-out")
    assert not (tmp_path / "escape.txt").exists()


def test_version_key_is_natural() -> None:
    assert sorted(["10", "9", "1.10", "1.9", "2"], key=version_key) == ["1.9", "1.10", "2", "9", "10"]


def test_cli_keygen_inspect_verify(tmp_path: Path) -> None:
    def tandem(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tandem.shared.cli", *args], capture_output=True, text=True)

    r = tandem("keygen", "--out", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "k" / "tandem.key").stat().st_mode & 0o777 == 0o600
    assert tandem("keygen", "--out", str(tmp_path / "k")).returncode == 1  # never overwrites a key
    b = make_bundle(tmp_path / "b", tmp_path / "k" / "tandem.key")
    r = tandem("bundle", "inspect", str(b))
    assert r.returncode == 0 and "edge-fp32" in r.stdout and "calibration" in r.stdout
    r = tandem("bundle", "verify", str(b), "--key", str(tmp_path / "k" / "tandem.pub"))
    assert r.returncode == 0 and r.stdout.startswith("OK toy:1"), r.stderr
    (b / "edge-fp32.onnx").write_bytes(b"junk")
    r = tandem("bundle", "verify", str(b), "--key", str(tmp_path / "k" / "tandem.pub"))
    assert r.returncode == 1 and "edge-fp32.onnx is 4 bytes" in r.stderr
    assert read_manifest(b)[1].name == "toy"


def test_device_loads_only_the_edge_variant(toy_bundle: Path, keys: tuple[Path, Path]) -> None:
    (toy_bundle / "cloud-fp32.onnx").unlink()
    with pytest.raises(MissingFile, match="cloud-fp32.onnx"):
        load_bundle(toy_bundle, keys[1])
    b = load_bundle(toy_bundle, keys[1], variants=["edge"])
    assert b.variant_path("edge").is_file()
    (toy_bundle / "samples.msgpack").write_bytes(b"x")
    with pytest.raises(HashMismatch, match="samples.msgpack"):
        load_bundle(toy_bundle, keys[1], variants=["edge"])


def test_key_paths_that_are_directories_or_unreadable_say_so(tmp_path: Path) -> None:
    with pytest.raises(BadKey, match="is a directory: give the key file"):
        signing.load_private_key(tmp_path)
    with pytest.raises(BadKey, match="is a directory: give the key file"):
        signing.load_public_key(tmp_path)
    with pytest.raises(BadKey, match="does not exist"):
        signing.load_private_key(tmp_path / "nope.key")
