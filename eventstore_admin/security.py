"""Who may change things, and what no page may leak.

The console is read-only unless it was started with a token. An operator who signs in with the token
gets a session cookie (HttpOnly, SameSite=Strict, signed with a key that lives as long as the process);
every state-changing request must then carry the session's CSRF token in a header or form field and
come from the console's own origin. Host names are checked too, so a DNS-rebinding page cannot read the
console through a name of its own.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, quote_plus

from sqlalchemy.engine import make_url
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SESSION_SECONDS = 12 * 3600
MIN_TOKEN_LENGTH = 16

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)
"""No inline script or style anywhere: event data that slipped through escaping still could not run."""

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # `same-origin`, not `no-referrer`: with no-referrer browsers send `Origin: null` on POST, which the
    # origin check below must refuse.
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=()"),
)


def mask_url(url: str) -> str:
    """The database URL without its password and query (which may hold one): safe to show on a page."""
    try:
        parsed = make_url(url)
    except Exception:
        return "(database URL hidden: it does not parse)"
    return parsed.set(query={}).render_as_string(hide_password=True)


class Redactor:
    """Removes secrets (the database password, the token) from text before it reaches a page.

    Error messages of drivers and of the library may quote the URL they were given.
    """

    def __init__(self, secrets_: Iterable[str | None]) -> None:
        self._secrets = sorted({s for s in secrets_ if s and len(s) >= 3}, key=len, reverse=True)

    @classmethod
    def for_settings(cls, database_url: str, token: str | None) -> Redactor:
        """The URL, its password and the token; the password also as URLs spell it, since a message may
        quote the URL rewritten (another driver's scheme, say) and so not match it whole."""
        password: str | None = None
        try:
            password = make_url(database_url).password
        except Exception:
            password = None
        spellings = [] if password is None else [password, quote(password, safe=""), quote_plus(password)]
        return cls([database_url, *spellings, token])

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    csrf: str


class Sessions:
    """Signed, stateless sessions and the CSRF token bound to each; the key dies with the process."""

    def __init__(self, token: str | None, cookie_name: str) -> None:
        self.token = token
        self.cookie_name = cookie_name
        self._key = secrets.token_bytes(32)
        self._ended: set[str] = set()

    @property
    def enabled(self) -> bool:
        """Without a token the console is read-only and nobody can sign in."""
        return self.token is not None

    def check_token(self, offered: str) -> bool:
        if self.token is None:
            return False
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        """A new session's cookie value: `sid.issued.mac`."""
        body = f"{secrets.token_urlsafe(18)}.{int(time.time())}"
        return f"{body}.{self._mac(body)}"

    def session(self, request: Request) -> Session | None:
        """The request's valid session, if it has one."""
        if self.token is None:
            return None
        value = request.cookies.get(self.cookie_name)
        if not value or value.count(".") != 2:
            return None
        sid, issued, mac = value.split(".")
        if not hmac.compare_digest(mac, self._mac(f"{sid}.{issued}")):
            return None
        if not issued.isdigit() or time.time() - int(issued) > SESSION_SECONDS or sid in self._ended:
            return None
        return Session(sid, self._mac(f"csrf.{sid}"))

    def end(self, session: Session) -> None:
        """Sign out: the cookie is dropped by the browser and refused here even if replayed."""
        self._ended.add(session.sid)

    @staticmethod
    def csrf_matches(session: Session, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), session.csrf.encode())


def same_origin(request: Request) -> bool:
    """Whether a state-changing request comes from a page of the console itself.

    Browsers send `Origin` with every POST; `Referer` is the fallback. The host was already checked
    against the allowed names, so comparing with it is comparing with the console's own origin.
    """
    expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is not None:
        return origin == expected
    referer = request.headers.get("referer")
    return referer is not None and (referer == expected or referer.startswith(expected + "/"))


def host_name(header: str) -> str:
    """The name in a Host header, without the port; IPv6 literals keep their brackets."""
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.split(":", 1)[0]


class Guard:
    """In front of the whole console: answers only to allowed host names, and adds the security
    headers to every response (pages, JSON, the live log and static files alike)."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str]) -> None:
        self.app = app
        self.hosts = frozenset(h.lower() for h in hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = ""
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
        static = scope.get("path", "").startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS:
                    headers.append(name.decode(), value.decode())
                if not static:
                    # Pages show event data: keep them out of shared and disk caches.
                    headers["cache-control"] = "no-store"
            await send(message)

        if host_name(host).lower() not in self.hosts:
            # A name the console was not told about: perhaps a DNS-rebinding page. Say nothing more.
            await PlainTextResponse("unknown host name", status_code=400)(scope, receive, with_headers)
            return
        await self.app(scope, receive, with_headers)


def allowed_hosts(bind: str, extra: Iterable[str]) -> list[str]:
    """Host names the console answers to: its bind address, the loopback names, and those given."""
    hosts = {"127.0.0.1", "localhost", "[::1]", *extra}
    if bind not in ("0.0.0.0", "::", ""):
        hosts.add(f"[{bind}]" if ":" in bind else bind)
    return sorted(hosts)
