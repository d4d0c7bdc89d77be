"""What the HTTP app says about itself and who may use it: the API key, checked before anything else
(a request without it gets 401 before its body is read, so a stranger learns nothing of the schema),
on every path but `/health` — `/docs`, `/openapi.json` and `/metrics` included — compared in constant
time; and an OpenAPI schema that tells the truth: client mistakes are 400s in OpenAI's error shape,
not FastAPI's 422s, so clients generated from it handle what the server really sends.
"""

from __future__ import annotations

import hmac
import json

OPEN_PATHS = {"/health"}
FIELDS = ("message", "type", "param", "code")  # param and code may be null
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {k: {"type": "string", "nullable": k in ("param", "code")} for k in FIELDS}}}}


class RequireKey:
    """ASGI middleware: `Authorization: Bearer KEY` on every path outside OPEN_PATHS."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {"message": "invalid or missing API key", "type": "invalid_request_error",
                                     "param": None, "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def truthful_openapi(app) -> None:
    """Make `app.openapi()` list 400 (OpenAI's error shape) where FastAPI would list 422."""
    from fastapi.openapi.utils import get_openapi

    def schema() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for operation in (op for path in spec.get("paths", {}).values() for op in path.values()):
                if operation.get("responses", {}).pop("422", None) is not None:
                    operation["responses"]["400"] = {"description": "Invalid request", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            schemas["Error"] = ERROR_SCHEMA
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = schema
