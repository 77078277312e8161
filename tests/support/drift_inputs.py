"""Inputs of the drift sidecar's unit tests (tests/unit/drift/): the arrests features, a row of them and the
reference size; a request event of rows; one raw ASGI call of the application."""

from __future__ import annotations

import asyncio
from typing import Any

from monitoring.events import lower_headers
from tests.support import traffic_events as traffic

FEATURES = ["colour", "year", "age", "sex", "employed", "citizen", "checks"]
REFERENCE = 2000  # rows of the reference sample
ROW = {"colour": "White", "year": 2000, "age": 21, "sex": "Male", "employed": "Yes", "citizen": "No", "checks": 1}


def request_event(rows: list[dict[str, Any]], **kw: Any) -> tuple[dict[str, str], bytes]:
    return lower_headers(traffic.event_headers("request", "r", **kw)), traffic.v1_request(rows)
    """Headers and body of a binary-mode request event carrying `rows` (v1, rows as objects)."""


def asgi_call(
    app: Any,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    server: tuple[str, int] = ("127.0.0.1", 8090),
) -> tuple:
    """One request through the application's raw ASGI interface (`chunks`: the body as it arrives), on the
    listener `server`; returns the status and the body answered."""
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers, "server": server}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])
