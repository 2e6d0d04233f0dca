"""ingestion: the HTTP API that accepts delivery requests and answers status queries.

``POST /api/deliveryrequests`` validates the request, stores it (a row of ``delivery_requests``,
through the unit of work's SQLAlchemy session, and the delivery's status document) and emits
``DeliveryRequested`` in one transaction of ingestion's store (outbox: published after the
commit), then answers 202 with a ``Location``. ``DELETE
/api/deliveryrequests/{id}`` asks for a cancel. ``GET /api/deliveries/{id}`` answers from
ingestion's own store, which follows the outcome events. Bad requests get a 4xx whose JSON body
says what is wrong.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from sqlalchemy.exc import IntegrityError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from choreograph import Context, Runtime, Service
from choreograph.demo.events import (
    DeliveryCancelRequested,
    DeliveryCompleted,
    DeliveryFailed,
    DeliveryRequested,
    DeliveryScheduled,
    Id,
    Location,
    PackageInfo,
)
from choreograph.demo.tables import DeliveryRequestRow, IngestionTables

MAX_BODY_BYTES = 16 * 1024
TERMINAL = ("completed", "failed")
_ID = TypeAdapter(Id)


class DeliveryRequestBody(BaseModel):
    """What a client posts. The delivery id is assigned here unless the client gives one
    (a client-chosen id makes the POST idempotent)."""

    model_config = ConfigDict(extra="forbid")
    delivery_id: Id | None = None
    owner_id: Id
    pickup: Location
    dropoff: Location
    package: PackageInfo
    expedited: bool = False


def build_service() -> Service:
    ingestion = Service(
        "ingestion",
        emits=[DeliveryRequested, DeliveryCancelRequested],
        description="HTTP API: accepts delivery requests, answers status queries.",
        tables=IngestionTables.metadata,
    )

    async def set_status(ctx: Context, delivery_id: str, status: str, **extra: Any) -> None:
        doc = await ctx.state.get("delivery", delivery_id) or {}
        if doc.get("status") in TERMINAL:
            return
        await ctx.state.put("delivery", delivery_id, {**doc, "status": status, **extra})

    @ingestion.on(DeliveryScheduled)
    async def track_scheduled(event: DeliveryScheduled, ctx: Context) -> None:
        await set_status(ctx, event.delivery_id, "in_flight", drone_id=event.drone_id)

    @ingestion.on(DeliveryCompleted)
    async def track_completed(event: DeliveryCompleted, ctx: Context) -> None:
        await set_status(ctx, event.delivery_id, "completed")

    @ingestion.on(DeliveryFailed)
    async def track_failed(event: DeliveryFailed, ctx: Context) -> None:
        await set_status(ctx, event.delivery_id, "failed", reason=event.reason)

    return ingestion


def problem(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": detail, **extra}, status_code=status)


def create_http_app(runtime: Runtime) -> Starlette:
    """The ASGI app; ``runtime`` must run the ``ingestion`` service."""

    async def read_json(request: Request) -> Any:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise _Reject(415, "send the request as application/json")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise _Reject(413, f"request body over {MAX_BODY_BYTES} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise _Reject(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _Reject(400, f"malformed JSON: {exc}") from None

    async def submit(request: Request) -> Response:
        try:
            # strict: a client's true is not 1.0, nor is its "47.6" a number
            body = DeliveryRequestBody.model_validate(await read_json(request), strict=True)
        except _Reject as reject:
            return problem(reject.status, reject.detail)
        except ValidationError as exc:
            return problem(422, "invalid delivery request", problems=_problems(exc))
        delivery_id = body.delivery_id or str(uuid.uuid4())
        fields = body.model_dump(exclude={"delivery_id"})
        try:
            # the row, the status document and the event commit together, before the answer
            async with runtime.unit_of_work("ingestion", correlation_id=delivery_id) as uow:
                if await uow.state.get("delivery", delivery_id) is None:
                    uow.session.add(
                        DeliveryRequestRow(
                            delivery_id=delivery_id,
                            owner_id=body.owner_id,
                            request={k: v for k, v in fields.items() if k != "owner_id"},
                        )
                    )
                    await uow.state.put("delivery", delivery_id, {"status": "requested"})
                    uow.emit(DeliveryRequested(delivery_id=delivery_id, **fields))
        except IntegrityError:
            pass  # the same request, posted twice at once: the other one was accepted
        location = f"/api/deliveries/{delivery_id}"
        return JSONResponse(
            {"delivery_id": delivery_id, "status": "accepted"},
            status_code=202,
            headers={"Location": location},
        )

    async def cancel(request: Request) -> Response:
        delivery_id = request.path_params["delivery_id"]
        if (invalid := _invalid_id(delivery_id)) is not None:
            return invalid
        async with runtime.unit_of_work("ingestion", correlation_id=delivery_id) as uow:
            doc = await uow.state.get("delivery", delivery_id)
            if doc is None:
                return problem(404, f"no delivery {delivery_id}")
            if doc["status"] in (*TERMINAL, "in_flight"):
                status = doc["status"].replace("_", " ")
                return problem(409, f"delivery {delivery_id} is already {status}")
            uow.emit(DeliveryCancelRequested(delivery_id=delivery_id))
        return JSONResponse({"delivery_id": delivery_id, "status": "cancel requested"}, 202)

    async def status(request: Request) -> Response:
        delivery_id = request.path_params["delivery_id"]
        if (invalid := _invalid_id(delivery_id)) is not None:
            return invalid
        async with runtime.unit_of_work("ingestion") as uow:
            doc = await uow.state.get("delivery", delivery_id)
        if doc is None:
            return problem(404, f"no delivery {delivery_id}")
        return JSONResponse({"delivery_id": delivery_id, **doc})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "services": sorted(runtime.workers)})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return problem(exc.status_code, exc.detail)

    return Starlette(
        exception_handlers={HTTPException: http_error},
        routes=[
            Route("/api/deliveryrequests", submit, methods=["POST"]),
            Route("/api/deliveryrequests/{delivery_id}", cancel, methods=["DELETE"]),
            Route("/api/deliveries/{delivery_id}", status, methods=["GET"]),
            Route("/healthz", health, methods=["GET"]),
        ],
    )


def _invalid_id(delivery_id: str) -> Response | None:
    """A 404 for an id no delivery can have, answered before any store sees it (PostgreSQL, for
    one, refuses a NUL in text)."""
    try:
        _ID.validate_python(delivery_id)
    except ValidationError:
        return problem(404, f"no delivery {delivery_id[:100]!r}: a delivery id is 1-64 letters, "
                       "digits, '.', '_', ':' or '-'")  # fmt: skip
    return None


class _Reject(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _problems(exc: ValidationError) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
    ][:20]
