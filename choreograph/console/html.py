"""Small helpers to write the console's HTML safely: every value goes through :func:`esc`.

Pages are plain server-rendered HTML. The part of a page that changes (``<div id="live">``) is
fetched again by ``console.js`` every few seconds and swapped in place; forms live outside it so
that nothing a person is typing is ever replaced.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from urllib.parse import urlencode

from choreograph import __version__
from choreograph.observe.durations import format_duration
from choreograph.transport import redact

#: Shown where there is no value.
NONE = "\u2013"
NAV = (
    ("/", "Overview"),
    ("/transactions", "Transactions"),
    ("/dead-letters", "Dead letters"),
    ("/choreography", "Choreography"),
)


def esc(value: object) -> str:
    """Text for HTML, with the credentials of any URL in it redacted."""
    return escape(redact("" if value is None else str(value)))


def url(path: str, params: dict[str, str] | None = None) -> str:
    return esc(path + ("?" + urlencode(params) if params else ""))


def when(epoch: float | None) -> str:
    """A UTC time to the millisecond, in a <time> the script shows in local time on hover."""
    if epoch is None:
        return NONE
    moment = datetime.fromtimestamp(epoch, UTC)
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    return f'<time datetime="{moment.isoformat()}" title="{text} UTC">{text}</time>'


def clock(epoch: float | None) -> str:
    """The time of day to the millisecond (UTC); the date is in the tooltip."""
    if epoch is None:
        return NONE
    moment = datetime.fromtimestamp(epoch, UTC)
    full = moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f'<time datetime="{moment.isoformat()}" title="{full} UTC">{full[11:]}</time>'


def seconds(value: float | None) -> str:
    if value is None:
        return NONE
    return format_duration(value)


def badge(status: str) -> str:
    label = status.replace("_", " ")
    return f'<span class="badge {esc(status)}">{esc(label)}</span>'


def page(
    title: str,
    body: str,
    *,
    active: str = "",
    live: str = "",
    banner: str = "",
    refresh: float = 2.0,
    read_only: bool = False,
    signed_in: bool = False,
    csrf: str = "",
) -> str:
    """A whole page. ``live`` is the part that updates itself; ``body`` the rest (forms)."""
    links = "".join(
        f'<a href="{href}"{" class=active" if href == active else ""}>{name}</a>'
        for href, name in NAV
    )
    mode = '<span class="mode">read-only</span>' if read_only else ""
    sign_out = (
        '<form method="post" action="/logout" class="inline">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        '<button class="link">sign out</button></form>'
        if signed_in
        else ""
    )
    live_block = f'<div id="live" data-refresh="{refresh * 1000:.0f}">{live}</div>' if live else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · choreograph console</title>
<link rel="stylesheet" href="/static/console.css?v={__version__}">
<link rel="icon" href="data:,">
<script src="/static/console.js?v={__version__}" defer></script>
</head><body>
<header><a class="brand" href="/">choreograph <b>console</b></a><nav>{links}</nav>
<span class="spacer"></span>{mode}<span class="live-dot" title="updates live"></span>{sign_out}
</header>
<main>{banner}<h1>{esc(title)}</h1>{body}{live_block}</main>
</body></html>"""


def notice(text: str, kind: str = "info") -> str:
    return f'<div class="notice {esc(kind)}">{esc(text)}</div>'


def table(
    headers: list[str], rows: list[list[str]], *, empty: str = "nothing yet", name: str = ""
) -> str:
    """Cells are HTML already (escape values with :func:`esc`)."""
    if not rows:
        return f'<p class="empty">{esc(empty)}</p>'
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    classes = f"grid {name}".strip()
    return f'<table class="{classes}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def sparkline(series: list[int], title: str = "", width: int = 160, height: int = 32) -> str:
    """Counts per bucket as small bars, inline SVG; ``title`` shows on hover. A short series
    keeps narrow bars from the left (one busy minute is one bar, not the whole chart)."""
    if not series:
        return ""
    top = max(series) or 1
    slot = width / max(len(series), 20)
    bars = []
    for i, v in enumerate(series):
        if v:
            h = max(1.0, v / top * (height - 2))
            bars.append(
                f'<rect x="{i * slot:.1f}" y="{height - h:.1f}" width="{max(slot - 1, 1):.1f}" '
                f'height="{h:.1f}"/>'
            )
    return (
        f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'aria-label="activity"><title>{esc(title)}</title>'
        f'<line x1="0" y1="{height - 0.5}" x2="{width}" y2="{height - 0.5}"/>{"".join(bars)}</svg>'
    )
