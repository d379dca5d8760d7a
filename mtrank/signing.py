"""Ed25519 bundle signatures: who may publish a bundle, checked before anything in it is trusted.

A signed bundle holds ``signature.json`` beside its manifest (``docs/bundle.md``, "Signatures")::

    {"format_version": 1, "algorithm": "ed25519", "key_id": "<16 hex>", "signed_file": "manifest.json",
     "manifest_sha256": "<64 hex>", "signature": "<base64, 64 bytes>"}

The signature covers ``SIGNING_CONTEXT + <the bytes of manifest.json>``; the manifest carries the sha256
of every other file (``model.onnx``, ``golden.json``), which ``verify_bundle`` checks next, so one
signature vouches for the whole bundle. ``key_id`` is the first 16 hex digits of the sha256 of the raw
32-byte public key. ``manifest_sha256`` is informational (it makes "the manifest changed after signing"
a clear message); only the signature is trusted.

Keys are PEM files: the private key PKCS#8 (unencrypted, written 0600 by :func:`generate_keypair`),
the public key SubjectPublicKeyInfo. The verifier is :class:`Trust` (the one implementation of the
check, used by ``mtrank.bundle.verify_bundle`` and so by ``mtrank bundle verify`` and the service):
exactly one Ed25519 verification per call.

Needs the ``cryptography`` package (in the ``serve`` and ``train`` extras), imported here only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mtrank.bundle import MANIFEST, BundleError, _fsync_dir

log = logging.getLogger("mtrank.signing")

SIGNATURE = "signature.json"
SIGNATURE_FORMAT = 1
SIGNING_CONTEXT = b"mtrank-bundle-manifest-v1\n"  # domain separation: these signatures mean nothing elsewhere
MAX_SIGNATURE_BYTES = 4096


class SignatureError(BundleError):
    """A signature (or key) is missing, malformed, from an untrusted key or does not match."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ keys


def _read_key_file(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SignatureError(f"{path}: cannot read the {what} ({err.strerror or err})") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS#8, unencrypted) file; SignatureError naming the file otherwise."""
    data = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SignatureError(f"{path}: not a PEM private key without passphrase ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key ({type(key).__name__})")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM (SubjectPublicKeyInfo) file; SignatureError naming the file otherwise."""
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SignatureError(f"{path}: not a PEM public key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


def load_public_keys(paths: Iterable[str | Path]) -> dict[str, Ed25519PublicKey]:
    """``{key_id: key}`` of the PEM files (duplicates collapse); SignatureError naming the first bad file."""
    return {key_id(k): k for k in map(load_public_key, paths)}


def generate_keypair(prefix: str | Path) -> tuple[Path, Path, str]:
    """Write a new key pair: ``PREFIX.key`` (private, PKCS#8 PEM, mode 0600, created exclusively) and
    ``PREFIX.pub`` (public, PEM, 0644). Refuses to overwrite either. Returns (private, public, key id)."""
    prefix = Path(prefix)
    private_path, public_path = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise SignatureError(f"{p}: already exists (not overwritten)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    for path, data, mode in ((private_path, private_pem, 0o600), (public_path, public_pem, 0o644)):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except OSError as err:
            raise SignatureError(f"{path}: cannot create ({err.strerror or err})") from None
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # whatever the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return private_path, public_path, key_id(key.public_key())


# --------------------------------------------------------------------------------------- signing


@dataclass(frozen=True)
class Signer:
    """Signs manifest bytes: ``Signer(key)(manifest_bytes) -> signature.json bytes`` (``write_bundle``'s ``signer``)."""

    key: Ed25519PrivateKey

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        return cls(load_private_key(path))

    @classmethod
    def optional(cls, path: str | Path | None) -> Signer | None:
        """The signer of the key at ``path``, or None when no key is given (an unsigned bundle)."""
        return None if path is None else cls.from_file(path)

    @property
    def key_id(self) -> str:
        return key_id(self.key.public_key())

    def __call__(self, manifest_bytes: bytes) -> bytes:
        sig = self.key.sign(SIGNING_CONTEXT + manifest_bytes)
        doc = {"format_version": SIGNATURE_FORMAT, "algorithm": "ed25519", "key_id": self.key_id,
               "signed_file": MANIFEST, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
               "signature": base64.b64encode(sig).decode("ascii")}
        return (json.dumps(doc, indent=1) + "\n").encode()


def sign_bundle(bundle_dir: str | Path, signer: Signer) -> Path:
    """Sign an existing bundle's current ``manifest.json``: ``signature.json`` written atomically (temp
    file, fsync, rename; an earlier signature is replaced). The caller verifies the bundle first."""
    bundle_dir = Path(bundle_dir)
    data = signer((bundle_dir / MANIFEST).read_bytes())
    fd, tmp = tempfile.mkstemp(prefix=f".{SIGNATURE}.", dir=bundle_dir)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, bundle_dir / SIGNATURE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(bundle_dir)
    return bundle_dir / SIGNATURE


# ------------------------------------------------------------------------------------ verifying


def read_signature(bundle_dir: str | Path) -> dict[str, Any] | None:
    """The parsed ``signature.json`` (None when absent); SignatureError when it is malformed."""
    path = Path(bundle_dir) / SIGNATURE
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_SIGNATURE_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(raw) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{path}: larger than {MAX_SIGNATURE_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SignatureError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise SignatureError(f"{path}: not a JSON object")
    if doc.get("format_version") != SIGNATURE_FORMAT or doc.get("algorithm") != "ed25519" \
            or doc.get("signed_file") != MANIFEST:
        raise SignatureError(f"{path}: unsupported signature (want format_version {SIGNATURE_FORMAT}, "
                             f"algorithm ed25519, signed_file {MANIFEST})")
    if not isinstance(doc.get("key_id"), str) or not isinstance(doc.get("signature"), str):
        raise SignatureError(f"{path}: key_id and signature must be strings")
    try:
        doc["signature_bytes"] = base64.b64decode(doc["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{path}: signature is not valid base64") from None
    return doc


@dataclass(frozen=True)
class Trust:
    """Which keys may sign bundles, and whether an unsigned bundle is refused.

    :meth:`check` is the one signature check: ``signature.json`` must name a trusted key id and its
    signature must verify over ``SIGNING_CONTEXT + manifest_bytes`` (one Ed25519 verification). A
    bundle without a signature passes only when ``require`` is false. A signature that cannot be
    verified (unknown key, malformed, mismatch) is always refused.
    """

    keys: Mapping[str, Ed25519PublicKey]  # key id -> key
    require: bool = True

    @classmethod
    def from_files(cls, paths: Iterable[str | Path], require: bool = True) -> Trust:
        return cls(load_public_keys(paths), require)

    def check(self, bundle_dir: str | Path, manifest_bytes: bytes) -> str | None:
        """Verify ``bundle_dir``'s signature over ``manifest_bytes`` (the manifest bytes the caller then
        parses). Returns the signing key id (None: unsigned and not required); SignatureError otherwise."""
        path = Path(bundle_dir) / SIGNATURE
        doc = read_signature(bundle_dir)
        if doc is None:
            if self.require:
                raise SignatureError(f"{path}: missing; unsigned bundles are refused (a signature is required)")
            log.warning("%s: unsigned bundle accepted (signatures not required)", Path(bundle_dir).name)
            return None
        kid = doc["key_id"]
        key = self.keys.get(kid)
        if key is None:
            raise SignatureError(f"{path}: signed with key {kid!r}, which is not a trusted public key "
                                 f"(trusted: {sorted(self.keys)})")
        try:
            key.verify(doc["signature_bytes"], SIGNING_CONTEXT + manifest_bytes)
        except InvalidSignature:
            changed = doc.get("manifest_sha256") not in (None, hashlib.sha256(manifest_bytes).hexdigest())
            why = "manifest.json changed after it was signed" if changed else "the signature does not match"
            raise SignatureError(f"{path}: invalid signature by key {kid!r} ({why})") from None
        return kid
