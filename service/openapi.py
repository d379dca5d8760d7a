"""The OpenAPI contract's settings-dependent parts, and the interactive docs served without a CDN.

``install_contract(app, settings)`` post-processes the generated document (built once, then cached by
FastAPI) so that it states the limits this process enforces:

* the /rank body's models (``RankRequest``, ``RankColumnsRequest``), which the route reads itself
  (``service.rank_body``), added to the components as FastAPI would add them;
* ``RankRequest.candidates.maxItems`` and ``CandidateColumns.item_id.maxItems`` = ``limits.max_candidates``;
  ``FeedbackRequest.events.maxItems`` = ``limits.max_feedback_events``;
* ``fusion`` of both /rank bodies: with ``fusion.allow_request_expressions: false``, an ``enum`` of the configured
  profile names (plus ``default``); with expressions allowed, ``maxLength`` = the longer of
  ``limits.max_expression_chars`` and the longest profile name, and an ``x-mtrank-runtime-check`` (the
  expression must compile against the bundle's tasks).

What JSON Schema cannot state is marked ``x-mtrank-runtime-check`` (``service.schemas``). ``LINKS`` adds
OpenAPI links for the workflows that chain operations (a ranked item's feedback; shadowing, reloading
and rolling back the version ``/models`` names), which is what a stateful client or fuzzer follows.

``install_docs(app)`` serves Swagger UI at ``/docs`` and ReDoc at ``/redoc`` with FastAPI's
``get_swagger_ui_html`` / ``get_redoc_html``, their JavaScript and CSS from the ``fastapi-offline``
package's static files mounted at ``/docs-assets`` (no request leaves the server: no CDN, no web fonts).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.models import Schema
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import json_schema

from service.schemas import RUNTIME_CHECK, RankColumnsRequest, RankRequest
from service.settings import DEFAULT_PROFILE, Settings

ASSETS_URL = "/docs-assets"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def assets_dir() -> Path:
    """The directory holding ``ASSETS`` (Swagger UI 5 and ReDoc 2 builds shipped by ``fastapi-offline``)."""
    return Path(str(files("fastapi_offline") / "static"))


def install_docs(app: FastAPI) -> None:
    """GET /docs (Swagger UI), /docs/oauth2-redirect, /redoc and the static assets at ``ASSETS_URL``."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "").rstrip("/")
        return f"{root}{app.openapi_url}", f"{root}{ASSETS_URL}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        openapi_url, assets = urls(request)
        return get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} - Swagger UI",
                                   oauth2_redirect_url="/docs/oauth2-redirect",
                                   swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{assets}/swagger-ui.css", swagger_favicon_url=f"{assets}/favicon.png")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        openapi_url, assets = urls(request)
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{assets}/redoc.standalone.js", redoc_favicon_url=f"{assets}/favicon.png",
                              with_google_fonts=False)


# (from method, from path) -> [(link name, to method, to path, requestBody with runtime expressions)], on the 200
LINKS: dict[tuple[str, str], list[tuple[str, str, str, dict[str, Any]]]] = {
    ("post", "/rank"): [("FeedbackForTheTopItem", "post", "/feedback", {"events": [{
        "request_id": "$response.body#/request_id", "item_id": "$response.body#/items/0/item_id",
        "labels": "$response.body#/items/0/task_scores"}]})],
    ("get", "/models"): [("ShadowTheActiveVersion", "put", "/admin/shadow", {"version": "$response.body#/active"}),
                         ("ReloadTheActiveVersion", "post", "/admin/reload", {"version": "$response.body#/active"})],
    ("put", "/admin/shadow"): [("ClearTheShadow", "delete", "/admin/shadow", {})],
    ("post", "/admin/reload"): [("RollBack", "post", "/admin/rollback", {})],
}


def add_links(doc: dict[str, Any]) -> None:
    """Write ``LINKS`` into the 200 responses of an OpenAPI document, in place."""
    for (method, path), links in LINKS.items():
        response = doc["paths"][path][method]["responses"]["200"]
        for name, to_method, to_path, body in links:
            link: dict[str, Any] = {"operationId": doc["paths"][to_path][to_method]["operationId"]}
            if body:
                link["requestBody"] = body
            response.setdefault("links", {})[name] = link


def apply_limits(doc: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Write the request models that handlers parse themselves (``RankRequest``: service.rank_body), the
    settings-dependent constraints (module docstring) and ``LINKS`` into an OpenAPI document, in place."""
    add_links(doc)
    schemas = doc["components"]["schemas"]
    _, defs = json_schema.models_json_schema([(RankRequest, "validation"), (RankColumnsRequest, "validation")],
                                             ref_template="#/components/schemas/{model}")
    schemas.update({name: jsonable_encoder(Schema(**schema), by_alias=True, exclude_none=True)  # as FastAPI does
                    for name, schema in defs["$defs"].items()})
    limits = settings.limits
    schemas["RankRequest"]["properties"]["candidates"]["maxItems"] = limits.max_candidates
    schemas["CandidateColumns"]["properties"]["item_id"]["maxItems"] = limits.max_candidates
    schemas["FeedbackRequest"]["properties"]["events"]["maxItems"] = limits.max_feedback_events
    names = sorted({DEFAULT_PROFILE, *settings.fusion.profiles})
    for model in ("RankRequest", "RankColumnsRequest"):
        fusion = schemas[model]["properties"]["fusion"]
        text = next(s for s in fusion["anyOf"] if s.get("type") == "string")
        if settings.fusion.allow_request_expressions:
            text["maxLength"] = max(limits.max_expression_chars, *map(len, names))
            fusion[RUNTIME_CHECK] = ("a profile name, else an expression that compiles against the active bundle's "
                                     f"tasks (profiles: {', '.join(names)}); otherwise a 422 naming body.fusion")
        else:
            text.pop("minLength", None)
            text.pop("maxLength", None)
            text["enum"] = names
    return doc


def install_contract(app: FastAPI, settings: Settings) -> None:
    """Make ``app.openapi()`` (what ``/openapi.json`` serves) return the document with ``apply_limits``."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = apply_limits(build(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
