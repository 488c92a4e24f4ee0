"""Entity tags and conditional requests (RFC 9110 sections 8.8.3 and 13).

Soko issues strong ETags only: from a resource's version counter
(:func:`etag_for_version`) or from a hash of its representation
(:func:`etag_for_content`). Reads answer ``304 Not Modified`` when ``If-None-Match``
names the current tag (weak comparison); writes refuse with ``412`` when ``If-Match``
does not name it (strong comparison), and with ``428`` when a route demands
``If-Match`` and the client sent none.

Typical use in a route::

    tag = etag_for_version(product.version)
    if (unchanged := not_modified(request, tag)) is not None:
        return unchanged
    tag_response(response, tag)

    # and on a write, before changing anything:
    require_match(request, etag_for_version(product.version), required=True)
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import Response

from soko.platform.errors import PreconditionFailed, PreconditionRequired

# An entity-tag: optional W/ prefix, then a quoted string of etagc characters
# (%x21 / %x23-7E / obs-text): anything visible but the double quote.
_ENTITY_TAG = re.compile(r'\s*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*(?:,|$)')
_SINGLE_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
_TOKEN_CHARS = re.compile(r"^[\x21\x23-\x7e]*$")

# Responses carrying an ETag may be stored by the client but must be revalidated; the
# security headers middleware would otherwise mark them ``no-store``.
REVALIDATE = "private, no-cache"

SAFE_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class EntityTag:
    opaque: str
    weak: bool = False

    def __str__(self) -> str:
        return f'{"W/" if self.weak else ""}"{self.opaque}"'

    @classmethod
    def parse(cls, value: str) -> EntityTag | None:
        match = _SINGLE_TAG.fullmatch(value.strip())
        if match is None:
            return None
        return cls(match.group(2), weak=bool(match.group(1)))


def etag_for_version(version: int | str) -> str:
    """A strong ETag for a resource that counts its versions (``"v7"``)."""
    text = str(version)
    if not text or not _TOKEN_CHARS.match(text):
        raise ValueError(f"version {version!r} cannot be used in an ETag")
    return f'"v{text}"'


def etag_for_content(content: bytes | str | Mapping[str, Any] | list[Any]) -> str:
    """A strong ETag from a hash of the representation; JSON-like values are hashed in a
    canonical form (sorted keys, no spaces) so equal data always gets the same tag."""
    if isinstance(content, str):
        data = content.encode()
    elif isinstance(content, bytes):
        data = content
    else:
        data = json.dumps(
            content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
        ).encode()
    return '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def parse_etag_list(header: str) -> list[EntityTag] | Literal["*"]:
    """The tags in an ``If-Match`` / ``If-None-Match`` value, or ``"*"``.

    Members that are not valid entity-tags are skipped: they can match nothing.
    """
    if header.strip() == "*":
        return "*"
    tags: list[EntityTag] = []
    position = 0
    while position < len(header):
        match = _ENTITY_TAG.match(header, position)
        if match is None:
            # Skip a malformed member up to the next comma.
            comma = header.find(",", position)
            if comma == -1:
                break
            position = comma + 1
            continue
        tags.append(EntityTag(match.group(2), weak=bool(match.group(1))))
        position = match.end()
    return tags


def strong_match(a: EntityTag, b: EntityTag) -> bool:
    """RFC 9110 13.1.1: both strong and the same opaque tag."""
    return not a.weak and not b.weak and a.opaque == b.opaque


def weak_match(a: EntityTag, b: EntityTag) -> bool:
    """RFC 9110 13.1.2: the same opaque tag, weak or not."""
    return a.opaque == b.opaque


def _current(etag: str | None) -> EntityTag | None:
    if etag is None:
        return None
    tag = EntityTag.parse(etag)
    if tag is None:
        raise ValueError(f"{etag!r} is not an entity-tag")
    return tag


def if_match_passes(header: str | None, current_etag: str | None) -> bool:
    """Whether an ``If-Match`` precondition holds; ``current_etag`` is ``None`` when the
    resource does not exist. An absent header always passes."""
    if header is None:
        return True
    current = _current(current_etag)
    listed = parse_etag_list(header)
    if listed == "*":
        return current is not None
    return current is not None and any(strong_match(tag, current) for tag in listed)


def if_none_match_passes(header: str | None, current_etag: str | None) -> bool:
    """Whether an ``If-None-Match`` precondition holds (no listed tag matches)."""
    if header is None:
        return True
    current = _current(current_etag)
    listed = parse_etag_list(header)
    if listed == "*":
        return current is None
    return current is None or not any(weak_match(tag, current) for tag in listed)


def not_modified(request: Request, current_etag: str) -> Response | None:
    """For a GET or HEAD whose ``If-None-Match`` names ``current_etag``: the ``304`` to
    send (with the ETag and no body). Otherwise ``None``: answer normally."""
    if request.method not in SAFE_METHODS:
        return None
    if if_none_match_passes(request.headers.get("if-none-match"), current_etag):
        return None
    return Response(status_code=304, headers={"ETag": current_etag, "Cache-Control": REVALIDATE})


def tag_response(response: Response, etag: str) -> None:
    """Put ``etag`` on a response (and the cache policy that lets clients revalidate)."""
    response.headers["ETag"] = etag
    response.headers["Cache-Control"] = REVALIDATE


def require_match(request: Request, current_etag: str | None, *, required: bool = False) -> None:
    """Check the preconditions of a write against the resource's current ETag
    (``None`` when it does not exist yet).

    Raises :class:`PreconditionRequired` (428) when ``required`` and no ``If-Match`` was
    sent, and :class:`PreconditionFailed` (412) when ``If-Match`` does not name the
    current version or ``If-None-Match`` does (``If-None-Match: *`` on a create means
    "only if it does not exist yet").
    """
    if_match = request.headers.get("if-match")
    if if_match is None and required:
        raise PreconditionRequired(
            "Send If-Match with the ETag of the version you are changing.",
        )
    if not if_match_passes(if_match, current_etag):
        raise PreconditionFailed(
            "The resource has changed since you read it: fetch it again and retry.",
            current_etag=current_etag,
        )
    if not if_none_match_passes(request.headers.get("if-none-match"), current_etag):
        raise PreconditionFailed(
            "The resource already exists in the version named.", current_etag=current_etag
        )
