"""The Starlette application: `create_app()` wires settings, Temporal and the repository."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send
from temporalio.client import Client

from activities.sandbox import close_sdk_transports
from api.errors import EXCEPTION_HANDLERS, ApiError, error_response
from api.feed import TransitionFeed
from api.gateway import PreviewDispatch, PreviewGateway
from api.openapi import openapi_document
from api.reading import is_json_media_type
from api.routes import ROUTES
from api.schemas import ErrorCode, TriggerShapes
from api.services import Services, TemporalGateway
from genloop.http import HostNames
from genloop.settings import Settings, load_settings
from persistence.repository import JobRepository

# Probes and API clients must reach these without credentials; neither reveals build data.
OPEN_PATHS = frozenset({"/healthz", "/openapi.json"})
# What a browser says about where a request comes from; anything else is another site's page.
_SAME_ORIGIN_FETCH = frozenset({b"same-origin", b"none"})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class RequestGuard:
    """Refuses what a hostile web page could send this loopback API.

    - A Host that names neither a loopback address nor a configured public name → 421: a page on an
      attacker's domain that rebinds its DNS to 127.0.0.1 is same-origin with this port otherwise.
    - A POST that is not `application/json` → 415: a cross-site page can only send "simple" bodies
      (form or text/plain) without a CORS preflight, which this API never grants.
    - Without a configured token, a state-changing request from another site's page (a foreign
      `Origin`, or `Sec-Fetch-Site` other than same-origin/none) → 403. With a token, BearerAuth
      already requires a header such pages cannot set.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self._host_names = HostNames(settings.api.host, settings.api.public_hosts)
        self._check_origin = not settings.api_requires_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        await error_response(*refusal)(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, ErrorCode, str] | None:
        host = _header(scope, b"host")
        if not self._host_names.allows(host.decode("latin-1") if host else None):
            return 421, ErrorCode.MISDIRECTED, "this server does not answer to that Host name"
        if scope["method"] != "POST":
            return None
        content_type = _header(scope, b"content-type")
        if content_type is None or not is_json_media_type(content_type.decode("latin-1")):
            return 415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "the body must be application/json (UTF-8)"
        if self._check_origin and self._cross_site(scope):
            return 403, ErrorCode.FORBIDDEN, "cross-site requests are refused"
        return None

    def _cross_site(self, scope: Scope) -> bool:
        fetch_site = _header(scope, b"sec-fetch-site")
        if fetch_site is not None and fetch_site.lower() not in _SAME_ORIGIN_FETCH:
            return True
        origin = _header(scope, b"origin")
        if origin is None:
            return False
        # Same origin means this server's own scheme, Host and port, as the browser sent them.
        host = _header(scope, b"host") or b""
        return origin.decode("latin-1").lower() not in {f"http://{host.decode('latin-1').lower()}",
                                                        f"https://{host.decode('latin-1').lower()}"}


class BearerAuth:
    """`Authorization: Bearer <token>` on every other path, unknown routes included (a 401, not a
    404, so route names do not leak). Constant-time compare; the token is never logged."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401, ErrorCode.UNAUTHORIZED, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(values) != 1:
            return False
        # The scheme is case-insensitive (RFC 7235); the token is compared byte for byte.
        scheme, _, token = values[0].partition(b" ")
        return hmac.compare_digest(scheme.lower() + b" " + token, self._expected)


def create_app(
    settings: Settings | None = None, *, client: Client | None = None, repo: JobRepository | None = None
) -> Starlette:
    """`client` and `repo`, when given, are the caller's to close; otherwise the app opens them at
    startup and closes what it opened at shutdown."""
    settings = settings or load_settings()
    shapes = TriggerShapes(settings.available_runners)
    document = openapi_document(shapes=shapes, settings=settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        repository = repo or JobRepository.from_url(settings.database_url)
        feed = TransitionFeed(repository)
        temporal = TemporalGateway(settings, client)
        # Not fatal: calls that need Temporal answer 503 until it is reachable, /healthz says so.
        with contextlib.suppress(ApiError):
            await temporal.client()
        app.state.services = Services(
            settings=settings,
            repo=repository,
            feed=feed,
            temporal=temporal,
            shapes=shapes,
            openapi=document,
        )
        app.state.gateway = PreviewGateway(settings, repository, temporal)
        try:
            yield
        finally:
            await app.state.gateway.aclose()
            await feed.aclose()
            # logs?follow=app reaches sandboxes through the e2b SDK: close its pools while the loop runs.
            await close_sdk_transports()
            if repo is None:
                await repository.aclose()

    # Outermost first: version hosts go to the preview gateway and never reach the API; for the API,
    # the Host check runs before authentication, so a rebinding page learns nothing.
    middleware = [Middleware(PreviewDispatch, settings=settings), Middleware(RequestGuard, settings=settings)]
    if settings.api_requires_token:
        middleware.append(Middleware(BearerAuth, token=settings.api.token.get_secret_value()))
    app = Starlette(routes=ROUTES, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    # "/v1/builds/x/" is not a route: answer 404 rather than redirect to a path nobody documented.
    app.router.redirect_slashes = False
    return app
