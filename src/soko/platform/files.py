"""Private files in the data directory, written so no reader sees half of one.

Several API processes start at once on a new data directory, and each may find a file
(the generated secrets, the token signing keys) missing. Whatever one of them writes is
written to a private temporary file first, flushed, then linked into place, which fails
if the file exists: nobody reads a half-written file, and the first writer wins.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def _write_private_temporary(path: Path, content: str) -> Path:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def publish_once(path: Path, content: str) -> bool:
    """Create ``path`` (mode 0600) holding ``content`` unless it exists; whether ours won.

    On a file system without hard links it falls back to a rename, first come first kept
    (two processes racing there may each believe they won; the file is whole either way).
    """
    temporary = _write_private_temporary(path, content)
    try:
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        except OSError:
            if path.exists():
                return False
            os.replace(temporary, path)
        return True
    finally:
        temporary.unlink(missing_ok=True)


def replace_private(path: Path, content: str) -> None:
    """Replace ``path`` atomically with ``content``, mode 0600 throughout."""
    temporary = _write_private_temporary(path, content)
    try:
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
