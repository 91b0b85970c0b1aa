"""/docs (Swagger UI) and /redoc served from this process, with nothing loaded from elsewhere.

FastAPI's default pages load Swagger UI, ReDoc, a favicon and Google fonts from public hosts: blank
offline, and traffic this project never sends. The pages here use the same FastAPI page builders
with the assets of the ``fastapi-offline`` package (Swagger UI and ReDoc builds, shipped in its
wheel) mounted under ``/docs-assets``, and ReDoc without Google fonts. Both pages carry a
Content-Security-Policy that allows this origin only, so the browser does not even try what the
builds still reference elsewhere (ReDoc's sidebar logo on its vendor's CDN). Create the app with
``docs_url=None, redoc_url=None`` and call :func:`serve_docs` on it.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
# inline: FastAPI's pages start Swagger UI / ReDoc from an inline script; blob: ReDoc's search worker
SELF_ONLY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' blob:; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'"
)


def serve_docs(app: FastAPI) -> None:
    """Add ``/docs`` and ``/redoc`` to ``app``, self-contained."""
    assets = files("fastapi_offline") / "static"
    app.mount(ASSETS_URL, StaticFiles(directory=str(assets)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    title = app.title

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return _self_only(
            get_swagger_ui_html(
                openapi_url=openapi_url,
                title=f"{title} - API",
                swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
                swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
                swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
            )
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return _self_only(
            get_redoc_html(
                openapi_url=openapi_url,
                title=f"{title} - ReDoc",
                redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
                redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
                with_google_fonts=False,
            )
        )


def _self_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = SELF_ONLY
    return page
