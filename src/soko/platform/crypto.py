"""Personal data at rest: field encryption, blind indexes and the keys behind them.

Three building blocks, each with one job:

* :class:`Keyring` encrypts a field value with AES-256-GCM under its active key and
  decrypts values under any key it holds. A ciphertext is plain ASCII text that fits a
  VARCHAR/TEXT column::

      v1.<key id>.<nonce: 12 bytes, base64url>.<ciphertext and 16-byte tag, base64url>

  and is bound to its place (``context``, e.g. ``"users.email:<row id>"``) through the
  associated data, so a value copied to another row or column does not decrypt.
  Every failure to decrypt raises :class:`DecryptionError`, whose message names the kind
  of failure and never the plaintext, the context or a key.
* :class:`BlindIndex` turns a canonical value into a deterministic HMAC-SHA256 digest
  for exact lookups (``WHERE email_index = :digest``) without storing the value in clear.
  It has its own key, so rotating the encryption keys never moves an index.
* :func:`derive_keys` derives both from one master secret with HKDF-SHA256 and distinct
  labels; :meth:`DataKeys.from_config` lets explicitly configured keys replace them.

The MAC functions (:func:`mac`, :func:`mac_matches`, :func:`digests_match`) are shared
with every other HMAC in Soko (blind indexes, webhook signatures) so that one tested
implementation, with one constant-time comparison, serves them all.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import secrets
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MIN_MASTER_SECRET_BYTES = 32
# Shorter tags make forgery practical; RFC 2104 §5 advises at least half the hash length.
MIN_MAC_TAG_BYTES = 16

CIPHERTEXT_VERSION = "v1"
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_COLUMN = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")

ENCRYPTION_KEY_LABEL = "soko/field-encryption/v1/"
BLIND_INDEX_KEY_LABEL = "soko/blind-index/v1"
DEFAULT_DERIVED_KEY_ID = "d1"


class DecryptionError(Exception):
    """A ciphertext could not be decrypted: malformed, truncated, tampered with, under a
    key this keyring does not hold, or bound to another context.

    The message says which kind of failure it was and never carries the ciphertext, the
    plaintext, the context or any key material.
    """


class KeyConfigError(ValueError):
    """Key material or a key specification is unusable; the message never echoes a key."""


# -- primitives ---------------------------------------------------------------------------


def aes_gcm_seal(key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM encryption with a 96-bit nonce; returns ciphertext followed by the tag.

    The nonce must never repeat under one key (a repeat leaks the authentication key);
    :meth:`Keyring.encrypt` draws a fresh random one for every value, and only tests
    should call this with a chosen nonce.
    """
    _check_key(key)
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"the nonce must be {NONCE_BYTES} bytes")
    return AESGCM(key).encrypt(nonce, plaintext, associated_data)


def aes_gcm_open(key: bytes, nonce: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """Authenticate and decrypt ``sealed`` (ciphertext followed by the 16-byte tag).

    Only 256-bit keys and 96-bit nonces are accepted, whatever the input: other nonce
    sizes go through GHASH and have a history of implementation bugs, and Soko never
    produces them. Any failure raises :class:`DecryptionError`.
    """
    if len(key) != KEY_BYTES:
        raise DecryptionError("the key is not a 256-bit AES key")
    if len(nonce) != NONCE_BYTES:
        raise DecryptionError("the nonce is not 96 bits")
    if len(sealed) < TAG_BYTES:
        raise DecryptionError("the ciphertext is shorter than its tag")
    try:
        return AESGCM(key).decrypt(nonce, sealed, associated_data)
    except InvalidTag:
        raise DecryptionError("the ciphertext failed authentication") from None


class MacAlgorithm(StrEnum):
    sha256 = "sha256"
    sha512 = "sha512"


_DIGEST_BYTES = {MacAlgorithm.sha256: 32, MacAlgorithm.sha512: 64}


def mac(
    key: bytes,
    message: bytes,
    *,
    algorithm: MacAlgorithm = MacAlgorithm.sha256,
    tag_bytes: int | None = None,
) -> bytes:
    """HMAC of ``message`` under ``key``, truncated to ``tag_bytes`` when asked
    (RFC 2104 §5: the leftmost bytes; never fewer than 16)."""
    size = _tag_size(algorithm, tag_bytes)
    return hmac.digest(key, message, algorithm.value)[:size]


def mac_matches(
    key: bytes,
    message: bytes,
    tag: bytes,
    *,
    algorithm: MacAlgorithm = MacAlgorithm.sha256,
    tag_bytes: int | None = None,
) -> bool:
    """Whether ``tag`` is the HMAC of ``message``, compared in constant time.

    The expected tag size is the caller's decision (full length by default), never the
    sender's: a tag of any other length is refused, so a shortened tag cannot lower the
    work of a forgery.
    """
    expected = mac(key, message, algorithm=algorithm, tag_bytes=tag_bytes)
    return digests_match(expected, tag)


def digests_match(expected: bytes | str, received: bytes | str) -> bool:
    """Constant-time equality of two digests (bytes, or text such as hex)."""
    if isinstance(expected, str):
        expected = expected.encode("utf-8")
    if isinstance(received, str):
        received = received.encode("utf-8")
    return hmac.compare_digest(expected, received)


def _tag_size(algorithm: MacAlgorithm, tag_bytes: int | None) -> int:
    full = _DIGEST_BYTES[algorithm]
    if tag_bytes is None:
        return full
    if not MIN_MAC_TAG_BYTES <= tag_bytes <= full:
        raise ValueError(f"tag_bytes must be between {MIN_MAC_TAG_BYTES} and {full}")
    return tag_bytes


def hkdf_sha256(
    ikm: bytes, *, info: bytes, length: int = KEY_BYTES, salt: bytes | None = None
) -> bytes:
    """HKDF-SHA256 (RFC 5869): ``length`` bytes of key material labelled by ``info``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


# -- field encryption ---------------------------------------------------------------------


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise KeyConfigError(f"an encryption key must be exactly {KEY_BYTES} bytes")


def _check_key_id(key_id: str) -> None:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise KeyConfigError("a key id must be 1 to 32 characters from A-Z, a-z, 0-9, '_' and '-'")


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict unpadded base64url: one spelling per byte string, so no character of a
    token can change without changing the bytes it stands for."""
    if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64encode(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


def _associated_data(key_id: str, context: str) -> bytes:
    # The header is authenticated with the context; a key id never contains NUL, so the
    # two parts cannot be shifted into each other.
    return f"{CIPHERTEXT_VERSION}.{key_id}".encode("ascii") + b"\x00" + context.encode("utf-8")


@dataclass(frozen=True)
class _Token:
    key_id: str
    nonce: bytes
    sealed: bytes


def _parse_token(token: str) -> _Token:
    if not isinstance(token, str):
        raise DecryptionError("the ciphertext is not text")
    parts = token.split(".")
    if len(parts) != 4:
        raise DecryptionError("the ciphertext is malformed")
    version, key_id, nonce_text, sealed_text = parts
    if version != CIPHERTEXT_VERSION:
        raise DecryptionError("the ciphertext has an unknown version")
    if not _KEY_ID.fullmatch(key_id):
        raise DecryptionError("the ciphertext is malformed")
    try:
        nonce = _b64decode(nonce_text)
        sealed = _b64decode(sealed_text)
    except (ValueError, binascii.Error):
        raise DecryptionError("the ciphertext is malformed") from None
    if len(nonce) != NONCE_BYTES or len(sealed) < TAG_BYTES:
        raise DecryptionError("the ciphertext is truncated")
    return _Token(key_id, nonce, sealed)


class Keyring:
    """Named AES-256 keys: one active key encrypts, every key decrypts.

    Rotation: put a new key first (active) and keep the old ones until
    :meth:`needs_rotation` is false for every stored value.
    """

    __slots__ = ("_active", "_keys")

    def __init__(self, keys: Mapping[str, bytes], *, active: str) -> None:
        if not keys:
            raise KeyConfigError("a keyring needs at least one key")
        for key_id, key in keys.items():
            _check_key_id(key_id)
            _check_key(key)
        if active not in keys:
            raise KeyConfigError("the active key id is not in the keyring")
        self._keys = dict(keys)
        self._active = active

    @classmethod
    def from_config(cls, spec: str) -> Keyring:
        """Parse ``"kid:base64key,kid2:base64key"``; the first key is the active one.

        Keys are 32 bytes in base64 or base64url, padding optional.
        """
        keys: dict[str, bytes] = {}
        entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
        if not entries:
            raise KeyConfigError("no encryption key is configured")
        for position, entry in enumerate(entries, start=1):
            key_id, sep, encoded = entry.partition(":")
            key_id = key_id.strip()
            if not sep:
                raise KeyConfigError(f"key {position} is not written as <key id>:<base64 key>")
            _check_key_id(key_id)
            if key_id in keys:
                raise KeyConfigError(f"key id {key_id!r} is configured twice")
            keys[key_id] = decode_key(encoded, what=f"key {key_id!r}")
        return cls(keys, active=entries[0].partition(":")[0].strip())

    @property
    def active_key_id(self) -> str:
        return self._active

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def __repr__(self) -> str:
        return f"Keyring(active={self._active!r}, key_ids={list(self._keys)!r})"

    def encrypt(self, plaintext: str, *, context: str) -> str:
        """Encrypt ``plaintext`` under the active key, bound to ``context``."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = aes_gcm_seal(
            self._keys[self._active],
            nonce,
            plaintext.encode("utf-8"),
            _associated_data(self._active, context),
        )
        return ".".join((CIPHERTEXT_VERSION, self._active, _b64encode(nonce), _b64encode(sealed)))

    def decrypt(self, token: str, *, context: str) -> str:
        """Decrypt a value made by :meth:`encrypt` with the same ``context``."""
        parsed = _parse_token(token)
        key = self._keys.get(parsed.key_id)
        if key is None:
            raise DecryptionError("the ciphertext is under a key this keyring does not hold")
        plaintext = aes_gcm_open(
            key, parsed.nonce, parsed.sealed, _associated_data(parsed.key_id, context)
        )
        try:
            return plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise DecryptionError("the plaintext is not UTF-8 text") from None

    def needs_rotation(self, token: str) -> bool:
        """Whether a stored value is under a key other than the active one.

        Reads the header only. A malformed value, or one under a key this keyring does
        not hold, raises :class:`DecryptionError`: rotation could not re-encrypt it.
        """
        parsed = _parse_token(token)
        if parsed.key_id not in self._keys:
            raise DecryptionError("the ciphertext is under a key this keyring does not hold")
        return parsed.key_id != self._active

    def rotate(self, token: str, *, context: str) -> str:
        """The value re-encrypted under the active key (unchanged if already under it)."""
        if not self.needs_rotation(token):
            return token
        return self.encrypt(self.decrypt(token, context=context), context=context)


# -- blind index --------------------------------------------------------------------------


class BlindIndex:
    """Deterministic HMAC-SHA256 digests of canonical values, one domain per column.

    The digest of ``value`` for ``column`` is
    ``HMAC-SHA256(key, column || 0x00 || value)`` over UTF-8, as lowercase hex or
    unpadded base64url. The caller supplies the canonical form (see
    :func:`canonical_email`, :func:`canonical_phone`): the index matches exact strings.
    """

    __slots__ = ("_encoding", "_key")

    def __init__(self, key: bytes, *, encoding: Literal["hex", "base64url"] = "hex") -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise KeyConfigError(f"a blind index key must be exactly {KEY_BYTES} bytes")
        if encoding not in ("hex", "base64url"):
            raise ValueError("encoding must be 'hex' or 'base64url'")
        self._key = key
        self._encoding = encoding

    @classmethod
    def from_config(
        cls, encoded_key: str, *, encoding: Literal["hex", "base64url"] = "hex"
    ) -> BlindIndex:
        return cls(decode_key(encoded_key, what="the blind index key"), encoding=encoding)

    def __repr__(self) -> str:
        return f"BlindIndex(encoding={self._encoding!r})"

    def compute(self, column: str, canonical_value: str) -> str:
        if not _COLUMN.fullmatch(column):
            raise ValueError("column must look like 'table.column' in lowercase")
        digest = mac(self._key, column.encode("ascii") + b"\x00" + canonical_value.encode())
        return digest.hex() if self._encoding == "hex" else _b64encode(digest)

    def matches(self, column: str, canonical_value: str, stored: str) -> bool:
        """Whether ``stored`` is the index of the value, compared in constant time."""
        return digests_match(self.compute(column, canonical_value), stored)


def canonical_email(raw: str) -> str:
    """The form of an email address that the blind index sees.

    Surrounding whitespace is trimmed, the text is NFC-normalized, and both the domain
    and the local part are lowercased. Lowercasing the local part is a deliberate
    choice: RFC 5321 lets a server treat ``Ada@x`` and ``ada@x`` as two mailboxes, but
    in practice none of the common providers do, and treating them as one keeps a person
    from holding two accounts, or being locked out, by capitalisation. Dots and
    ``+tags`` are kept: their meaning is provider-specific.
    """
    value = unicodedata.normalize("NFC", raw.strip())
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or any(ch.isspace() for ch in value):
        raise ValueError("not an email address")
    return f"{local.lower()}@{domain.lower()}"


def canonical_phone(e164: str) -> str:
    """A phone number in E.164 (``+`` then up to 15 digits), trimmed and otherwise as
    given. Parsing national formats into E.164 is the caller's job."""
    value = e164.strip()
    if not _E164.fullmatch(value):
        raise ValueError("not an E.164 phone number")
    return value


# -- keys -----------------------------------------------------------------------------------


def decode_key(encoded: str, *, what: str = "the key") -> bytes:
    """A 32-byte key written in base64 or base64url (padding optional)."""
    text = encoded.strip().rstrip("=").replace("+", "-").replace("/", "_")
    try:
        raw = _b64decode(text)
    except (ValueError, binascii.Error):
        raise KeyConfigError(f"{what} is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise KeyConfigError(f"{what} must decode to {KEY_BYTES} bytes, not {len(raw)}")
    return raw


def new_key_spec(key_id: str) -> str:
    """A fresh ``<key id>:<base64url key>`` entry for SOKO_ENCRYPTION_KEYS."""
    _check_key_id(key_id)
    return f"{key_id}:{_b64encode(secrets.token_bytes(KEY_BYTES))}"


@dataclass(frozen=True)
class DataKeys:
    """The keys that protect personal data at rest."""

    keyring: Keyring
    blind_index: BlindIndex

    @classmethod
    def from_config(
        cls,
        *,
        master_secret: bytes | None,
        encryption_keys: str = "",
        blind_index_key: str = "",
        derived_key_ids: Sequence[str] = (DEFAULT_DERIVED_KEY_ID,),
    ) -> DataKeys:
        """Explicit keys where configured, keys derived from ``master_secret`` otherwise.

        Mixing is allowed (say, explicit encryption keys and a derived blind index key),
        but a derived key changes with the master secret: a blind index that silently
        changes stops every lookup from matching, so production should configure both.
        """
        keyring = Keyring.from_config(encryption_keys) if encryption_keys.strip() else None
        blind_index = BlindIndex.from_config(blind_index_key) if blind_index_key.strip() else None
        if keyring is None or blind_index is None:
            if master_secret is None:
                raise KeyConfigError(
                    "encryption and blind index keys are not all configured and there is "
                    "no master secret to derive them from"
                )
            derived = derive_keys(master_secret, key_ids=derived_key_ids)
            keyring = keyring or derived.keyring
            blind_index = blind_index or derived.blind_index
        return cls(keyring=keyring, blind_index=blind_index)


def derive_keys(
    master_secret: bytes, *, key_ids: Sequence[str] = (DEFAULT_DERIVED_KEY_ID,)
) -> DataKeys:
    """Derive a keyring and a blind index key from one master secret (HKDF-SHA256).

    Each encryption key is labelled with its key id, so adding a new id (first, to make
    it active) rotates without changing the master secret, and an id always derives the
    same key. The blind index key has its own label and does not depend on ``key_ids``.
    """
    if len(master_secret) < MIN_MASTER_SECRET_BYTES:
        raise KeyConfigError(f"the master secret must be at least {MIN_MASTER_SECRET_BYTES} bytes")
    if not key_ids:
        raise KeyConfigError("at least one key id is needed")
    keys: dict[str, bytes] = {}
    for key_id in key_ids:
        _check_key_id(key_id)
        keys[key_id] = hkdf_sha256(master_secret, info=(ENCRYPTION_KEY_LABEL + key_id).encode())
    blind_key = hkdf_sha256(master_secret, info=BLIND_INDEX_KEY_LABEL.encode())
    return DataKeys(keyring=Keyring(keys, active=key_ids[0]), blind_index=BlindIndex(blind_key))
