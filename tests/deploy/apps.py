"""A small app for the deployment tests: ``counter`` consumes two event types (so a transport
that makes one consumer per topic makes several for it), ``archive`` one. A handling of
``counter`` holds its message for ``$DEPLOY_HOLD_SECONDS`` (0 by default), to have a process
hold messages when it is told to stop."""

from __future__ import annotations

import asyncio
import os

from choreograph import App, Context, Event, Service


class Parcel(Event):
    number: int


class Letter(Event):
    number: int


source = Service("source", emits=[Parcel, Letter])
counter = Service("counter")
archive = Service("archive")


@counter.on(Parcel)
async def count_parcel(event: Parcel, ctx: Context) -> None:
    await asyncio.sleep(float(os.environ.get("DEPLOY_HOLD_SECONDS", "0")))


@counter.on(Letter)
async def count_letter(event: Letter, ctx: Context) -> None:
    await asyncio.sleep(float(os.environ.get("DEPLOY_HOLD_SECONDS", "0")))


@archive.on(Parcel)
async def archive_parcel(event: Parcel, ctx: Context) -> None:
    return None


app = App("deploytest", [source, counter, archive])
