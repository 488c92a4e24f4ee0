"""Hostile input on every operation of the API.

The operations are read from the app's own OpenAPI document, so a route added later is
walked without touching this file. Each is called by a caller it lets through (the owner
of an approved store who holds every role, or the buyer of an order), with real ids in
the path where the parameter's name says which, once for each hostile change to an
otherwise plausible request:

- the NUL character (U+0000) in a path parameter, a query parameter, a string or a key
  of the JSON body, or a form field: refused (PostgreSQL's text cannot hold it, and no
  field of Soko needs it), never stored and never a 500;
- integers beyond 64 bits, very long strings, values of the wrong type, a body that is
  not JSON, JSON of the wrong shape, nested 50,000 deep, or holding a number of 50,000
  digits or beyond what a float holds, headers no route can use: whatever the answer,
  never a 5xx;
- every refusal is an RFC 9457 problem: ``application/problem+json`` with a type, a
  title and the answer's status.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest

from soko.identity.models import Role
from soko.platform.config import Settings
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market
from tests.conftest import make_settings
from tests.identity.conftest import MakeUser, SignedInUser
from tests.orders.conftest import MakeBuyer, sign_in_again

API = "/api/v1"
# Probes, metrics and documentation take no input worth the name.
SKIPPED_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs"})
METHODS = ("get", "post", "put", "patch", "delete")
BUYER_PREFIXES = (f"{API}/orders", f"{API}/carts", f"{API}/checkout")
NUL = "a\x00b"
BIG = 2**70
_PATH_PARAM = re.compile(r"\{(\w+)\}")
# Headers that routes read, each with a value no route can use.
HOSTILE_HEADERS = (
    ("X-Seller-Id", "not-a-store"),
    ("X-Seller-Id", "9" * 40),
    ("If-Match", '"' + "9" * 300 + '"'),
    ("If-Match", "W/, *, ,"),
    ("If-None-Match", '"a", W/"b", garbage'),
    ("Idempotency-Key", "k" * 1000),
    ("Idempotency-Key", 'a key with "quotes" and spaces'),
    ("X-Cart-Token", "x" * 500),
    ("Authorization", "Bearer " + "x" * 5000),
    ("Authorization", "Basic Og=="),
)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    # Without rate limits: thousands of calls from one address would meet a 429 first.
    return make_settings(tmp_path, database_url=database_url, ratelimit_enabled=False)


@dataclass
class Case:
    label: str
    method: str
    url: str
    query: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    content_type: str | None = None
    holds_nul: bool = False
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class World:
    """What the requests act on: real ids by the names routes give them."""

    owner: SignedInUser
    seller_id: uuid.UUID
    buyer: SignedInUser
    ids: dict[str, str]
    anonymous_cart_id: str
    cart_token: str


async def build_world(
    client: httpx2.AsyncClient, market: Market, make_user: MakeUser, make_buyer: MakeBuyer
) -> World:
    owner = await make_user(*Role)
    shop = await market.open_shop(owner)
    listing = await shop.list_product(1500, stock=50)
    buyer = await make_buyer((listing.variant_id, 1))
    group = await buyer.checkout()
    await buyer.new_cart()
    await buyer.add(listing.variant_id, 1)
    category = await client.post(
        f"{API}/admin/categories",
        json={"slug": f"c-{uuid.uuid4().hex[:8]}", "name": "Kitchen"},
        headers=owner.headers,
    )
    assert category.status_code == 201, category.text
    bystander = await make_user()
    anonymous = await client.post(f"{API}/carts")
    assert anonymous.status_code == 201, anonymous.text
    cart_token = anonymous.json()["token"]
    anonymous_cart_id = anonymous.json()["cart"]["id"]
    added = await client.post(
        f"{API}/carts/{anonymous_cart_id}/items",
        json={"variant_id": str(listing.variant_id), "quantity": 1},
        headers={"X-Cart-Token": cart_token},
    )
    assert added.status_code in (200, 201), added.text
    ids = {
        "seller_id": str(shop.seller_id),
        "product_id": str(listing.product_id),
        "variant_id": str(listing.variant_id),
        "location_id": str(shop.location_id),
        "order_id": group["orders"][0]["id"],
        "group_id": group["id"],
        "cart_id": str(buyer.cart_id),
        "category_id": category.json()["id"],
        "parent_id": category.json()["id"],
        "user_id": str(bystander.user_id),
        "provider": "sandbox",
    }
    return World(owner, shop.seller_id, buyer.user, ids, anonymous_cart_id, cart_token)


def resolve(schema: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def sample(
    schema: dict[str, Any],
    document: dict[str, Any],
    ids: dict[str, str],
    name: str = "",
    depth: int = 0,
) -> Any:
    """A plausible value for ``schema``: its example or default, a real id for a uuid
    named like one, or the smallest value of its type."""
    schema = resolve(schema, document)
    if depth > 8:
        return None
    for key in ("examples", "example"):
        if key in schema:
            value = schema[key]
            return value[0] if key == "examples" and isinstance(value, list) and value else value
    if schema.get("default") is not None:
        return schema["default"]
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [o for o in schema[key] if resolve(o, document).get("type") != "null"]
            return sample((options or schema[key])[0], document, ids, name, depth + 1)
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        required = schema.get("required", [])
        return {
            key: sample(value, document, ids, key, depth + 1)
            for key, value in schema.get("properties", {}).items()
            if key in required
        }
    if kind == "array":
        item = sample(schema.get("items", {}), document, ids, name, depth + 1)
        return [item] * max(1, schema.get("minItems", 1))
    if kind == "integer":
        return max(int(schema.get("minimum", 1)), 1)
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    text_format = schema.get("format")
    if text_format == "uuid":
        return ids.get(name, str(uuid.uuid4()))
    if text_format == "email":
        return "someone@example.com"
    if text_format == "date-time":
        return "2026-12-06T10:00:00Z"
    if text_format in ("uri", "url"):
        return "https://example.com/x"
    return ids.get(name, "a" * max(int(schema.get("minLength", 3)), 3))


def hostile_values() -> Iterator[tuple[str, Any, bool]]:
    """(label, value, holds NUL)."""
    yield "NUL", NUL, True
    yield "2**70", BIG, False
    yield "-2**70", -BIG, False
    yield "100k characters", "x" * 100_000, False
    yield "an object", {"a": 1}, False
    yield "a list", [1], False
    yield "1e308", 1e308, False


def body_mutations(body: Any) -> Iterator[tuple[str, Any, bool]]:
    """``body`` with one value replaced at a time, down to the fields of nested objects
    and of a list's first object; and a NUL key."""
    if not isinstance(body, dict):
        return
    yield "a NUL key", {**body, "k\x00": 1}, True

    def walk(value: Any, path: tuple[Any, ...]) -> Iterator[tuple[Any, ...]]:
        if isinstance(value, dict):
            for key, inner in value.items():
                yield (*path, key)
                yield from walk(inner, (*path, key))
        elif isinstance(value, list) and value:
            yield from walk(value[0], (*path, 0))

    for path in walk(body, ()):
        for label, bad, holds_nul in hostile_values():
            changed = copy.deepcopy(body)
            target = changed
            for step in path[:-1]:
                target = target[step]
            target[path[-1]] = bad
            yield f"{'.'.join(map(str, path))} = {label}", changed, holds_nul


def cases(
    path: str, method: str, operation: dict[str, Any], document: dict[str, Any], ids: dict[str, str]
) -> Iterator[Case]:
    parameters = operation.get("parameters", [])
    by_name = {parameter["name"]: parameter for parameter in parameters}

    def url(overrides: dict[str, str] | None = None) -> str:
        def fill(match: re.Match[str]) -> str:
            name = match.group(1)
            if overrides and name in overrides:
                return overrides[name]
            schema = resolve(by_name.get(name, {}).get("schema", {}), document)
            return str(sample(schema, document, ids, name))

        return _PATH_PARAM.sub(fill, path)

    verb = method.upper()
    for header, value in HOSTILE_HEADERS:
        yield Case(f"header {header}", verb, url(), headers={header: value})
    for parameter in parameters:
        name, where = parameter["name"], parameter["in"]
        if where == "path":
            yield Case(f"path {name} = NUL", verb, url({name: "a%00b"}), holds_nul=True)
            for label, text in (("40 digits", "9" * 40), ("an emoji", "%F0%9F%98%80")):
                yield Case(f"path {name} = {label}", verb, url({name: text}))
        elif where == "query":
            yield Case(f"query {name} = NUL", verb, url(), {name: NUL}, holds_nul=True)
            for label, text in (
                ("40 digits", "9" * 40),
                ("-40 digits", "-" + "9" * 40),
                ("empty", ""),
            ):
                yield Case(f"query {name} = {label}", verb, url(), {name: text})
    content = operation.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        body = sample(content["application/json"].get("schema", {}), document, ids)
        for label, raw in (
            ("not JSON", b"{not json\xff"),
            ("nested 50,000 deep", b"[" * 50_000 + b"]" * 50_000),
            ("a 50,000-digit number", b'{"n": ' + b"9" * 50_000 + b"}"),
            ("a number beyond floats", b'{"n": 1e999999}'),
        ):
            yield Case(f"body {label}", verb, url(), content=raw, content_type="application/json")
        wrong_shapes: list[tuple[str, Any, bool]] = [
            ("a list", [], False),
            ("null", None, False),
            ("a string", "x", False),
        ]
        for label, changed, holds_nul in [*wrong_shapes, *body_mutations(body)]:
            yield Case(
                f"body {label}",
                verb,
                url(),
                content=json.dumps(changed).encode(),
                content_type="application/json",
                holds_nul=holds_nul,
            )
    if "application/x-www-form-urlencoded" in content:
        schema = resolve(content["application/x-www-form-urlencoded"].get("schema", {}), document)
        for name in schema.get("properties", {}):
            yield Case(
                f"form {name} = NUL",
                verb,
                url(),
                content=f"{name}=a%00b".encode(),
                content_type="application/x-www-form-urlencoded",
                holds_nul=True,
            )


def judge(case: Case, response: httpx2.Response) -> str | None:
    """What is wrong with the answer, if anything."""
    status = response.status_code
    if status >= 500:
        return f"{status}: {response.text[:160]}"
    if case.holds_nul and status < 400:
        return f"{status}: accepted a NUL character"
    if status >= 400:
        if not response.headers.get("content-type", "").startswith("application/problem+json"):
            return f"{status} without a problem body: {response.text[:160]}"
        problem = response.json()
        if not (problem.get("type") and problem.get("title") and problem.get("status") == status):
            return f"{status} with an incomplete problem: {problem}"
    return None


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every operation but the probes', the deletion of one's own account last (a body
    that means "no body" deletes it, and the owner acts for every other operation)."""
    found = [
        (path, method, item[method])
        for path, item in document["paths"].items()
        if path not in SKIPPED_PATHS
        for method in METHODS
        if method in item
    ]
    return sorted(found, key=lambda entry: (entry[0], entry[1]) == (f"{API}/me", "delete"))


async def callers(
    runtime: Runtime, world: World, path: str
) -> list[tuple[dict[str, str], dict[str, str]]]:
    """Who calls ``path``, as (headers, ids for its parameters): the buyer on the buyer's
    routes, and on the cart routes an anonymous client with its cart token too; the owner
    acting for the store everywhere else. Each with a session of its own: a sign-out, a
    revocation or a password change by one operation leaves the next ones signed in."""
    if not path.startswith(BUYER_PREFIXES):
        owner = await sign_in_again(runtime, world.owner)
        return [({**owner.headers, "X-Seller-Id": str(world.seller_id)}, world.ids)]
    buyer = await sign_in_again(runtime, world.buyer)
    found = [(dict(buyer.headers), world.ids)]
    if path.startswith(f"{API}/carts"):
        anonymous_ids = {**world.ids, "cart_id": world.anonymous_cart_id}
        found.append(({"X-Cart-Token": world.cart_token}, anonymous_ids))
    return found


async def test_hostile_input_never_breaks_a_route(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    market: Market,
    make_user: MakeUser,
    make_buyer: MakeBuyer,
) -> None:
    world = await build_world(client, market, make_user, make_buyer)
    document = (await client.get(f"{API}/openapi.json")).json()
    found: list[str] = []
    walked = 0
    for path, method, operation in operations(document):
        for headers, ids in await callers(runtime, world, path):
            for case in cases(path, method, operation, document, ids):
                sent = {**headers, "Idempotency-Key": uuid.uuid4().hex, **case.headers}
                if case.content_type is not None:
                    sent["Content-Type"] = case.content_type
                response = await client.request(
                    case.method, case.url, params=case.query, content=case.content, headers=sent
                )
                walked += 1
                wrong = judge(case, response)
                if wrong is not None:
                    found.append(f"{case.method} {path} [{case.label}]: {wrong}")
    assert walked > 1000, f"only {walked} requests: the walk lost its way"
    assert not found, f"{len(found)} of {walked} hostile requests went wrong:\n" + "\n".join(found)
