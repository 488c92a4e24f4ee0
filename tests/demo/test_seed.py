"""`soko seed demo`: a new marketplace that can be browsed and signed in to at once,
seeded through the API on both backends, and only ever into an empty database."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import typer
from click.testing import Result
from sqlalchemy import func, select
from typer.testing import CliRunner

from soko.app import create_app
from soko.demo import cli as demo_cli
from soko.demo.catalogue import ADMIN_EMAIL, BUYER_EMAIL, STORES, product_count
from soko.demo.seed import DemoPasswords, has_accounts, step_count
from soko.identity.models import User
from soko.platform.config import Environment, ensure_secrets, load_settings
from soko.platform.runtime import Runtime


def _app(runtime: Runtime) -> Any:
    return create_app(runtime=runtime)


@pytest.fixture
def cli_env(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """A development `soko` environment over an empty database with the schema."""
    env = {
        "SOKO_DATABASE_URL": database_url,
        "SOKO_DATA_DIR": str(tmp_path / "data"),
        "SOKO_ENV": "development",
        "COLUMNS": "200",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield env


def soko_seed(*args: str) -> Result:
    """`soko seed ...`, mounted the way soko.cli mounts it."""
    app = typer.Typer()
    app.add_typer(demo_cli.seed_commands(_app), name="seed")
    return CliRunner().invoke(app, ["seed", *args])


async def _browse() -> dict[str, Any]:
    """What a newcomer sees afterwards, through the API of a fresh process."""
    runtime = Runtime(ensure_secrets(load_settings()))
    app = create_app(runtime=runtime)
    found: dict[str, Any] = {}
    try:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as client:
            products: list[dict[str, Any]] = []
            cursor = None
            while True:
                params = {"limit": "10", **({"cursor": cursor} if cursor else {})}
                page = await client.get("/api/v1/products", params=params)
                assert page.status_code == 200, page.text
                products += page.json()["items"]
                cursor = page.json()["next_cursor"]
                if cursor is None:
                    break
            found["products"] = products
            found["categories"] = (await client.get("/api/v1/categories")).json()["items"]
            found["fruit"] = (
                await client.get("/api/v1/products", params={"category": "food", "limit": "50"})
            ).json()["items"]
            tomatoes = next(p for p in products if p["title"] == "Tomatoes")
            found["tomatoes"] = (await client.get(f"/api/v1/products/{tomatoes['id']}")).json()
            found["storefront"] = (await client.get("/api/v1/sellers/mama-mboga")).status_code
            logins = {}
            for email, password in (
                (ADMIN_EMAIL, DemoPasswords().admin),
                (STORES[0].owner_email, DemoPasswords().seller),
                (BUYER_EMAIL, DemoPasswords().buyer),
            ):
                signed_in = await client.post(
                    "/api/v1/auth/login", json={"identifier": email, "password": password}
                )
                assert signed_in.status_code == 200, signed_in.text
                me = await client.get(
                    "/api/v1/me",
                    headers={"Authorization": f"Bearer {signed_in.json()['access_token']}"},
                )
                logins[email] = sorted(me.json()["roles"])
            found["roles"] = logins
        async with runtime.db.transaction(read_only=True) as session:
            found["users"] = await session.scalar(select(func.count()).select_from(User))
    finally:
        await runtime.stop()
    return found


def test_the_demo_is_seeded_through_the_api_and_can_be_browsed(cli_env: dict[str, str]) -> None:
    # As `make run` calls it: into an empty database, --if-empty seeds.
    result = soko_seed("demo", "--if-empty")
    assert result.exit_code == 0, result.output
    for email in (ADMIN_EMAIL, BUYER_EMAIL, *(store.owner_email for store in STORES)):
        assert email in result.stdout
    assert DemoPasswords().seller in result.stdout
    assert f"{step_count()}/{step_count()}" in result.stderr

    seen = asyncio.run(_browse())
    assert len(seen["products"]) == product_count()
    assert len({product["seller_id"] for product in seen["products"]}) == len(STORES)
    assert all(product["min_price"]["currency"] == "KES" for product in seen["products"])
    mangoes = next(p for p in seen["products"] if p["title"] == "Apple mangoes")
    assert mangoes["min_price"] == {"amount": 18000, "currency": "KES"}
    assert [root["slug"] for root in seen["categories"]] == [
        "food",
        "fashion",
        "home",
        "electronics",
    ]
    assert {p["title"] for p in seen["fruit"]} >= {"Apple mangoes", "Sukuma wiki"}
    availability = {v["sku"]: v["available"] for v in seen["tomatoes"]["variants"]}
    assert availability == {"TOMATO-1KG": 50, "TOMATO-5KG": 0}
    assert seen["storefront"] == 200
    assert seen["roles"] == {
        ADMIN_EMAIL: ["admin"],
        STORES[0].owner_email: ["customer", "seller"],
        BUYER_EMAIL: ["customer"],
    }
    assert seen["users"] == len(STORES) + 2

    # A second run finds accounts: refused, or with --if-empty nothing at all.
    again = soko_seed("demo")
    assert again.exit_code == 1
    assert "already has accounts" in again.stderr
    quiet = soko_seed("demo", "--if-empty")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.output == ""
    assert asyncio.run(_browse())["users"] == len(STORES) + 2


def test_production_is_refused_unless_forced_and_then_gets_random_passwords(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real production configuration needs PostgreSQL and every key; the refusal only
    # looks at the environment, so the development settings are relabelled.
    settings = ensure_secrets(load_settings()).model_copy(update={"env": Environment.production})
    monkeypatch.setattr(demo_cli, "command_settings", lambda: settings)
    refused = soko_seed("demo")
    assert refused.exit_code == 1
    assert "production" in refused.stderr
    assert soko_seed("demo", "--if-empty").exit_code == 1

    forced = soko_seed("demo", "--force")
    assert forced.exit_code == 0, forced.output
    for password in (DemoPasswords().admin, DemoPasswords().seller, DemoPasswords().buyer):
        assert password not in forced.stdout
    assert ADMIN_EMAIL in forced.stdout


def test_switched_off_by_setting_it_seeds_nothing(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOKO_SEED_DEMO", "false")
    skipped = soko_seed("demo", "--if-empty", "--if-enabled")
    assert skipped.exit_code == 0, skipped.output
    assert skipped.output == ""
    assert asyncio.run(_has_accounts()) is False


async def _has_accounts() -> bool:
    runtime = Runtime(ensure_secrets(load_settings()))
    try:
        return await has_accounts(runtime)
    finally:
        await runtime.stop()
