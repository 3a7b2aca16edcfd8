"""Ed25519 signatures over a bundle's manifest (via the ``cryptography`` package).

``manifest.sig`` is a small JSON document ``{"alg": "ed25519", "key_id": ..., "signature": b64}``
signed over the exact bytes of ``manifest.json``. The manifest holds every file's sha256, so one
signature covers the whole bundle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import BadKey, MissingSignature, SignatureError, UntrustedSignature

PRIVATE_KEY_NAME = "tandem.key"
PUBLIC_KEY_NAME = "tandem.pub"


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key (first 16 hex chars of sha256 of its raw bytes)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new key pair (``tandem.key`` mode 0600, ``tandem.pub``) into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = d / PRIVATE_KEY_NAME, d / PUBLIC_KEY_NAME
    if priv_path.exists():
        raise BadKey(f"{priv_path} already exists; refusing to overwrite a private key")
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv_pem)
    pub_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv_path, pub_path


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise BadKey(f"private key {path} does not exist (make one with `tandem keygen`)") from None
    except IsADirectoryError:
        raise BadKey(f"private key {path} is a directory: give the key file (e.g. {Path(path) / 'tandem.key'})") from None
    except OSError as e:
        raise BadKey(f"cannot read private key {path}: {e.strerror or e}") from None
    except (ValueError, TypeError) as e:
        raise BadKey(f"{path} is not a PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadKey(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(source: str | os.PathLike[str] | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """A public key from a PEM file path, PEM bytes, or an existing key object."""
    if isinstance(source, Ed25519PublicKey):
        return source
    if isinstance(source, bytes):
        data, name = source, "public key"
    else:
        name = str(source)
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise BadKey(f"public key {source} does not exist") from None
        except IsADirectoryError:
            raise BadKey(f"public key {source} is a directory: give the key file (e.g. {Path(source) / 'tandem.pub'})") from None
        except OSError as e:
            raise BadKey(f"cannot read public key {source}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise BadKey(f"{name} is not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BadKey(f"{name} is not an Ed25519 public key")
    return key


def sign(data: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The signature document (JSON bytes) for ``data``."""
    doc = {
        "alg": "ed25519",
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(data)).decode(),
    }
    return json.dumps(doc, indent=2).encode() + b"\n"


def verify(data: bytes, signature_doc: bytes | None, trusted: list[Ed25519PublicKey]) -> str:
    """Check ``signature_doc`` over ``data`` against the trusted keys; return the signer's key id."""
    if signature_doc is None:
        raise MissingSignature("bundle is not signed: manifest.sig is missing")
    try:
        doc = json.loads(signature_doc)
        if doc.get("alg") != "ed25519":
            raise SignatureError(f"unsupported signature algorithm {doc.get('alg')!r}")
        sig = base64.b64decode(doc["signature"], validate=True)
    except SignatureError:
        raise
    except Exception as e:
        raise SignatureError(f"manifest.sig is malformed: {e}") from None
    if not trusted:
        raise UntrustedSignature("no trusted public key was given to verify the bundle's signature")
    for key in trusted:
        try:
            key.verify(sig, data)
            return key_id(key)
        except InvalidSignature:
            continue
    signer = doc.get("key_id", "?")
    raise UntrustedSignature(
        f"manifest signature does not verify against any trusted key "
        f"(signed by key {signer}; trusted: {', '.join(key_id(k) for k in trusted)}) — "
        "the manifest was changed after signing or was signed by another key"
    )
