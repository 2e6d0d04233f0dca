"""``choreograph publish``, ``choreograph dlq …`` and ``choreograph timers …``."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import click
import orjson
from rich.table import Table

from choreograph.app import App
from choreograph.cli._common import (
    app_option,
    console,
    existing_bus,
    existing_store,
    resolve_app,
    run_async,
    transport_option,
)
from choreograph.cli.run import store_option
from choreograph.envelope import decode, encode, new_envelope
from choreograph.errors import ChoreographError, ConfigurationError
from choreograph.events import Event
from choreograph.runtime.runner import declare_groups
from choreograph.transport import DeadLetter, Message, Transport, transport_from_url


def _event_class(app: App, type_name: str) -> type[Event]:
    types = app.event_types()
    if type_name not in types:
        known = ", ".join(sorted(types))
        raise click.BadParameter(f"{type_name!r} is not an event of {app.name}; known: {known}")
    return types[type_name]


def _read_json(data: str) -> dict[str, Any]:
    raw = sys.stdin.read() if data == "-" else data
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="DATA") from None
    if not isinstance(value, dict):
        raise click.BadParameter("the event data must be a JSON object", param_hint="DATA")
    return value


@click.command()
@click.argument("event_type")
@click.argument("data", default="{}")
@app_option
@transport_option
@click.option("--correlation-id", default="", help="Continue this transaction (default: new).")
@click.option("--source", default="choreograph-cli", show_default=True)
@run_async
async def publish(
    event_type: str, data: str, app_spec: str, transport_url: str, correlation_id: str, source: str
) -> None:
    """Publish one event: EVENT_TYPE with DATA (a JSON object, or - for stdin).

    The data is validated against the app's event class before anything is sent. The app's
    groups are declared first, so the event waits for services that have not started yet.
    """
    app = resolve_app(app_spec)
    cls = _event_class(app, event_type)
    try:
        event = cls.parse_data(_read_json(data))
    except ChoreographError as exc:
        raise click.BadParameter(str(exc), param_hint="DATA") from None
    envelope = new_envelope(
        cls.event_type,
        event.to_data(),
        source=source,
        correlation_id=correlation_id,
        dataschema=cls.dataschema(),
    )
    async with transport_from_url(transport_url) as transport:
        await declare_groups(transport, app)
        await transport.publish([Message(envelope.id, envelope.type, encode(envelope))])
    console.print(
        f"published {envelope.type} id={envelope.id} correlation={envelope.correlationid}"
    )


def _valid_data(app_spec: str, event_type: str, data: str) -> dict[str, Any]:
    """``data`` parsed and validated against the class of ``event_type`` in the app."""
    cls = _event_class(resolve_app(app_spec), event_type)
    value = _read_json(data)
    try:
        cls.parse_data(value)
    except ChoreographError as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from None
    return value  # as given: fields this version does not know may matter to other consumers


# dead letters ------------------------------------------------------------------------------------


@click.group()
def dlq() -> None:
    """List, inspect, replay and discard dead-lettered messages."""


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _dead_json(dead: DeadLetter) -> dict[str, Any]:
    body: Any
    try:
        body = orjson.loads(dead.message.body)
    except orjson.JSONDecodeError:
        body = dead.message.body.decode("utf-8", "replace")
    return {
        "id": dead.id,
        "group": dead.group,
        "topic": dead.message.topic,
        "event_id": dead.message.id,
        "reason": dead.failure.reason,
        "error_type": dead.failure.error_type,
        "error": dead.failure.error,
        "traceback": dead.failure.traceback,
        "attempts": dead.attempts,
        "failed_at": _when(dead.failed_at),
        "message": body,
    }


@dlq.command("list")
@transport_option
@click.option("--group", "-g", default=None, help="Only this service's dead letters.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@run_async
async def dlq_list(transport_url: str, group: str | None, limit: int, as_json: bool) -> None:
    """List dead letters, oldest first. Exits 2 when there is no such bus."""
    async with existing_bus(transport_url) as transport:
        dead = await transport.dead_letters(group, limit)
    if as_json:
        for item in dead:
            click.echo(orjson.dumps(_dead_json(item)).decode())
        return
    if not dead:
        console.print("no dead letters")
        return
    table = Table("id", "group", "event type", "reason", "error", "attempts", "failed at")
    for item in dead:
        table.add_row(
            item.id,
            item.group,
            item.message.topic,
            item.failure.reason,
            f"{item.failure.error_type}: {item.failure.error}"[:80],
            str(item.attempts),
            _when(item.failed_at),
        )
    console.print(table)


async def _find(transport: Transport, dead_letter_id: str) -> DeadLetter:
    """One dead letter, fetched alone."""
    found = await transport.get_dead_letter(dead_letter_id)
    if found is None:
        raise ConfigurationError(f"no dead letter {dead_letter_id!r} (see 'choreograph dlq list')")
    return found


@dlq.command("show")
@click.argument("dead_letter_id")
@transport_option
@run_async
async def dlq_show(dead_letter_id: str, transport_url: str) -> None:
    """Show one dead letter with its whole message and the failure's traceback. Exits 1 when
    there is no such dead letter, 2 when there is no such bus."""
    async with existing_bus(transport_url) as transport:
        item = await _find(transport, dead_letter_id)
    click.echo(orjson.dumps(_dead_json(item), option=orjson.OPT_INDENT_2).decode())


@dlq.command("replay")
@click.argument("dead_letter_ids", nargs=-1)
@transport_option
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter (of --group).")
@click.option("--group", "-g", default=None)
@click.option(
    "--data",
    default=None,
    help="Replace the event's data with this JSON object (or - for stdin); one id only. It is "
    "validated against the event's class in --app first.",
)
@click.option(
    "--app",
    "-a",
    "app_spec",
    envvar="CHOREOGRAPH_APP",
    default=None,
    help="The app (module:attribute) whose event classes validate --data.",
)
@run_async
async def dlq_replay(
    dead_letter_ids: tuple[str, ...],
    transport_url: str,
    replay_all: bool,
    group: str | None,
    data: str | None,
    app_spec: str | None,
) -> None:
    """Send dead letters back to their own group only (as first attempts). Exits 1 when some
    id names no dead letter, 2 on bad usage, invalid --data or no such bus."""
    if not dead_letter_ids and not replay_all:
        raise click.UsageError("name dead letter ids, or use --all")
    if data is not None and len(dead_letter_ids) != 1:
        raise click.UsageError("--data replaces the data of exactly one dead letter")
    if data is not None and app_spec is None:
        raise click.UsageError("--data needs --app (or CHOREOGRAPH_APP) to validate the new data")
    async with existing_bus(transport_url) as transport:
        ids = list(dead_letter_ids)
        if replay_all:
            ids += [d.id for d in await transport.dead_letters(group, 1_000_000)]
        body = None
        if data is not None and app_spec is not None:
            envelope = decode((await _find(transport, ids[0])).message.body)
            body = encode(envelope.evolve(data=_valid_data(app_spec, envelope.type, data)))
        replayed = 0
        with click.progressbar(ids, label="replaying", file=sys.stderr) as bar:
            for item in bar:
                if await transport.replay(item, body):
                    replayed += 1
                else:
                    console.print(f"[yellow]no dead letter {item}[/]")
    console.print(f"replayed {replayed} of {len(ids)}")
    if replayed < len(ids):
        raise SystemExit(1)


@dlq.command("discard")
@click.argument("dead_letter_ids", nargs=-1, required=True)
@transport_option
@run_async
async def dlq_discard(dead_letter_ids: tuple[str, ...], transport_url: str) -> None:
    """Delete dead letters for good. Exits 1 when some id names no dead letter."""
    async with existing_bus(transport_url) as transport:
        missing = [i for i in dead_letter_ids if not await transport.discard(i)]
    for item in missing:
        console.print(f"[yellow]no dead letter {item}[/]")
    console.print(f"discarded {len(dead_letter_ids) - len(missing)}")
    if missing:
        raise SystemExit(1)


# timers -----------------------------------------------------------------------------------------


@click.group()
def timers() -> None:
    """List and cancel pending deadlines and join timeouts of a service."""


@timers.command("list")
@click.option("--service", "-s", required=True)
@store_option
@click.option("--key", default=None, help="Only this correlation id / join key.")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def timers_list(service: str, store_url: str, key: str | None, as_json: bool) -> None:
    """List the pending timers of SERVICE, soonest first. Exits 2 when SERVICE has no store."""
    store = existing_store(store_url, service)
    await store.open()
    try:
        pending = await store.list_timers(key, 100_000)
    finally:
        await store.close()
    if as_json:
        for t in pending:
            click.echo(orjson.dumps({"name": t.name, "key": t.key, "due_at": t.due_at}).decode())
        return
    if not pending:
        console.print(f"no pending timers in {service}")
        return
    table = Table("name", "key", "due at")
    for t in pending:
        table.add_row(t.name, t.key, _when(t.due_at))
    console.print(table)


@timers.command("cancel")
@click.argument("name")
@click.argument("key")
@click.option("--service", "-s", required=True)
@store_option
@run_async
async def timers_cancel(name: str, key: str, service: str, store_url: str) -> None:
    """Cancel the timer NAME (e.g. deadline:drone_late) of KEY; it will never fire. Exits 1 when
    there is no such timer, 2 when SERVICE has no store."""
    store = existing_store(store_url, service)
    await store.open()
    try:
        cancelled = await store.cancel_timer(name, key)
    finally:
        await store.close()
    if not cancelled:
        raise click.ClickException(f"{service} has no pending timer {name} for {key}")
    console.print(f"cancelled {name} for {key}")


COMMANDS = [publish, dlq, timers]
