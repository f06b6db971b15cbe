"""Pinned model references, file names inside an export, and the model's identity.

``<model_dir>@sha256:<64 hex>`` names an export folder *and* the sha256 of its ``metadata.json`` bytes, as
``jobs.export`` prints it. A pinned reference loads only if the card hashes to the pin
(``model_digest_mismatch``); every artifact is then checked against that card, which the pin makes trusted.
A plain folder is self-attested: its artifacts are checked against the sha256s of the card beside them, so
whoever can write the folder can swap an artifact and edit the card to match.

``model_id`` (in every serving response, the scoring Parquet and the logs) is the model's name, version and
digest, never where it is stored: ``kdray-student:3@sha256:1a2b3c4d5e6f#int8``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from kdray import KdrayError

PIN = "@sha256:"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class IntegrityError(KdrayError):
    """A model that is not what it claims to be: ``reason`` is a stable code, ``str(exc)`` one line with it."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"{message} ({reason})")

    def __reduce__(self):  # picklable across processes (Ray workers)
        return type(self), (self.reason, str(self).rsplit(" (", 1)[0])


@dataclass(frozen=True)
class ModelRef:
    """Where a model is, and the sha256 its ``metadata.json`` must have (None: unpinned, self-attested)."""

    uri: str
    digest: str | None = None

    def __str__(self) -> str:
        return f"{self.uri}{PIN}{self.digest}" if self.digest else self.uri


def parse_ref(ref: str) -> ModelRef:
    """``dir@sha256:<hex>`` → (dir, hex); anything else is an unpinned reference to itself."""
    text = str(ref).strip()
    uri, sep, digest = text.rpartition(PIN)
    if not sep:
        return ModelRef(text)
    digest = digest.lower()
    if not uri or not _HEX64.fullmatch(digest):
        raise IntegrityError("bad_model_pin", f"{text[:200]}: a pinned reference is <export folder>@sha256:<64 hex "
                                              "digits>, as jobs.export prints it")
    return ModelRef(uri, digest)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_digest(what: str, data: bytes, expected: str, reason: str, source: str) -> bytes:
    """``data`` if its sha256 is ``expected``; else an :class:`IntegrityError` naming ``what`` and the ``source``
    of the expected digest."""
    digest = sha256_hex(data)
    if digest != expected:
        raise IntegrityError(reason, f"{what}: sha256 {digest[:12]}… does not match {source} {expected[:12]}… "
                                     "(corrupt or replaced file)")
    return data


def plain_file_name(name: str) -> str:
    """``name`` if it names a file directly inside a folder: no separator, not ``.`` or ``..``, not absolute, not
    empty. Model cards name their artifacts so; anything else could point outside the export."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"{name[:80]!r} is not a plain file name inside the export (no separators, not . or ..)")
    return name


def model_id(name: str, version: str, digest: str, variant: str) -> str:
    """``name:version@sha256:<12 hex>#variant``: what a model is (its digest) and which artifact runs."""
    return f"{name}:{version}@sha256:{digest[:12]}#{variant}"


def digest_of(model_id: str) -> str:
    """``sha256:<12 hex>`` of a model id (``name:version@sha256:<12 hex>#variant``), or "" without one."""
    _, found, rest = model_id.partition("@sha256:")
    return f"sha256:{rest.partition('#')[0]}" if found else ""
