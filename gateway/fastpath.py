"""The OpenAI POST routes, past the framework's layers.

Every request through FastAPI walks its exception and exit-stack middlewares, then
the router's regex scan over every route, then Starlette's request/response
wrappers: per request a few dozen Python calls that do nothing for these routes.
This middleware, the app's first, hands ``POST`` to a hot path straight to its
handler and maps what the handler raises with the app's own exception handlers,
as those layers would. Everything else goes through the app as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import client_gone_handler, http_error_handler, unhandled_error_handler

Handler = Callable[[Request], Awaitable[Response]]


class FastPath:
    def __init__(self, app: ASGIApp, routes: dict[str, Handler]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = None
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.routes.get(scope["path"])
        if handler is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await handler(request)
        except ClientDisconnect as e:
            response = await client_gone_handler(request, e)
        except HTTPException as e:
            response = await http_error_handler(request, e)
        except Exception as e:
            response = await unhandled_error_handler(request, e)
        await response(scope, receive, send)
