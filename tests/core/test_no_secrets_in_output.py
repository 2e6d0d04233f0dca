"""No command prints a password or token: a secret is planted in every URL a command takes
(the bus, the service stores, the recorder database), every command of the CLI runs against the
real servers with DEBUG logging, and its whole output (stdout, stderr, log) is searched for it,
as are the pages of the web console.

Where it is planted so that the servers still accept the connection (the commands must really
work, or their output proves little):

* NATS: as the token (``nats://SECRET@host``, the URL's user name) and as a password in a
  ``servers=`` entry; the local server has no authorization, so it ignores both.
* PostgreSQL (service stores and recorder database): as the password; the local server trusts
  loopback connections, so it ignores it.
* RabbitMQ and Redis do check their credentials here, so there the secret is a wrong password:
  the command must fail with a clear error that still does not show it.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from choreograph.transport import transport_from_url
from tests.stores.conftest import PG_URL, drop_schemas
from tests.support.brokers import NATS, POSTGRES, RABBITMQ, REDIS
from tests.support.procs import REPO, Procs, choreograph_command, clean_env, free_port, wait_until

APP = "tests.observe.shop:app"
SECRET = f"s3cret{uuid.uuid4().hex[:12]}"


def choreograph(*args: str) -> subprocess.CompletedProcess[str]:
    """One command, to its end, with DEBUG logging; stdout and stderr together."""
    try:
        return subprocess.run(
            [*choreograph_command(), "--log-level", "DEBUG", *args],
            cwd=REPO,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,  # a hang guard only
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        said = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else exc.output
        pytest.fail(f"choreograph {' '.join(args[:2])} hung; it said:\n{(said or '')[-4000:]}")


def ended(flows_schema: str, correlation_id: str) -> bool:
    """Whether the recorder has written the transaction's end (read straight from its tables)."""
    import asyncpg  # type: ignore[import-untyped]

    async def read() -> bool:
        conn = await asyncpg.connect(PG_URL)
        try:
            found = await conn.fetchval(
                f'SELECT ended_at FROM "{flows_schema}".cg_transactions WHERE correlation_id = $1',
                correlation_id,
            )
        except asyncpg.UndefinedTableError:
            return False
        finally:
            await conn.close()
        return found is not None

    return asyncio.run(read())


async def forget(bus: str, namespace: str) -> None:
    transport = transport_from_url(bus)
    await transport.connect()
    try:
        await transport.delete_namespace()
    finally:
        await transport.close()
    await drop_schemas(namespace)


@pytest.mark.nats
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(900)  # some twenty commands, each a new process
def test_no_command_prints_a_secret_planted_in_its_urls(tmp_path: Path, namespace: str) -> None:
    NATS.require()
    POSTGRES.require()
    # given URLs holding the secret, that the servers accept
    bus = (
        f"nats://{SECRET}@127.0.0.1:4222?namespace={namespace}"
        f"&servers=nats://user:{SECRET}@127.0.0.1:4222"
    )
    demo_bus = bus.replace(f"namespace={namespace}", f"namespace={namespace}d")
    store = f"postgresql://postgres:{SECRET}@127.0.0.1:5432/test?schema={namespace}_{{service}}"
    flows = f"postgresql://postgres:{SECRET}@127.0.0.1:5432/test?schema={namespace}_flows"
    outputs: dict[str, str] = {}
    results: dict[str, int] = {}

    def check(name: str, done: subprocess.CompletedProcess[str], *expected: str) -> None:
        outputs[name], results[name] = done.stdout, done.returncode
        for text in expected:
            assert text in done.stdout, f"{name} did not say {text!r}:\n{done.stdout[-3000:]}"

    try:
        with Procs(tmp_path / "logs") as procs:
            # when the recorder and the services run, with metrics and reports on
            recorder = procs.start(
                "record",
                ["--log-level", "DEBUG", "record", "--app", APP, "-t", bus, "--db", flows],
            )
            recorder.wait_output("recording ")
            services = procs.start(
                "run",
                ["--log-level", "DEBUG", "run", "--app", APP, "-t", bus, "--store", store],
                env={"CHOREOGRAPH_RECORD": "1", "CHOREOGRAPH_METRICS_PORT": str(free_port())},
            )  # fmt: skip
            Procs.ready(services)
            order = {"sku": "ok", "amount": 3}
            for order_id, sku in (("o-ok", "ok"), ("o-stuck", "silent")):
                data = orjson.dumps({**order, "order_id": order_id, "sku": sku}).decode()
                check(
                    f"publish {order_id}",
                    choreograph("publish", "--app", APP, "-t", bus,
                                "--correlation-id", order_id, "OrderPlaced", data),
                    "published OrderPlaced",
                )  # fmt: skip
            wait_until(lambda: ended(f"{namespace}_flows", "o-ok"), 60, "o-ok to be recorded")
            # and every other command runs against them
            check("trace", choreograph("trace", "o-ok", "--db", flows, "--app", APP), "completed")
            check("stuck", choreograph("stuck", "--older-than", "0s", "--db", flows), "o-stuck")
            check("stats", choreograph("stats", "--db", flows), "transactions")
            check(
                "timers list",
                choreograph("timers", "list", "--service", "shipping", "--store", store),
                "join:ship",
            )
            check(
                "timers cancel",
                choreograph("timers", "cancel", "join:ship", "o-stuck",
                            "--service", "shipping", "--store", store),
                "cancelled",
            )  # fmt: skip
            check("dlq list", choreograph("dlq", "list", "-t", bus), "no dead letters")
            check("dlq show", choreograph("dlq", "show", "nope", "-t", bus))
            check("dlq replay", choreograph("dlq", "replay", "nope", "-t", bus), "no dead letter")
            check("dlq discard", choreograph("dlq", "discard", "nope", "-t", bus), "no dead letter")
            check("lint", choreograph("lint", APP))
            check("graph", choreograph("graph", APP), "flowchart")
            check("asyncapi", choreograph("asyncapi", APP, "--server", bus), "asyncapi")
            check(
                "demo",
                choreograph("demo", "-n", "3", "-t", demo_bus, "--data-dir", str(tmp_path / "demo"),
                            "--fresh"),
                "drone delivery",
            )  # fmt: skip
            # and the web console serves its pages from the same URLs
            port = free_port()
            console = procs.start(
                "console",
                ["--log-level", "DEBUG", "console", "--db", flows, "--app", APP, "-t", bus,
                 "--store", store, "--port", str(port)],
            )  # fmt: skip
            console.wait_port(port)
            for page in ("/", "/transactions", "/transactions/o-ok", "/transactions/o-stuck",
                         "/dead-letters", "/choreography", "/api/transactions"):  # fmt: skip
                response = httpx.get(f"http://127.0.0.1:{port}{page}", timeout=30)
                assert response.status_code == 200, (page, console.output()[-3000:])
                outputs[f"console {page}"] = response.text
                results[f"console {page}"] = 0
            console.stop()  # (uvicorn ends by re-raising the signal: no exit code to check)
            outputs["console"] = console.output()
            # and each one meets a server it cannot use
            down = free_port()
            check(
                "publish, bus down",
                choreograph("publish", "--app", APP, "-t", f"nats://{SECRET}@127.0.0.1:{down}",
                            "OrderPlaced", data),
                "Error",
            )  # fmt: skip
            check(
                "run, bad option",
                choreograph("run", "--app", APP, "-t", f"{bus}&bogus=1", "--store", store),
                "unknown option 'bogus'",
            )
            check(
                "timers, store down",
                choreograph("timers", "list", "--service", "shipping", "--store",
                            f"postgresql://postgres:{SECRET}@127.0.0.1:{down}/test"),
                "Error",
            )  # fmt: skip
            check(
                "stats, database down",
                choreograph("stats", "--db", f"postgresql://postgres:{SECRET}@127.0.0.1:{down}/t"),
                "Error",
            )
            # stopped as an operator stops them
            results["run"], results["record"] = services.stop(), recorder.stop()
            outputs["run"], outputs["record"] = services.output(), recorder.output()
    finally:
        asyncio.run(forget(bus, namespace))
        asyncio.run(forget(demo_bus, f"{namespace}d"))

    # then no output holds the secret
    leaks = {name: text for name, text in outputs.items() if SECRET in text}
    assert not leaks, "\n\n".join(f"--- {name}:\n{text[-2000:]}" for name, text in leaks.items())
    # the commands did their work, and the errors are errors (stuck exits 1 when it finds one)
    failing = {"publish, bus down", "run, bad option", "timers, store down", "stuck",
               "stats, database down", "dlq show", "dlq replay", "dlq discard"}  # fmt: skip
    assert {n for n, code in results.items() if code != 0} == failing, results
    # the URLs still say where (redacted, not removed), and the metrics listened on loopback
    assert "on nats://***@127.0.0.1:4222" in outputs["run"]
    assert "metrics on http://127.0.0.1:" in outputs["run"]
    assert "nats://***@127.0.0.1:" in outputs["publish, bus down"]


@pytest.mark.parametrize(
    "scheme",
    [
        pytest.param("amqp", marks=pytest.mark.rabbitmq),
        pytest.param("redis", marks=pytest.mark.redis),
    ],
)
def test_a_wrong_password_is_refused_without_being_shown(scheme: str, namespace: str) -> None:
    # given the real server, and a URL whose password is wrong
    if scheme == "amqp":
        RABBITMQ.require()
        bus = f"amqp://guest:{SECRET}@127.0.0.1:5672/?namespace={namespace}"
    else:
        REDIS.require()
        bus = f"redis://:{SECRET}@127.0.0.1:6379/0?namespace={namespace}"
    # when a command connects with it
    data = orjson.dumps({"order_id": "o-1", "sku": "ok", "amount": 3}).decode()
    done = choreograph("publish", "--app", APP, "-t", bus, "OrderPlaced", data)
    # then it fails on the credentials, and says so without them
    assert done.returncode == 1, done.stdout
    assert "Error:" in done.stdout and ("authentication" in done.stdout or "AUTH" in done.stdout)
    assert SECRET not in done.stdout, done.stdout
