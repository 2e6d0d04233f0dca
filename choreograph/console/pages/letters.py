"""Dead letters: the list with filters; one letter with its envelope, reason, error and
traceback; replay (as is, or with edited data checked against the event's schema) and discard,
each confirmed on a page of its own before it runs."""

from __future__ import annotations

from choreograph.console.html import NONE, esc, notice, table, url, when
from choreograph.console.sources import Letter, pretty
from choreograph.console.state import ConsoleState


def letters_live(letters: list[Letter]) -> str:
    rows = [
        [
            f'<a href="{url("/dead-letters/" + x.id)}">{esc(x.event_type)}</a>',
            esc(x.letter.group),
            f'<a class="mono" href="{url("/transactions/" + x.correlation_id)}">'
            f"{esc(x.correlation_id)}</a>"
            if x.correlation_id
            else '<span class="muted">undecodable</span>',
            esc(x.letter.failure.reason),
            f"{esc(x.letter.failure.error_type)}: {esc(x.letter.failure.error[:160])}",
            str(x.letter.attempts),
            when(x.letter.failed_at),
        ]
        for x in letters
    ]
    noun = "dead letter" if len(letters) == 1 else "dead letters"
    return f'<p class="muted">{len(letters):,} {noun}</p>' + table(
        ["event", "group", "transaction", "reason", "error", "attempts", "dead-lettered"],
        rows,
        empty="no dead letters: every message was handled",
    )


def letters_form(groups: list[str], group: str, reason: str, q: str) -> str:
    options = '<option value="">every group</option>' + "".join(
        f"<option{' selected' if g == group else ''}>{esc(g)}</option>" for g in groups
    )
    return f"""<form class="search" method="get" action="/dead-letters">
<label>Group <select name="group">{options}</select></label>
<label>Reason contains <input name="reason" value="{esc(reason)}" autocomplete="off"></label>
<label>Transaction or event type <input name="q" value="{esc(q)}" autocomplete="off"></label>
<button type="submit">Filter</button> <a href="/dead-letters" class="muted">clear</a></form>"""


def filter_letters(letters: list[Letter], group: str, reason: str, q: str) -> list[Letter]:
    found = []
    for letter in letters:
        if group and letter.letter.group != group:
            continue
        if reason and reason.lower() not in letter.letter.failure.reason.lower():
            continue
        if (
            q
            and q not in (letter.correlation_id, letter.event_type)
            and not (letter.correlation_id.startswith(q))
        ):
            continue
        found.append(letter)
    return found


async def letter_body(state: ConsoleState, letter: Letter, csrf: str) -> str:
    failure = letter.letter.failure
    envelope = letter.envelope
    tracebacks = []
    if envelope is not None:
        tracebacks = await state.db.fetch(
            "SELECT traceback, service, attempt FROM cg_handlings WHERE event_id = ? AND "
            "service = ? AND outcome = 'dead_letter' AND traceback IS NOT NULL "
            "ORDER BY ended DESC LIMIT 1",
            (envelope.id, letter.letter.group),
        )
    trace = (
        f'<pre class="traceback">{esc(tracebacks[0]["traceback"])}</pre>'
        if tracebacks
        else '<p class="muted">no traceback recorded (the service does not report to the '
        "recorder, or the message was refused before a handler ran)</p>"
    )
    transaction = (
        f'<a class="mono" href="{url("/transactions/" + letter.correlation_id)}">'
        f"{esc(letter.correlation_id)}</a>"
        if envelope is not None
        else NONE
    )
    facts = table(
        ["", ""],
        [
            ["group", esc(letter.letter.group)],
            ["event", esc(letter.event_type)],
            ["transaction", transaction],
            ["reason", f'<b class="bad">{esc(failure.reason)}</b>'],
            ["error", f"{esc(failure.error_type)}: {esc(failure.error)}"],
            ["attempts", str(letter.letter.attempts)],
            ["dead-lettered", when(letter.letter.failed_at)],
            ["letter id", f'<span class="mono">{esc(letter.id)}</span>'],
        ],
    )
    shown = (
        esc(pretty(envelope.to_dict()))
        if envelope is not None
        else esc(letter.letter.message.body[:20_000].decode("utf-8", "replace"))
    )
    problem = notice(f"undecodable: {letter.problem}", "bad") if letter.problem else ""
    return (
        f'<div class="columns"><div>{facts}{_actions(state, letter, csrf)}</div>'
        f'<div><h2>Envelope</h2>{problem}<pre class="data">{shown}</pre></div></div>'
        f"<h2>Traceback</h2>{trace}"
    )


def _actions(state: ConsoleState, letter: Letter, csrf: str) -> str:
    if state.settings.read_only:
        return '<p class="muted">read-only console: replay and discard are off</p>'
    base = "/dead-letters/" + letter.id
    edit = ""
    if letter.envelope is not None:
        edit = f"""<details class="edit"><summary>Replay with edited data…</summary>
<form method="post" action="{url(base + "/review")}">
<input type="hidden" name="csrf" value="{esc(csrf)}">
<textarea name="data" rows="14" spellcheck="false">{esc(pretty(letter.envelope.data))}</textarea>
<button type="submit">Check against the schema…</button></form></details>"""
    return f"""<div class="actions"><h2>Actions</h2>
<a class="button" href="{url(base + "/replay")}">Replay…</a>
<a class="button danger" href="{url(base + "/discard")}">Discard…</a>{edit}</div>"""


def confirm_body(
    letter: Letter, action: str, csrf: str, data_text: str | None = None, error: str = ""
) -> str:
    """The confirmation page of a replay or a discard: one POST button, and a way back."""
    what = {
        "replay": f"Send this {esc(letter.event_type)} back to group "
        f"<b>{esc(letter.letter.group)}</b> (only that group), as a first attempt.",
        "discard": "Delete this dead letter for good. It cannot be replayed afterwards.",
    }[action]
    hidden = ""
    if data_text is not None:
        what += " Its data is replaced by the version below, which matches the event's schema."
        hidden = f'<input type="hidden" name="data" value="{esc(data_text)}">'
        what += f'<pre class="data">{esc(data_text)}</pre>'
    message = notice(error, "bad") if error else ""
    danger = " danger" if action == "discard" else ""
    return f"""{message}<div class="confirm"><p>{what}</p>
<form method="post" action="{url("/dead-letters/" + letter.id + "/" + action)}">
<input type="hidden" name="csrf" value="{esc(csrf)}">{hidden}
<button type="submit" class="{danger.strip()}" name="confirm" value="yes">Confirm {action}</button>
<a href="{url("/dead-letters/" + letter.id)}">cancel</a></form></div>"""
