"""Fixtures for the catalog tests: users, stores and categories made over HTTP."""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest

from soko.platform.config import Settings
from tests.catalog.support import Catalog
from tests.conftest import make_settings
from tests.identity.conftest import MakeUser, make_user  # noqa: F401


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    # Without rate limits: a test builds dozens of products from one address.
    return make_settings(tmp_path, database_url=database_url, ratelimit_enabled=False)


@pytest.fixture
def catalog(client: httpx2.AsyncClient, make_user: MakeUser) -> Catalog:  # noqa: F811
    return Catalog(client, make_user)
