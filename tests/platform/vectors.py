"""Public test vectors: where they are found and their cases as typed values.

Wycheproof files are read from, in order: ``$SOKO_TEST_VECTORS_DIR``, the shared vector
directory ``../shared/vectors/`` beside the repository, and the trimmed copy vendored in
``tests/data/wycheproof/``. The RFC values are vendored in ``tests/data/rfc_vectors.json``
with their sections named.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
SHARED_VECTORS_DIR = REPOSITORY_ROOT.parent / "shared" / "vectors"
VENDORED_DIR = REPOSITORY_ROOT / "tests" / "data"
ENV_VAR = "SOKO_TEST_VECTORS_DIR"


def vectors_dir() -> Path:
    """The first directory that holds a ``wycheproof/`` folder."""
    candidates = []
    configured = os.environ.get(ENV_VAR)
    if configured:
        candidates.append(Path(configured))
    candidates += [SHARED_VECTORS_DIR, VENDORED_DIR]
    for candidate in candidates:
        if (candidate / "wycheproof").is_dir():
            return candidate
    raise FileNotFoundError(f"no wycheproof/ directory in any of {candidates}")


def wycheproof_file(name: str, directory: Path | None = None) -> dict[str, Any]:
    path = (directory or vectors_dir()) / "wycheproof" / name
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@dataclass(frozen=True)
class AeadCase:
    tc_id: int
    key: bytes
    iv: bytes
    aad: bytes
    msg: bytes
    ct: bytes
    tag: bytes
    valid: bool
    flags: tuple[str, ...]
    comment: str

    @property
    def id(self) -> str:
        return f"tc{self.tc_id}-{'valid' if self.valid else 'invalid'}"


@dataclass(frozen=True)
class MacCase:
    tc_id: int
    key: bytes
    msg: bytes
    tag: bytes
    tag_bytes: int
    valid: bool
    flags: tuple[str, ...]
    comment: str

    @property
    def id(self) -> str:
        return f"tc{self.tc_id}-{self.tag_bytes * 8}bit-{'valid' if self.valid else 'invalid'}"


def _verdict(result: str) -> bool:
    # Wycheproof also has "acceptable"; none of the files used here contain it, and
    # guessing its meaning silently would hide a new file's intent.
    if result not in ("valid", "invalid"):
        raise ValueError(f"unexpected Wycheproof result {result!r}")
    return result == "valid"


def aes_gcm_cases(*, key_bits: int) -> list[AeadCase]:
    """Every AES-GCM case with a ``key_bits`` key, whatever its IV size."""
    data = wycheproof_file("aes_gcm_test.json")
    assert data["algorithm"] == "AES-GCM"
    cases = []
    for group in data["testGroups"]:
        if group["keySize"] != key_bits:
            continue
        assert group["tagSize"] == 128
        for test in group["tests"]:
            cases.append(
                AeadCase(
                    tc_id=test["tcId"],
                    key=bytes.fromhex(test["key"]),
                    iv=bytes.fromhex(test["iv"]),
                    aad=bytes.fromhex(test["aad"]),
                    msg=bytes.fromhex(test["msg"]),
                    ct=bytes.fromhex(test["ct"]),
                    tag=bytes.fromhex(test["tag"]),
                    valid=_verdict(test["result"]),
                    flags=tuple(test["flags"]),
                    comment=test["comment"],
                )
            )
    return cases


def hmac_cases(name: str) -> list[MacCase]:
    """Every case of a Wycheproof HMAC file, with the tag size its group declares."""
    data = wycheproof_file(name)
    cases = []
    for group in data["testGroups"]:
        tag_bytes = group["tagSize"] // 8
        for test in group["tests"]:
            cases.append(
                MacCase(
                    tc_id=test["tcId"],
                    key=bytes.fromhex(test["key"]),
                    msg=bytes.fromhex(test["msg"]),
                    tag=bytes.fromhex(test["tag"]),
                    tag_bytes=tag_bytes,
                    valid=_verdict(test["result"]),
                    flags=tuple(test["flags"]),
                    comment=test["comment"],
                )
            )
    return cases


def rfc_vectors(rfc: str) -> list[dict[str, Any]]:
    data = json.loads((VENDORED_DIR / "rfc_vectors.json").read_text(encoding="utf-8"))
    cases: list[dict[str, Any]] = data[rfc]["cases"]
    return cases
