"""Who may use the console and how actions are protected.

* Sessions: a cookie signed with the console's secret (HMAC-SHA256), holding a random session id
  and whether the visitor signed in with the token. Nothing else is kept on the server.
* Token: when one is configured, every page but the sign-in page needs a signed-in session (or
  ``Authorization: Bearer <token>`` for scripts).
* CSRF: every action is a POST carrying a token derived from the session id; a POST without it,
  or from another origin, is refused with 403 before anything runs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request

SESSION_COOKIE = "cg_console"
SESSION_DAYS = 7


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    signed_in: bool
    issued: float


class Signer:
    """Signs and checks session cookies and CSRF tokens with one secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, payload: bytes) -> str:
        digest = hmac.new(self._secret, payload, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def cookie(self, session: Session) -> str:
        doc = {"id": session.id, "in": session.signed_in, "at": session.issued}
        payload = base64.urlsafe_b64encode(orjson.dumps(doc)).decode().rstrip("=")
        return f"{payload}.{self._mac(payload.encode())}"

    def session(self, cookie: str | None) -> Session | None:
        """The session a cookie holds, or None when it is missing, forged or expired."""
        if not cookie or "." not in cookie:
            return None
        payload, mac = cookie.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac(payload.encode())):
            return None
        try:
            doc = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            session = Session(str(doc["id"]), bool(doc["in"]), float(doc["at"]))
        except (ValueError, KeyError, TypeError):
            return None
        if time.time() - session.issued > SESSION_DAYS * 86_400:
            return None
        return session

    def csrf(self, session: Session) -> str:
        return self._mac(b"csrf:" + session.id.encode())

    def csrf_ok(self, session: Session | None, token: str | None) -> bool:
        return (
            session is not None
            and bool(token)
            and hmac.compare_digest(str(token), self.csrf(session))
        )


#: Largest form a POST may send (edited event data included).
MAX_FORM_BYTES = 2_000_000


class FormTooLarge(ValueError):
    pass


async def form_of(request: Request) -> dict[str, str]:
    """The POSTed form (``application/x-www-form-urlencoded``, all the console sends), read once
    and kept on the request."""
    cached = getattr(request.state, "form", None)
    if cached is not None:
        return dict(cached)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormTooLarge(f"form over {MAX_FORM_BYTES} bytes")
    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    request.state.form = form
    return form


def new_session(*, signed_in: bool = False) -> Session:
    return Session(secrets.token_urlsafe(18), signed_in, time.time())


def token_matches(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(given), str(expected))


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def same_origin(request: Request) -> bool:
    """A POST's Origin (or Referer), when the browser sends one, must be this console."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null":
        return origin != "null"
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1].split("/", 1)[0] == host
