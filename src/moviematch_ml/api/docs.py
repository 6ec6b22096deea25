"""The interactive API docs (``/docs``), served with Swagger UI's files from the package rather than a public CDN.

A page of the service's origin that runs scripts from a CDN gives that CDN the origin; here every file comes from
the ``swagger-ui-bundle`` package, and a Content-Security-Policy keeps the page to its own origin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from swagger_ui_bundle import swagger_ui_path

ASSETS: Final[str] = "/docs/assets"
# The three files the page loads, and nothing else of the package's directory: it also holds Swagger UI's own demo
# page (which loads a specification from a public host) and its OAuth2 redirect page, neither of which this origin
# should serve.
FILES: Final[dict[str, str]] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
# Swagger UI's page sets itself up with an inline script and inline styles; everything else is of this origin.
CSP: Final[str] = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'"
)
# By default Swagger UI shows a badge fetched from a public validator, with this service's schema URL in its query.
_PARAMETERS: Final[dict[str, object]] = {"validatorUrl": None}


def install(app: FastAPI) -> None:
    """Serve Swagger UI's files and the ``/docs`` page on ``app``."""
    directory = Path(swagger_ui_path)

    @app.get(ASSETS + "/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        media_type = FILES.get(name)
        if media_type is None:
            raise HTTPException(404)
        return FileResponse(directory / name, media_type=media_type)

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} - docs",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png",
            swagger_ui_parameters=_PARAMETERS,
        )
        page.headers["Content-Security-Policy"] = CSP
        return page
