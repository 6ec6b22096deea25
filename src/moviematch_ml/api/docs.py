"""The interactive API docs (``/docs``), served with Swagger UI's files from the package rather than a public CDN.

A page of the service's origin that runs scripts from a CDN gives that CDN the origin; here every file comes from
the ``swagger-ui-bundle`` package, and a Content-Security-Policy keeps the page to its own origin.
"""

from __future__ import annotations

from typing import Final

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

ASSETS: Final[str] = "/docs/assets"
# Swagger UI's page sets itself up with an inline script and inline styles; everything else is of this origin.
CSP: Final[str] = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'"
)


def install(app: FastAPI) -> None:
    """Mount Swagger UI's files and the ``/docs`` page on ``app``."""
    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} - docs",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png",
        )
        page.headers["Content-Security-Policy"] = CSP
        return page
