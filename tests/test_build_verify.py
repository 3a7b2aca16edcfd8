"""`tandem bundle verify` refuses every kind of tampering, each with its own message."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import make_bundle, make_keys
from tandem.shared.bundle import read_manifest
from tandem.shared.cli import main


def verify(path: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["bundle", "verify", str(path), "--key", str(key)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_intact_bundle_verifies(toy_bundle: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, text = verify(toy_bundle, keys[1], capsys)
    assert code == 0, text
    assert text.startswith("OK toy:1")


def test_the_installed_command_verifies_and_refuses(toy_bundle: Path, keys: tuple[Path, Path]) -> None:
    ok = subprocess.run([sys.executable, "-m", "tandem.shared.cli", "bundle", "verify", str(toy_bundle), "--key", str(keys[1])],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    (toy_bundle / "edge-fp32.onnx").unlink()
    bad = subprocess.run([sys.executable, "-m", "tandem.shared.cli", "bundle", "verify", str(toy_bundle), "--key", str(keys[1])],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "edge-fp32.onnx is missing" in bad.stderr


def _covered_files(bundle: Path) -> list[str]:
    _, manifest = read_manifest(bundle)
    return [rel for rel, _, _ in manifest.file_entries()]


@pytest.mark.parametrize("offset", ["first", "middle", "last"])
def test_one_changed_byte_in_any_file_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str], offset: str
) -> None:
    original = make_bundle(tmp_path / "orig", keys[0])
    files = _covered_files(original)
    assert {"cloud-fp32.onnx", "edge-fp32.onnx", "samples.msgpack"} <= set(files)
    for rel in files:
        copy = tmp_path / f"copy-{rel}"
        shutil.copytree(original, copy)
        data = bytearray((copy / rel).read_bytes())
        i = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[offset]
        data[i] ^= 0x01
        (copy / rel).write_bytes(bytes(data))
        code, text = verify(copy, keys[1], capsys)
        assert code == 1, f"{rel} with byte {i} flipped was accepted"
        assert f"bundle file {rel} has sha256" in text and "the manifest says" in text, text


def test_changed_manifest_byte_is_refused_by_the_signature(
    toy_bundle: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    m = toy_bundle / "manifest.json"
    m.write_bytes(m.read_bytes().replace(b'"version": "1"', b'"version": "2"'))
    code, text = verify(toy_bundle, keys[1], capsys)
    assert code == 1
    assert "manifest signature does not verify" in text


def test_removed_file_is_refused(tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    original = make_bundle(tmp_path / "orig", keys[0])
    for rel in _covered_files(original):
        copy = tmp_path / f"copy-{rel}"
        shutil.copytree(original, copy)
        (copy / rel).unlink()
        code, text = verify(copy, keys[1], capsys)
        assert code == 1
        assert f"bundle file {rel} is missing" in text, text


def test_removed_signature_is_refused(toy_bundle: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    (toy_bundle / "manifest.sig").unlink()
    code, text = verify(toy_bundle, keys[1], capsys)
    assert code == 1
    assert "not signed" in text


def test_manifest_signed_by_another_key_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    other_private, other_public = make_keys(tmp_path / "other")
    bundle = make_bundle(tmp_path / "b", other_private)
    code, text = verify(bundle, other_public, capsys)
    assert code == 0, text
    code, text = verify(bundle, keys[1], capsys)
    assert code == 1
    assert "does not verify against any trusted key" in text and "signed by key" in text, text
