"""The console's web application: routes, sessions and CSRF checks, live fragments, JSON API.

Every route goes through :func:`_guarded`: it finds or starts the visitor's session, sends a
visitor without a signed-in session to the sign-in page when a token is configured, and refuses a
POST without the session's CSRF token (or from another origin) before anything runs. A GET with
``X-Live: 1`` answers only the part of the page that updates itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from choreograph.app import load_app
from choreograph.console.html import esc, notice, page, url
from choreograph.console.pages.choreography import choreography_live
from choreograph.console.pages.letters import (
    confirm_body,
    filter_letters,
    letter_body,
    letters_form,
    letters_live,
)
from choreograph.console.pages.overview import overview_body, overview_live, window_links
from choreograph.console.pages.transaction import transaction_live
from choreograph.console.pages.transactions import transactions_form, transactions_live
from choreograph.console.queries import BadFilter, TxFilter, record_action, search_transactions
from choreograph.console.security import (
    SESSION_COOKIE,
    SESSION_DAYS,
    FormTooLarge,
    Session,
    Signer,
    bearer,
    form_of,
    new_session,
    same_origin,
    token_matches,
)
from choreograph.console.settings import ConsoleSettings
from choreograph.console.sources import Letter, Rejected, Sources, Unavailable
from choreograph.console.state import ConsoleState
from choreograph.observe.flowdb import flowdb_from_url
from choreograph.observe.flows import load_transaction
from choreograph.observe.model import FlowModel

log = logging.getLogger("choreograph.console")
STATIC = Path(__file__).parent / "static"
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
Handler = Callable[[Request, ConsoleState, Session], Awaitable[Response]]


def create_console_app(settings: ConsoleSettings) -> Starlette:
    """The console as an ASGI app. It opens the recorder database (and, lazily, the bus and the
    stores) when it starts, and closes them when it stops."""
    settings.check_exposure()
    app = load_app(settings.app_spec) if settings.app_spec else None  # a bad spec fails here
    holder: dict[str, ConsoleState] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        db = flowdb_from_url(settings.db_url)
        await db.open()
        sources = Sources(app, settings.transport_url, settings.store_url)
        model = FlowModel(app) if app is not None else None
        holder["state"] = ConsoleState(settings, db, sources, app, Signer(settings.secret), model)
        try:
            yield
        finally:
            await sources.close()
            await db.close()

    def route(path: str, handler: Handler, methods: tuple[str, ...] = ("GET",)) -> Route:
        async def endpoint(request: Request) -> Response:
            return await _guarded(request, holder["state"], handler)

        return Route(path, endpoint, methods=list(methods))

    routes = [
        route("/", _overview),
        route("/transactions", _transactions),
        route("/transactions/{cid:path}", _transaction),
        route("/dead-letters", _letters),
        route("/dead-letters/{lid}", _letter),
        route("/dead-letters/{lid}/review", _review, ("POST",)),
        route("/dead-letters/{lid}/{action}", _action, ("GET", "POST")),
        route("/choreography", _choreography),
        route("/login", _login, ("GET", "POST")),
        route("/logout", _logout, ("POST",)),
        route("/api/transactions", _api_transactions),
        route("/api/transactions/{cid:path}", _api_transaction),
        route("/api/dead-letters", _api_letters),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


# the guard ---------------------------------------------------------------------------------------


async def _guarded(request: Request, state: ConsoleState, handler: Handler) -> Response:
    signer = state.signer
    session = signer.session(request.cookies.get(SESSION_COOKIE))
    fresh = session is None
    if session is None:
        session = new_session()
    token = state.settings.token
    path = request.url.path
    authorised = token is None or session.signed_in or token_matches(token, bearer(request))
    if request.method == "POST":
        try:
            form = await form_of(request)
        except FormTooLarge as exc:
            return _finish(HTMLResponse(_plain("Refused", str(exc)), status_code=413),
                           request, signer, session, fresh)  # fmt: skip
        given = form.get("csrf") or request.headers.get("x-csrf-token")
        if not same_origin(request) or not signer.csrf_ok(
            None if fresh else session, str(given or "")
        ):
            return _finish(
                HTMLResponse(_plain("Refused", "This action needs the page's CSRF token: "
                                    "reload the page and try again."), status_code=403),
                request, signer, session, fresh,
            )  # fmt: skip
    if not authorised and path != "/login":
        if path.startswith("/api/") or request.headers.get("x-live"):
            response: Response = JSONResponse({"error": "sign in first"}, status_code=401)
        else:
            response = RedirectResponse(url("/login", {"next": path})[:2000], status_code=303)
        return _finish(response, request, signer, session, fresh)
    request.state.csrf = signer.csrf(session)
    try:
        response = await handler(request, state, session)
    except BadFilter as exc:
        response = _respond(request, state, "Bad request", notice(str(exc), "bad"), "", 400)
    except Exception:
        log.exception("console: %s %s failed", request.method, path)
        message = notice("Something went wrong on the console's side; the log says what.", "bad")
        response = _respond(request, state, "Error", message, "", 500)
    return _finish(response, request, signer, session, fresh)


def _finish(
    response: Response, request: Request, signer: Signer, session: Session, fresh: bool
) -> Response:
    for name, value in _HEADERS.items():
        response.headers.setdefault(name, value)
    if fresh or getattr(request.state, "new_session", None) is not None:
        chosen = getattr(request.state, "new_session", None) or session
        response.set_cookie(
            SESSION_COOKIE, signer.cookie(chosen), max_age=SESSION_DAYS * 86_400, httponly=True,
            samesite="strict", secure=request.url.scheme == "https", path="/",
        )  # fmt: skip
    return response


def _plain(title: str, text: str) -> str:
    return page(title, notice(text, "bad"))


def _respond(
    request: Request,
    state: ConsoleState,
    title: str,
    body: str,
    live: str,
    status: int = 200,
    *,
    active: str = "",
) -> Response:
    """The whole page, or only its live part for the page's own refresh."""
    if request.headers.get("x-live"):
        return HTMLResponse(live, status_code=status)
    settings = state.settings
    html = page(
        title, body, active=active, live=live, refresh=settings.refresh,
        read_only=settings.read_only, signed_in=settings.token is not None,
        csrf=request.state.csrf if hasattr(request.state, "csrf") else "",
    )  # fmt: skip
    return HTMLResponse(html, status_code=status)


# pages -------------------------------------------------------------------------------------------


async def _overview(request: Request, state: ConsoleState, _: Session) -> Response:
    window = request.query_params.get("window", "24h")
    live = await overview_live(state, window)
    return _respond(request, state, "Overview", overview_body(state, window), live, active="/")


async def _transactions(request: Request, state: ConsoleState, _: Session) -> Response:
    try:
        f = TxFilter.from_params(dict(request.query_params))
    except BadFilter as exc:
        body = transactions_form(state, TxFilter(), str(exc))
        return _respond(request, state, "Transactions", body, "", 400, active="/transactions")
    live = await transactions_live(state, f)
    body = transactions_form(state, f)
    return _respond(request, state, "Transactions", body, live, active="/transactions")


async def _transaction(request: Request, state: ConsoleState, _: Session) -> Response:
    cid = request.path_params["cid"]
    live = await transaction_live(state, cid)
    title = f"Transaction {cid}"
    if live is None:
        body = notice(f"The recorder has no transaction {cid!r}.", "bad")
        return _respond(request, state, title, body, "", 404, active="/transactions")
    replayed = request.query_params.get("done") == "replay"
    banner = (
        notice("Replay sent; the history below shows what became of it.", "ok") if replayed else ""
    )
    return _respond(request, state, title, banner, live, active="/transactions")


async def _letters(request: Request, state: ConsoleState, _: Session) -> Response:
    group = request.query_params.get("group", "")[:100]
    reason = request.query_params.get("reason", "")[:200]
    q = request.query_params.get("q", "")[:500]
    done = request.query_params.get("done", "")
    banner = notice("The dead letter was discarded.", "ok") if done == "discard" else ""
    try:
        letters = await state.sources.letters()
    except Unavailable as exc:
        return _respond(request, state, "Dead letters", banner + notice(str(exc), "warn"), "",
                        active="/dead-letters")  # fmt: skip
    groups = sorted(
        {x.letter.group for x in letters}
        | set(state.app.services if state.app else ())
        | set(state.app.external if state.app else ())
    )
    live = letters_live(filter_letters(letters, group, reason, q))
    body = banner + letters_form(groups, group, reason, q)
    return _respond(request, state, "Dead letters", body, live, active="/dead-letters")


async def _find(state: ConsoleState, letter_id: str) -> Letter | None:
    try:
        return await state.sources.letter(letter_id)
    except Unavailable:
        return None


async def _letter(request: Request, state: ConsoleState, _: Session) -> Response:
    letter = await _find(state, request.path_params["lid"])
    if letter is None:
        return _gone(request, state)
    body = await letter_body(state, letter, request.state.csrf)
    return _respond(request, state, f"Dead letter: {letter.event_type}", body, "",
                    active="/dead-letters")  # fmt: skip


def _gone(request: Request, state: ConsoleState) -> Response:
    body = notice("No such dead letter: it was replayed or discarded, or never existed.", "bad")
    body += '<p><a href="/dead-letters">all dead letters</a></p>'
    return _respond(request, state, "Dead letter", body, "", 404, active="/dead-letters")


async def _review(request: Request, state: ConsoleState, _: Session) -> Response:
    """Edited data: checked against the event's schema, then confirmed on its own page."""
    if state.settings.read_only:
        return _read_only(request, state)
    letter = await _find(state, request.path_params["lid"])
    if letter is None:
        return _gone(request, state)
    form = await form_of(request)
    data_text = str(form.get("data") or "")[:1_000_000]
    csrf = request.state.csrf
    try:
        state.sources.edited_body(letter, data_text)
    except Rejected as exc:
        body = notice(f"Not sent: {exc}", "bad") + await letter_body(state, letter, csrf)
        return _respond(request, state, f"Dead letter: {letter.event_type}", body, "", 422,
                        active="/dead-letters")  # fmt: skip
    normalised = orjson.dumps(orjson.loads(data_text), option=orjson.OPT_INDENT_2).decode()
    body = confirm_body(letter, "replay", csrf, normalised)
    return _respond(request, state, "Confirm replay", body, "", active="/dead-letters")


async def _action(request: Request, state: ConsoleState, _: Session) -> Response:
    action = request.path_params["action"]
    if action not in ("replay", "discard"):
        return _respond(request, state, "Not found", notice("No such page.", "bad"), "", 404)
    if state.settings.read_only:
        return _read_only(request, state)
    letter = await _find(state, request.path_params["lid"])
    if letter is None:
        return _gone(request, state)
    csrf = request.state.csrf
    title = f"Confirm {action}"
    if request.method == "GET":
        return _respond(request, state, title, confirm_body(letter, action, csrf), "",
                        active="/dead-letters")  # fmt: skip
    form = await form_of(request)
    data_text = form.get("data")
    try:
        body = None
        if action == "replay" and data_text is not None:
            body = state.sources.edited_body(letter, str(data_text))
        done = await (
            state.sources.replay(letter.id, body)
            if action == "replay"
            else state.sources.discard(letter.id)
        )
    except (Rejected, Unavailable) as exc:
        edited = None if data_text is None else str(data_text)
        page_body = confirm_body(letter, action, csrf, edited, f"Not done: {exc}")
        return _respond(request, state, title, page_body, "", 422, active="/dead-letters")
    if not done:
        return _gone(request, state)
    await record_action(
        state.db, action, correlation_id=letter.correlation_id or "?",
        event_id=letter.envelope.id if letter.envelope else "?", event_type=letter.event_type,
        group=letter.letter.group, edited=data_text is not None,
        result="sent back to the group" if action == "replay" else "deleted",
    )  # fmt: skip
    log.info("console: %s of dead letter %s (group %s)", action, letter.id, letter.letter.group)
    if action == "replay" and letter.correlation_id:
        target = url(f"/transactions/{letter.correlation_id}", {"done": "replay"})
    else:
        target = url("/dead-letters", {"done": action})
    return RedirectResponse(target.replace("&amp;", "&"), status_code=303)


def _read_only(request: Request, state: ConsoleState) -> Response:
    body = notice("This console is read-only: replay and discard are off.", "bad")
    return _respond(request, state, "Read-only", body, "", 403)


async def _choreography(request: Request, state: ConsoleState, _: Session) -> Response:
    window = request.query_params.get("window", "24h")
    live = await choreography_live(state, window)
    body = f'<div class="toolbar">{window_links(window, "/choreography")}</div>'
    return _respond(request, state, "Choreography", body, live, active="/choreography")


# sign-in -----------------------------------------------------------------------------------------


async def _login(request: Request, state: ConsoleState, session: Session) -> Response:
    token = state.settings.token
    target = request.query_params.get("next", "/")
    if not target.startswith("/") or target.startswith("//"):
        target = "/"
    error = ""
    if request.method == "POST":
        form = await form_of(request)
        if token_matches(token, str(form.get("token") or "")):
            request.state.new_session = new_session(signed_in=True)
            return RedirectResponse(target, status_code=303)
        error = notice("That token is not the console's.", "bad")
    if token is None:
        return RedirectResponse("/", status_code=303)
    body = f"""{error}<form class="login" method="post" action="{url("/login", {"next": target})}">
<input type="hidden" name="csrf" value="{esc(request.state.csrf)}">
<label>Console token <input type="password" name="token" autocomplete="current-password"
 autofocus></label><button type="submit">Sign in</button></form>"""
    return _respond(request, state, "Sign in", body, "", 401 if error else 200)


async def _logout(request: Request, state: ConsoleState, _: Session) -> Response:
    request.state.new_session = new_session(signed_in=False)
    return RedirectResponse("/login" if state.settings.token else "/", status_code=303)


# JSON API ----------------------------------------------------------------------------------------


async def _api_transactions(request: Request, state: ConsoleState, _: Session) -> Response:
    try:
        f = TxFilter.from_params(dict(request.query_params))
    except BadFilter as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    result = await search_transactions(state.db, f, stuck_after=state.settings.stuck_after)
    return _json({"transactions": result.rows, "more": result.more, "page": f.page})


async def _api_transaction(request: Request, state: ConsoleState, _: Session) -> Response:
    view = await load_transaction(state.db, request.path_params["cid"], state.model)
    if view is None:
        return JSONResponse({"error": "no such transaction"}, status_code=404)
    return _json(view)


async def _api_letters(request: Request, state: ConsoleState, _: Session) -> Response:
    try:
        letters = await state.sources.letters(request.query_params.get("group") or None)
    except Unavailable as exc:
        return JSONResponse({"error": str(exc)}, status_code=503)
    return _json(
        [
            {"id": x.id, "group": x.letter.group, "event_type": x.event_type,
             "correlation_id": x.correlation_id, "reason": x.letter.failure.reason,
             "error_type": x.letter.failure.error_type, "error": x.letter.failure.error,
             "attempts": x.letter.attempts, "failed_at": x.letter.failed_at}
            for x in letters
        ]
    )  # fmt: skip


def _json(value: Any) -> Response:
    return Response(orjson.dumps(value, default=str), media_type="application/json")
