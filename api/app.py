"""The Starlette application: `create_app()` wires settings, Temporal and the repository."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send
from temporalio.client import Client

from api.errors import EXCEPTION_HANDLERS, ApiError, error_response
from api.feed import TransitionFeed
from api.openapi import openapi_document
from api.routes import ROUTES
from api.schemas import ErrorCode, trigger_body_model
from api.services import Services, TemporalGateway
from genloop.settings import Settings, load_settings
from persistence.repository import JobRepository

# Probes and API clients must reach these without credentials; neither reveals build data.
OPEN_PATHS = frozenset({"/healthz", "/openapi.json"})


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


def create_app(settings: Settings | None = None, *, client: Client | None = None, repo: JobRepository | None = None) -> Starlette:
    """`client` and `repo`, when given, are the caller's to close; otherwise the app opens them at
    startup and closes what it opened at shutdown."""
    settings = settings or load_settings()
    trigger_model = trigger_body_model(settings.available_runners)
    document = openapi_document(
        trigger_model=trigger_model, auth=settings.api_requires_token, max_body_bytes=settings.api.max_body_bytes
    )

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
            trigger_model=trigger_model,
            openapi=document,
        )
        try:
            yield
        finally:
            await feed.aclose()
            if repo is None:
                await repository.aclose()

    middleware = []
    if settings.api_requires_token:
        middleware.append(Middleware(BearerAuth, token=settings.api.token.get_secret_value()))
    app = Starlette(routes=ROUTES, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    # "/v1/builds/x/" is not a route: answer 404 rather than redirect to a path nobody documented.
    app.router.redirect_slashes = False
    return app
