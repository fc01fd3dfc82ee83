"""Server-sent events as OpenAI frames them: ``data: {json}\\n\\n`` per chunk, then
``data: [DONE]\\n\\n``. No ``event:`` or ``id:`` lines, no comments: some clients parse
exactly this and nothing else."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

DONE = b"data: [DONE]\n\n"


def frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def open_stream(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # nginx in front: pass each chunk on at once
        **headers})
    await resp.prepare(request)
    return resp


async def send(resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    await resp.write(frame(obj))


async def done(resp: web.StreamResponse) -> None:
    """``[DONE]`` and the end of the chunked body in one write: a client that stops reading
    at ``[DONE]`` (many do) then finds the body complete and keeps the connection for its
    next request, instead of closing it because the terminator had not arrived yet."""
    await resp.write_eof(DONE)
