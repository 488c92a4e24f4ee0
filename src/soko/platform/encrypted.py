"""Every database column that holds field-encryption ciphertexts, whichever domain owns it.

A domain that encrypts a column with the data keys (``DataKeys.keyring``) declares it
here, in its ``models`` module, beside the table: ``soko keys rotate`` re-encrypts, and
``soko keys status`` counts, exactly the columns declared. A column left out would keep
its values under an old key, and removing that key would make them unreadable for
ever; ``tests/platform/test_encrypted_columns.py`` fails on any ``*_ciphertext`` column
of the metadata that is not declared.

Each value is bound to ``"<name>:<row key>"`` (the AES-GCM associated data), so the name
is part of the stored data: it never changes once values exist.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import InstrumentedAttribute

__all__ = ["EncryptedColumn", "encrypted_column", "encrypted_columns"]


@dataclass(frozen=True)
class EncryptedColumn:
    """A column of ciphertexts, each bound to ``"<name>:<row key>"``."""

    name: str
    row_key: InstrumentedAttribute[uuid.UUID]
    value: InstrumentedAttribute[Any]

    @property
    def entity(self) -> Any:
        """The mapped class whose table holds the column."""
        return self.row_key.class_

    def context(self, row_key: uuid.UUID) -> str:
        return f"{self.name}:{row_key}"


_COLUMNS: dict[str, EncryptedColumn] = {}


def encrypted_column(
    name: str, row_key: InstrumentedAttribute[uuid.UUID], value: InstrumentedAttribute[Any]
) -> str:
    """Declare ``value`` (a column of ``row_key``'s table) as encrypted under the context
    name ``name``; returns ``name``. Declaring the same column again is harmless (a module
    imported twice); another column under a taken name is an error."""
    if row_key.class_ is not value.class_:
        raise ValueError(f"{name}: the row key and the value belong to different tables")
    column = EncryptedColumn(name, row_key, value)
    existing = _COLUMNS.setdefault(name, column)
    if existing.value is not value or existing.row_key is not row_key:
        raise ValueError(f"the encrypted column name {name!r} is declared twice")
    return name


def encrypted_columns() -> tuple[EncryptedColumn, ...]:
    """Every declared column, ordered by name (the order a rotation walks them, the same
    in every process whatever the order its modules were imported in)."""
    return tuple(_COLUMNS[name] for name in sorted(_COLUMNS))
