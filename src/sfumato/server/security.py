"""The guard in front of every route, as one ASGI middleware (it must see the raw request before FastAPI
reads the body):

1. Host check: when the server listens on loopback, the Host header must name loopback too (`localhost`,
   `127.0.0.1`, `[::1]`). A page on another site whose domain an attacker re-points at 127.0.0.1 (DNS
   rebinding) sends its own name as Host, so it is refused (421 would be exact; browsers treat 403 the same).
2. Cross-site requests get 403: `Sec-Fetch-Site: cross-site` or `same-site`, `Origin: null` (sandboxed
   frames, file:// pages), or an Origin whose host:port is not the Host. The exception is a top-level
   navigation (`Sec-Fetch-Mode: navigate`, GET) to the page itself, so a link to the server still opens it.
   Programs (curl, webuiapi, the openai client) send none of these headers and pass.
3. API key (`--api-key`): every route needs it, as `Authorization: Bearer KEY` (the OpenAI clients),
   HTTP basic auth with KEY as the password (webuiapi's `set_auth`, and the browser's own login prompt for
   the page) or `X-API-Key: KEY`. Compared in constant time, never echoed, never logged.
4. Body size: a Content-Length over the cap, or a streamed body that grows past it, is answered 413 before
   the handler sees it.

Every response also gets headers that keep the page out of frames and stop MIME sniffing.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PAGE_PATHS = ("/", "/index.html")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


class _TooLarge(Exception):
    pass


def _host_name(host: str) -> str:
    """'localhost:7860' -> 'localhost', '[::1]:7860' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _default_port(scheme: str) -> str:
    return "443" if scheme in ("https", "wss") else "80"


def _same_origin(origin: str, host: str, scheme: str) -> bool:
    """Is Origin (scheme://host[:port]) the server's own origin as the Host header names it?"""
    try:
        o = urlsplit(origin)
        o_host, o_port = (o.hostname or ""), str(o.port) if o.port else _default_port(o.scheme)
    except ValueError:
        return False
    h = urlsplit(f"{scheme}://{host}")
    try:
        h_host, h_port = (h.hostname or ""), str(h.port) if h.port else _default_port(scheme)
    except ValueError:
        return False
    return bool(o_host) and o.scheme == scheme and o_host == h_host and o_port == h_port


class Guard:
    """ASGI middleware; see the module docstring. `allowed_hosts=None` accepts any Host header."""

    def __init__(self, app, *, api_key: str | None, max_body: int, allowed_hosts: tuple[str, ...] | None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body
        self.allowed_hosts = allowed_hosts

    @property
    def state(self):
        """The wrapped FastAPI app's state (`state.sfumato` is the server's `ServerState`)."""
        return self.app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":  # no route uses one; refuse rather than let it past the checks
            await receive()  # websocket.connect
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": list(message.get("headers", []))
                           + [h for h in SECURITY_HEADERS if h[0] not in have]}  # fmt: skip
            await send(message)

        openai = path.startswith("/v1/")
        refusal = self._refusal(headers, method, path, scope.get("scheme", "http"))
        if refusal is not None:
            status, message, extra = refusal
            return await _send_json(send_with_headers, status, message, extra, openai)

        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_json(send_with_headers, 400, "Content-Length is not a number", None, openai)
            if int(length) > self.max_body:
                return await _send_json(send_with_headers, 413, self._too_large(), None, openai)

        seen, too_large, started = 0, False, False

        async def counting_receive():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    too_large = True
                    raise _TooLarge
            return message

        async def guarded_send(message):
            # A handler may catch the error of a body that grew too large and answer something else
            # (FastAPI answers 400 "error parsing the body"): whatever it answers becomes the 413.
            nonlocal started
            if too_large:
                if not started:
                    started = True
                    await _send_json(send_with_headers, 413, self._too_large(), None, openai)
                return
            if message["type"] == "http.response.start":
                started = True
            await send_with_headers(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            pass
        if too_large and not started:
            await _send_json(send_with_headers, 413, self._too_large(), None, openai)

    def _too_large(self) -> str:
        return f"request body larger than the {self.max_body} bytes this server accepts"

    def _refusal(self, headers: dict, method: str, path: str, scheme: str):
        host = headers.get("host", "")
        if self.allowed_hosts is not None and _host_name(host) not in self.allowed_hosts:
            return 403, f"Host {host!r} is not a name of this server (it listens on loopback only)", None
        site = headers.get("sec-fetch-site")
        navigation = method in ("GET", "HEAD") and headers.get("sec-fetch-mode") == "navigate" and path in PAGE_PATHS
        if not navigation:
            if site in ("cross-site", "same-site"):
                return 403, "cross-site requests are refused", None
            origin = headers.get("origin")
            if origin is not None and (origin == "null" or not _same_origin(origin, host, scheme)):
                return 403, "cross-origin requests are refused", None
        if self.api_key is not None and not self._authorized(headers):
            return 401, "this server needs its API key", [(b"www-authenticate", b'Basic realm="sfumato"')]
        return None

    def _authorized(self, headers: dict) -> bool:
        candidates = []
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            candidates.append(value.strip())
        elif scheme.lower() == "basic":
            try:
                user_pass = base64.b64decode(value.strip(), validate=True).decode("utf-8")
                candidates.append(user_pass.partition(":")[2])
            except (binascii.Error, UnicodeDecodeError, ValueError):
                pass
        if "x-api-key" in headers:
            candidates.append(headers["x-api-key"])
        ok = False
        for c in candidates:  # no early exit: every candidate is compared, in constant time each
            ok |= hmac.compare_digest(c.encode(), self.api_key)
        return ok


async def _send_json(send, status: int, message: str, extra_headers=None, openai: bool = False) -> None:
    """An error in A1111's shape, or in OpenAI's for its routes (what each kind of client parses)."""
    if openai:
        payload = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "invalid_request_error"),
                             "param": None, "code": None}}  # fmt: skip
    else:
        payload = {"error": _REASONS.get(status, "error"), "detail": message}
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + list(extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 413: "ContentTooLarge"}
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 413: "invalid_request_error"}
