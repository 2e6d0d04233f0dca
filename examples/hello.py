"""The shortest complete choreography: two services, one event each way."""

from choreograph import App, Context, Event, Service


class Ping(Event):
    text: str


class Pong(Event):
    text: str


ping = Service("ping", emits=[Ping])  # ping starts each transaction (from the CLI)
pong = Service("pong")


@pong.on(Ping, emits=[Pong])
async def answer(event: Ping, ctx: Context) -> Pong:
    return Pong(text=event.text.upper())


@ping.on(Pong)
async def show(event: Pong, ctx: Context) -> None:
    print(f"ping got {event.text!r} (transaction {ctx.correlation_id})", flush=True)


app = App("hello", [ping, pong], terminal=[Pong])  # Pong ends the transaction
