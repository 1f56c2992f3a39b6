"""Request plumbing shared by the API and the pages: the database, the caller, error mapping."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from datetime import date
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from labcommons.actor import Actor
from labcommons.audit import context as audit_context
from labcommons.config import get_settings
from labcommons.db import MAX_ID, Database
from labcommons.errors import DomainError, Forbidden, Unauthenticated
from labcommons.idempotency import Outcome, fingerprint, run_idempotent
from labcommons.identity import roles
from labcommons.identity import service as identity
from labcommons.identity.roles import Action

log = logging.getLogger("labcommons")

# A row id in a path: one outside the id range (ids are positive, see db.MAX_ID) is a 422 naming the parameter,
# never a number the database driver cannot bind.
Id = Annotated[int, Path(gt=0, le=MAX_ID)]


def get_db(request: Request) -> Database:
    """The app's database (built in the lifespan)."""
    db: Database = request.app.state.db
    return db


async def request_db(request: Request) -> Database:
    """The app's database, as a dependency: async because it does no I/O, so FastAPI runs it on the event loop
    instead of handing it to the thread pool (a hop every request would pay)."""
    db: Database = request.app.state.db
    return db


def api_actor(request: Request) -> Actor:
    """The caller of an API request, from its bearer token; Unauthenticated without one."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        # Browsers signed in to the pages may call the API with their session cookie; a write must then carry
        # the page's CSRF token in X-CSRF-Token, since SameSite does not stop requests from sibling sites.
        actor = page_actor(request)
        if actor is not None:
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                session_token = request.cookies.get(SESSION_COOKIE, "")
                given = request.headers.get("x-csrf-token", "")
                if not identity.check_csrf(get_settings().secret_key, session_token, given):
                    raise Forbidden("A write with the session cookie needs the page's CSRF token in X-CSRF-Token.",
                                    field="X-CSRF-Token")
            return actor
        raise Unauthenticated("Send an API token as 'Authorization: Bearer <token>'.")
    actor = _token_actor(request, token.strip())
    audit_context.identify(actor.user_id, "token")
    return actor


def _token_actor(request: Request, token: str) -> Actor:
    db = get_db(request)
    try:
        with db.unit_of_work(write=False) as session:
            return identity.authenticate_token(session, token)
    except OperationalError:
        if not db.is_sqlite:
            raise
        # SQLite will not upgrade a stale read to a write (the once-a-minute last-used stamp); retry serialised.
        with db.unit_of_work(write=True) as session:
            return identity.authenticate_token(session, token)


class InsufficientScope(Forbidden):
    """The API token lacks the scope a route needs (its owner's roles may still allow the action)."""

    code = "insufficient_scope"

    def __init__(self, scope: str) -> None:
        super().__init__(f"This API token lacks the scope {scope!r}; create a token with it.", scope=scope)


def has_scope(actor: Actor, scope: str) -> bool:
    """Browser sessions (no scopes) are limited by roles alone."""
    return actor.scopes is None or scope in actor.scopes


def require_scope(scope: str) -> Callable[..., Awaitable[Actor]]:
    """A dependency giving the API caller, refused with 403 insufficient_scope when their token lacks `scope`."""

    async def dependency(actor: Annotated[Actor, Depends(api_actor)]) -> Actor:  # no I/O: kept off the thread pool
        if not has_scope(actor, scope):
            raise InsufficientScope(scope)
        return actor

    dependency.__name__ = f"require_scope_{scope.replace(':', '_')}"
    return dependency


_NUMBER = re.compile(r"\s*[-+]?[0-9]+(\.[0-9]*)?\s*")


def _written_out(value: Any) -> Any:
    # Pydantic reads a number, or a string of digits, as Unix time (541 is 1970-01-01T00:09:01Z); the API takes
    # ISO 8601 text, as its schema says.
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.fullmatch(value)):
        raise ValueError("write it out, e.g. 2026-11-24 or 2026-11-24T08:00:00+08:00, not as a number")
    return value


def _day_written_out(value: Any) -> Any:
    # Pydantic also takes a time at midnight for a day; the schema's `date` format is YYYY-MM-DD.
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        raise ValueError("a day is written YYYY-MM-DD, e.g. 2026-11-24")
    return _written_out(value)


# Times and days in requests (bodies and parameters): ISO 8601 text only; a time must carry its UTC offset.
Instant = Annotated[AwareDatetime, BeforeValidator(_written_out)]
Day = Annotated[date, BeforeValidator(_day_written_out)]

# The database of a request and the Idempotency-Key header, as route parameter types.
Db = Annotated[Database, Depends(request_db)]
IdempotencyKey = Annotated[str | None, Header(max_length=200)]


def require_role_for(scope: str, action: Action) -> Callable[..., Actor]:
    """A dependency giving the API caller with `scope` whose roles allow `action` over some scope, else 403.

    It runs before the body is read, so a caller the route can never concern learns nothing else from it."""
    scoped = require_scope(scope)

    # A default rather than Annotated: annotations are strings here, and `scoped` is local to this function.
    def dependency(actor: Actor = Depends(scoped)) -> Actor:
        roles.require_some(actor, action)
        return actor

    dependency.__name__ = f"require_{action.value}_{scope.replace(':', '_')}"
    return dependency


def idempotent_post(request: Request, db: Database, actor: Actor, key: str | None, payload: Any,
                    work: Callable[[Session], Outcome]) -> JSONResponse:
    """Run a POST's `work` at most once per Idempotency-Key (see idempotency.run_idempotent) and answer with its
    outcome; `payload` is what the request asks for, beside its path. A replayed answer says so in a header."""
    print_ = fingerprint("POST", request.url.path, payload) if key is not None else ""  # only a key needs it
    outcome = run_idempotent(db, actor.user_id, key, print_, work)
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
    return JSONResponse(outcome.body, status_code=outcome.status_code, headers=headers)


SESSION_COOKIE = "labcommons_session"


def page_actor(request: Request) -> Actor | None:
    """The signed-in browser user, or None."""
    if hasattr(request.state, "actor"):
        cached: Actor | None = request.state.actor
        return cached
    token = request.cookies.get(SESSION_COOKIE)
    actor = None
    if token:
        with get_db(request).unit_of_work(write=False) as session:
            actor = identity.actor_for_web_session(session, token)
    request.state.actor = actor
    if actor is not None:
        audit_context.identify(actor.user_id, "user")
    return actor


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    # Only the first part says where the input came from: a field may itself be called "body" (a message's text).
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or None


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def link(operation_id: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link to `operation_id`: each parameter from a field of the response body (`booking_id="id"`), or
    from a runtime expression when it starts with `$` (`order_id="$request.path.order_id"`)."""
    return {"operationId": operation_id,
            "parameters": {name: v if v.startswith("$") else f"$response.body#/{v}" for name, v in parameters.items()}}


class ErrorRead(BaseModel):
    """The body of every API error; some errors add details (e.g. `conflicts`, `retry_after`, `errors`)."""

    model_config = ConfigDict(extra="allow", title="Error")

    error: str = Field(description="Stable snake_case code", examples=["overlapping_booking"])
    message: str = Field(description="Human text in the caller's language")
    field: str | None = Field(description="The input it concerns, when one does")


_ERROR_REF = {"$ref": "#/components/schemas/Error"}
# Answers any API route may give besides its own: how the request itself can be wrong (its size, its rate, its
# credentials), all from this module or the security middleware.
_INVALID = {"description": "Invalid input; `field` names it"}
_TOO_LARGE = {"description": "The body is larger than the limit (`body_too_large`)"}
_TOO_MANY = {"description": "Too many writes this minute (`rate_limited`); `Retry-After` says when to try again"}
_NO_TOKEN = {"description": "No valid API token"}
_NOT_ALLOWED = {"description": "Not allowed: roles, the token's scope, or a cookie write without its CSRF token"}
_NOT_FOUND = {"description": "Nothing (visible to the caller) at this address"}


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for dependency in dependant.dependencies:
        if dependency.call is not None:
            yield dependency.call
        yield from _calls(dependency)


def _document_errors(schema: dict[str, Any], app: FastAPI) -> None:
    """Give every API operation the error answers it can give, with the error body as their schema."""
    by_operation = {(r.path_format, m.lower()): r for r in iter_route_contexts(app.routes)
                    if isinstance(r.original_route, APIRoute) for m in r.methods or ()}
    for path, operations in schema.get("paths", {}).items():
        if not path.startswith("/api/"):
            continue
        for method, operation in operations.items():
            route = by_operation.get((path, method))
            if route is None:
                continue
            responses: dict[str, Any] = operation.setdefault("responses", {})
            dependant = route.dependant
            extra: dict[str, dict[str, str]] = {}
            if api_actor in set(_calls(dependant)):
                extra |= {"401": _NO_TOKEN, "403": _NOT_ALLOWED}
            if dependant.path_params:
                extra["404"] = _NOT_FOUND
            if "requestBody" in operation:
                extra["413"] = _TOO_LARGE
            if method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
                extra["429"] = _TOO_MANY
            if "requestBody" in operation or operation.get("parameters"):
                extra["422"] = _INVALID
            for status, answer in extra.items():
                responses.setdefault(status, dict(answer))
            for status, answer in responses.items():
                if not status.startswith("4"):
                    continue
                media = answer.setdefault("content", {}).setdefault("application/json", {})
                given = media.get("schema", {}).get("$ref", "")
                if not given or given.endswith("/HTTPValidationError"):
                    media["schema"] = dict(_ERROR_REF)
                if answer.get("description") == "Validation Error":
                    answer["description"] = _INVALID["description"]
            operation["responses"] = dict(sorted(responses.items()))
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ErrorRead.model_json_schema(ref_template="#/components/schemas/{model}")
    # FastAPI's default 422 body (`detail`) is not what the handlers below send.
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)


def install_error_handlers(app: FastAPI) -> None:
    """Map domain errors, validation errors and HTTP errors to one JSON shape under /api, and say so in the
    OpenAPI schema."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _document_errors(schema, app)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(DomainError)
    async def _domain(request: Request, exc: DomainError) -> Response:
        if not _wants_json(request):
            from labcommons.pages import render_error

            return render_error(request, exc.status_code, exc.message, code=exc.code)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {}
        field = _field_of(first.get("loc", ()))
        message = str(first.get("msg", "Invalid input."))
        if first.get("type") == "missing":
            code = "missing_field"
        elif first.get("type") == "json_invalid":
            code, field = "invalid_json", None
        else:
            code = "invalid_input"
        body = {
            "error": code,
            "message": f"{field}: {message}" if field else message,
            "field": field,
            "errors": [{"field": _field_of(e.get("loc", ())), "message": str(e.get("msg"))} for e in errors],
        }
        if not _wants_json(request):
            from labcommons.pages import render_error

            return render_error(request, 422, str(body["message"]))
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthenticated", 403: "forbidden"}
        if not _wants_json(request):
            from labcommons.pages import render_error

            return render_error(request, exc.status_code, str(exc.detail))
        if exc.status_code == 400:
            # FastAPI's answer to a body it cannot even decode (e.g. not UTF-8): invalid input, like broken JSON.
            return JSONResponse({"error": "invalid_json", "message": "The request body could not be read as JSON.",
                                 "field": None}, status_code=422)
        return JSONResponse(
            {"error": codes.get(exc.status_code, "http_error"), "message": str(exc.detail), "field": None},
            status_code=exc.status_code, headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(DataError)
    async def _data(request: Request, exc: DataError) -> Response:
        # PostgreSQL cannot store the NUL character in text (SQLite can); psycopg refuses it before sending. Text
        # carrying one is the caller's invalid input, wherever it came in, not our 500.
        if "NUL (0x00)" not in str(exc.orig):
            return await _unexpected(request, exc)
        message = "Text may not contain the NUL character."
        if not _wants_json(request):
            from labcommons.pages import render_error

            return render_error(request, 422, message)
        # A query or path parameter can be named; which field of a body carried it is no longer known here.
        given = [*request.query_params.multi_items(), *request.path_params.items()]
        field = next((name for name, value in given if "\x00" in str(value)), None)
        return JSONResponse({"error": "invalid_text", "message": message, "field": field}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        if not _wants_json(request):
            from labcommons.pages import render_error

            return render_error(request, 500, "Something went wrong on our side.")
        return JSONResponse(
            {"error": "internal_error", "message": "Something went wrong on our side.", "field": None},
            status_code=500,
        )
