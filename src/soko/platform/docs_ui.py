"""The interactive API reference at ``/docs``: Swagger UI, served by Soko itself.

FastAPI's own page loads Swagger UI from a CDN, so the reference needed internet access
(an operator's network or a developer on a train had none) and its Content Security
Policy had to trust the CDN and run an inline script. Here the assets come from the
installed ``fastapi-offline`` package (Swagger UI 5, which reads OpenAPI 3.1), and the
script that starts the UI is a file of its own: the page runs only scripts of this
origin (``script-src 'self'``, no inline script) and talks only to it.
"""

from __future__ import annotations

import json
import os
from html import escape
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, Response
from starlette.staticfiles import StaticFiles

from soko.platform.errors import NotFound

DOCS_PATH = "/docs"
ASSETS_PATH = f"{DOCS_PATH}/assets"

# Swagger UI styles its elements inline and draws icons from data: URLs; it fetches the
# OpenAPI description and, with "Try it out", the API from this origin.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)

# The assets change only with the installed package: a browser may keep them a day.
_ASSET_CACHE = "public, max-age=86400"
_ASSET_NAMES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")


def _assets_directory() -> Path:
    return Path(str(files("fastapi_offline") / "static"))


def _page(title: str) -> str:
    title = escape(title)
    return (
        "<!doctype html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n"
        f'<link rel="stylesheet" href="{ASSETS_PATH}/swagger-ui.css">\n'
        f'<link rel="icon" type="image/png" href="{ASSETS_PATH}/favicon.png">\n'
        "</head>\n<body>\n"
        '<div id="swagger-ui"></div>\n'
        f'<script src="{ASSETS_PATH}/swagger-ui-bundle.js"></script>\n'
        f'<script src="{ASSETS_PATH}/start.js"></script>\n'
        "</body>\n</html>\n"
    )


def _start_script(openapi_url: str) -> str:
    # No online validator badge: it would send the description's address to swagger.io.
    options = {
        "url": openapi_url,
        "dom_id": "#swagger-ui",
        "layout": "BaseLayout",
        "deepLinking": True,
        "showExtensions": True,
        "showCommonExtensions": True,
        "validatorUrl": None,
    }
    return (
        "window.ui = SwaggerUIBundle(Object.assign("
        f"{json.dumps(options)}, "
        "{presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset]}"
        "));\n"
    )


def docs_router(*, title: str, openapi_url: str) -> APIRouter:
    """``GET /docs`` and its assets, outside the OpenAPI description."""
    router = APIRouter(include_in_schema=False)
    directory = _assets_directory()
    static = StaticFiles(directory=directory)
    # Named files only (nothing else of the directory, no path of the client's making),
    # looked up once: they change only with the installed package.
    assets = {name: (str(directory / name), os.stat(directory / name)) for name in _ASSET_NAMES}
    page = _page(title)
    start = _start_script(openapi_url)

    @router.get(DOCS_PATH)
    async def swagger_ui() -> HTMLResponse:
        return HTMLResponse(page, headers={"content-security-policy": DOCS_CSP})

    @router.get(f"{ASSETS_PATH}/start.js")
    async def swagger_ui_start() -> Response:
        return Response(
            start,
            media_type="text/javascript; charset=utf-8",
            headers={"cache-control": "no-cache"},
        )

    @router.get(f"{ASSETS_PATH}/{{name}}")
    async def swagger_ui_asset(name: str, request: Request) -> Response:
        found = assets.get(name)
        if found is None:
            raise NotFound(f"No documentation asset named {name!r}")
        # StaticFiles answers 304 to a browser whose copy is current (ETag, date).
        response = static.file_response(found[0], found[1], request.scope)
        response.headers["cache-control"] = _ASSET_CACHE
        return response

    return router
